"""Text of the embedded synthetic dataset (medsight.data.synthetic), answerable from an image's targets:
VQA pairs (LLaVA-Med form, closed and open), grounded dialogues with one <mask> per named target, and
OmniMedVQA-style multiple-choice questions. Each function draws only from the random stream it is given.
"""

from __future__ import annotations

import numpy as np

from medsight.data.synthetic_images import FINDING, GROUPS, GroupSpec


# ------------------------------------------------------------------------------------------- text
def _article(word: str) -> str:
    """By sound: "an MRI", "an X-ray", "a CT", "a tumor"."""
    return "an" if word[0] in "aeiou" or word.split("-")[0] in ("MRI", "X") else "a"


def lesion_phrase(target: str) -> str:
    finding, where = FINDING[target]
    return f"{_article(finding)} {finding} in the {where}"


def modality_word(group: GroupSpec) -> str:
    return {"CT": "CT", "MRI": "MRI", "X-Ray": "X-ray", "Dermoscopy": "dermoscopy"}[group.name]


def vqa_items(group: GroupSpec, lesions: list[str], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Candidate (question, answer, answer_type) pairs answerable from the image."""
    mw = modality_word(group)
    closed, open_ = [], []
    for t in group.lesions:
        finding, where = FINDING[t]
        q = f"Is there {_article(finding)} {finding} in the {where}?" if where != "skin" else \
            f"Is there a {finding} on the skin?"
        closed.append((q, "yes" if t in lesions else "no"))
    closed.append(("Is there any abnormality in this image?", "yes" if lesions else "no"))
    closed.append(("Is this image normal?", "no" if lesions else "yes"))
    other = [g for g in GROUPS if g.name != group.name][int(rng.integers(0, 3))]
    if rng.random() < 0.5:
        closed.append((f"Is this {_article(mw)} {mw} image?", "yes"))
    else:
        ow = modality_word(other)
        closed.append((f"Is this {_article(ow)} {ow} image?", "no"))
    infected = {FINDING[t][1].split()[0] for t in lesions if "lung" in FINDING[t][1]}  # sides with an infection
    for t in lesions:
        finding, where = FINDING[t]
        if "lung" in where:
            side = "left" if rng.random() < 0.5 else "right"
            # "yes" when that side has an infection (with both lungs infected, both sides are "yes")
            closed.append((f"Is the {finding} in the {side} lung?", "yes" if side in infected else "no"))
    open_.append(("What modality is used to take this image?", mw))
    open_.append(("Which part of the body is shown in this image?", group.site))
    open_.append(("What organ is shown in this image?", " and ".join(sorted({o.split()[-1] for o in group.organs}))))
    findings = sorted({FINDING[t][0] for t in lesions})
    open_.append(("What abnormality is present in this image?", " and ".join(findings) if findings else "none"))
    open_.append(("How many abnormalities are seen in this image?", ["zero", "one", "two"][len(lesions)]))
    if lesions:
        wheres = [FINDING[t][1] for t in lesions]
        ans = "both lungs" if set(wheres) == {"left lung", "right lung"} else " and ".join(wheres)
        open_.append(("Where is the abnormality located?", ans))
    return [(q, a, "CLOSED") for q, a in closed] + [(q, a, "OPEN") for q, a in open_]


def pick_vqa(items: list, n: int, rng: np.random.Generator) -> list:
    """n items, alternating closed/open, without repeats."""
    closed = [it for it in items if it[2] == "CLOSED"]
    open_ = [it for it in items if it[2] == "OPEN"]
    ci, oi = rng.permutation(len(closed)), rng.permutation(len(open_))
    out, k = [], int(rng.integers(0, 2))
    while len(out) < n and (len(ci) or len(oi)):
        if (k % 2 == 0 and len(ci)) or not len(oi):
            out.append(closed[ci[0]])
            ci = ci[1:]
        else:
            out.append(open_[oi[0]])
            oi = oi[1:]
        k += 1
    return out


def dialogues(group: GroupSpec, anns: list[tuple[str, int]], lesions: list[str], rng: np.random.Generator,
               n: int) -> list[tuple[list[tuple[str, str]], list[int]]]:
    """n grounded dialogues: ([(question, answer), ...], ann ids in <mask> order)."""
    mw = modality_word(group)
    by_target = dict(anns)
    organs = [t for t in group.organs if t in by_target]
    les = [t for t in lesions if t in by_target]
    kinds = ["segment", "finding", "multi", "organs", "plain"]
    weights = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    out = []
    for kind in rng.choice(kinds, size=n, replace=n > len(kinds), p=weights):
        if not organs and kind in ("multi", "organs"):
            kind = "plain"
        if kind == "segment" and organs + les:
            t = (organs + les)[int(rng.integers(0, len(organs + les)))]
            q = ["Segment the {t}.", "Please segment the {t} in this image.", "Where is the {t}?"][int(rng.integers(0, 3))]
            out.append(([(q.format(t=t), f"Sure, the {t} is at <mask>.")], [by_target[t]]))
        elif kind == "finding":
            q = f"What abnormality is present in this {mw} image? Please segment it."
            if les:
                parts = [f"{lesion_phrase(t)} <mask>" for t in les]
                out.append(([(q, "There is " + " and ".join(parts) + ".")], [by_target[t] for t in les]))
            else:
                out.append(([(q, "No abnormality is found in this image.")], []))
        elif kind == "multi":
            t = organs[int(rng.integers(0, len(organs)))]
            turns = [("What modality is this image?", f"This is {_article(mw)} {mw} image."),
                     (f"Segment the {t}.", f"The {t} is at <mask>.")]
            ids = [by_target[t]]
            if les:
                turns.append(("Is there any abnormality?", f"Yes, there is {lesion_phrase(les[0])} <mask>."))
                ids.append(by_target[les[0]])
            else:
                turns.append(("Is there any abnormality?", "No, the image looks normal."))
            out.append((turns, ids))
        elif kind == "organs":
            parts = [f"the {t} <mask>" for t in organs]
            ans = (", ".join(parts[:-1]) + " and " + parts[-1]) if len(parts) > 1 else parts[0]
            out.append(([("Segment all normal structures in this image.", ans[0].upper() + ans[1:] + ".")],
                        [by_target[t] for t in organs]))
        else:
            desc = " and ".join(lesion_phrase(t) for t in les) if les else "no abnormality"
            text = f"This is {_article(mw)} {mw} image of the {group.site} showing {desc}."
            out.append(([("Describe this image.", text)], []))
    return out


def mcq_item(group: GroupSpec, lesions: list[str], rng: np.random.Generator, k: int) -> tuple[str, str, list[str]]:
    """An OmniMedVQA-style question with 4 options (gt among them)."""
    kind = (int(rng.integers(0, 3)) + k) % 3
    if kind == 0:
        q, gt = "Which imaging modality was used to take this image?", modality_word(group)
        opts = [modality_word(g) for g in GROUPS]
    elif kind == 1:
        q, gt = "Which part of the body is shown in this image?", group.site
        opts = [g.site for g in GROUPS]
    else:
        q = "What abnormality is seen in this image?"
        findings = sorted({FINDING[t][0] for t in lesions})
        gt = findings[0] if len(findings) == 1 else ("no abnormality" if not findings else " and ".join(findings))
        pool = ["tumor", "cyst", "hemorrhage", "infection", "lesion", "fracture", "no abnormality"]
        others = [o for o in pool if o != gt]
        opts = [gt] + [others[i] for i in rng.choice(len(others), 3, replace=False)]
    opts = [opts[i] for i in rng.permutation(len(opts))]
    return q, gt, opts
