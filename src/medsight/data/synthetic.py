"""The embedded synthetic medical dataset (`make data`): small, deterministic, learnable on a CPU.

Run: python -m medsight.data.synthetic [--root data/synthetic] [key=value ...]   (a few seconds)
`key=value` overrides `data.synthetic.*` (the prefix may be omitted) or `data.val_fraction`.

Four modality groups with clearly different appearance (SYNTHETIC_MODALITY_GROUPS):
  CT          noisy grey abdomen: liver (1), left/right kidney (3); liver tumor (10), kidney cyst (13)
  MRI         smooth brain: brain (6); ring-enhancing tumor (10), dark hemorrhage (14)
  X-Ray       chest projection, lungs dark: left/right lung (2), heart (5); lung infection (11)
  Dermoscopy  colour skin in a round field of view: blood vessel (8); skin lesion (12)
Left/right are the patient's (radiological convention: the patient's left is on the image's right).
Organs and lesions vary per case (patient) and drift slightly from slice to slice. Every lesion covers
< 2% of the image. Everything is written in the real formats (see data/README.md):
  biomedparse/<Dataset>/{train,test,train_mask,test_mask}/ + {train,test}.json, biomedparse/meta.json,
  vqa/{train,val,test}.json (LLaVA-Med), omnimedvqa/<group>.json (test images), instruct/{train,val,test}.json
  (grounded LLaVA dialogues), diagseg/{train,val,test}.json, corpus.txt, generator.json (params + version).
The dataset is regenerated only when it is missing or generator.json's params/version differ.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter
from tqdm import tqdm

from medsight.vocab import CLASSES, SYNTHETIC_MODALITY_GROUPS

log = logging.getLogger(__name__)

#: Bump when the generator's output changes for the same params (forces regeneration).
GENERATOR_VERSION = 3
OWNED = ("biomedparse", "vqa", "instruct", "diagseg", "omnimedvqa", "corpus.txt", "generator.json")


@dataclass(frozen=True)
class GroupSpec:
    """One modality group of the synthetic dataset (one BiomedParse sub-dataset)."""

    name: str  # modality group name (SYNTHETIC_MODALITY_GROUPS)
    dataset: str  # BiomedParse sub-dataset folder
    prefix: str  # case id prefix
    modality: str  # modality token in file names
    site: str  # site token in file names
    organs: tuple[str, ...]  # organ targets (always present)
    lesions: tuple[str, ...]  # lesion targets (0..2 per case)


GROUPS = (
    GroupSpec("CT", "SynthAbdomenCT", "ct", "CT", "abdomen", ("liver", "left kidney", "right kidney"),
              ("liver tumor", "kidney cyst")),
    GroupSpec("MRI", "SynthBrainMRI", "mr", "MRI", "brain", ("brain",), ("brain tumor", "brain hemorrhage")),
    GroupSpec("X-Ray", "SynthChestXRay", "xr", "X-Ray", "chest", ("left lung", "right lung", "heart"),
              ("left lung infection", "right lung infection")),
    GroupSpec("Dermoscopy", "SynthDermoscopy", "dm", "Dermoscopy", "skin", ("blood vessel",), ("skin lesion",)),
)
assert [g.name for g in GROUPS] == list(SYNTHETIC_MODALITY_GROUPS)

#: target -> BiomedParse class id
TARGET_CLASS = {
    "liver": 1, "left kidney": 3, "right kidney": 3, "liver tumor": 10, "kidney cyst": 13,
    "brain": 6, "brain tumor": 10, "brain hemorrhage": 14,
    "left lung": 2, "right lung": 2, "heart": 5, "left lung infection": 11, "right lung infection": 11,
    "blood vessel": 8, "skin lesion": 12,
}
#: lesion target -> (finding word, organ/location phrase)
FINDING = {
    "liver tumor": ("tumor", "liver"), "kidney cyst": ("cyst", "kidney"),
    "brain tumor": ("tumor", "brain"), "brain hemorrhage": ("hemorrhage", "brain"),
    "left lung infection": ("infection", "left lung"), "right lung infection": ("infection", "right lung"),
    "skin lesion": ("lesion", "skin"),
}
MAX_LESION_FRACTION = 0.02  # each lesion covers less than this share of the image


# ------------------------------------------------------------------------------------------ shapes
def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0,
          harm: np.ndarray | None = None) -> np.ndarray:
    """Irregular ellipse: boundary radius 1 + sum_k a_k cos(k theta + p_k). harm: (K, 2) amps/phases."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
    r = np.sqrt(u * u + v * v)
    bound = np.ones_like(r)
    if harm is not None:
        theta = np.arctan2(v, u)
        for k, (a, p) in enumerate(harm, start=2):
            bound = bound + a * np.cos(k * theta + p)
    return r <= bound


def _harm(rng: np.random.Generator, amp: float, k: int = 3) -> np.ndarray:
    return np.stack([rng.uniform(0, amp, k), rng.uniform(0, 2 * np.pi, k)], 1)  # (K, 2)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Low-frequency texture in about [-1, 1]. (S, S)"""
    n = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return n / (np.abs(n).max() + 1e-6)


def _lesion(yy, xx, rng: np.random.Generator, organ: np.ndarray, cy: float, cx: float, r: float,
            harm: np.ndarray, size: int) -> np.ndarray:
    """A lesion blob inside `organ`, shrunk until it covers < MAX_LESION_FRACTION of the image."""
    limit = MAX_LESION_FRACTION * 0.9 * size * size
    for _ in range(6):
        m = _blob(yy, xx, cy, cx, r, r * 0.9, 0.0, harm) & organ
        if m.sum() < limit:
            return m
        r *= 0.8
    return m & False


# ----------------------------------------------------------------------------------------- cases
def _case_params(group: GroupSpec, rng: np.random.Generator, lesion_free: bool) -> dict[str, Any]:
    """Per-patient anatomy: organ positions/sizes/shapes and the lesions the patient has."""
    j = lambda s: rng.uniform(-s, s)
    p: dict[str, Any] = {"jit": {k: (j(0.03), j(0.03), 1 + j(0.12), 1 + j(0.12), j(0.25)) for k in group.organs},
                         "harm": {k: _harm(rng, 0.08) for k in group.organs}, "tone": 1 + j(0.08)}
    n_les = 0 if lesion_free else int(rng.integers(1, min(2, len(group.lesions)) + 1))
    chosen = list(rng.choice(len(group.lesions), size=n_les, replace=False)) if n_les else []
    p["lesions"] = [
        dict(target=group.lesions[i], u=rng.uniform(-0.45, 0.45), v=rng.uniform(-0.45, 0.45),  # noqa: C408
             r=rng.uniform(0.035, 0.065), harm=_harm(rng, 0.15), side=int(rng.integers(0, 2)))
        for i in sorted(chosen)
    ]
    if group.name == "Dermoscopy":
        p["skin"] = np.array([0.86, 0.66, 0.55]) * (1 + rng.uniform(-0.08, 0.08, 3))
        p["vessel"] = dict(y0=rng.uniform(0.3, 0.7), amp=rng.uniform(0.04, 0.1), lam=rng.uniform(0.25, 0.5),  # noqa: C408
                           ph=rng.uniform(0, 2 * np.pi), w=rng.uniform(1.3, 2.2), x0=rng.uniform(0.2, 0.3),
                           x1=rng.uniform(0.7, 0.8))
    return p


def _organ_geom(p: dict, name: str, base: tuple[float, float, float, float], t: float, size: int):
    """Organ (cy, cx, ry, rx, angle) in pixels at slice position t in [-0.5, 0.5]."""
    dy, dx, sy, sx, ang = p["jit"][name]
    cy, cx, ry, rx = base
    scale = 1.0 - 0.5 * t * t  # organs shrink towards the ends of the stack
    return ((cy + dy + 0.02 * t) * size, (cx + dx) * size, ry * sy * scale * size, rx * sx * scale * size, ang)


def _draw(group: GroupSpec, p: dict, t: float, rng: np.random.Generator, size: int):
    """One slice: image (S, S, 3) float in [0, 1] and objects [(target, mask (S, S) bool)]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    objs: list[tuple[str, np.ndarray]] = []
    organs: dict[str, np.ndarray] = {}
    les_scale = 1.0 - 1.2 * t * t  # lesions are 3D blobs: smaller on the outer slices

    def organ(name, base):
        g = _organ_geom(p, name, base, t, size)
        m = _blob(yy, xx, *g, harm=p["harm"][name])
        organs[name] = m
        return m, g

    def lesion_mask(les, host: np.ndarray, g):
        cy, cx, ry, rx, _ = g
        return _lesion(yy, xx, rng, host, cy + les["v"] * ry, cx + les["u"] * rx, les["r"] * size * les_scale,
                       les["harm"], size)

    if group.name == "CT":
        img = np.full((size, size), 0.03, np.float32)
        body = _blob(yy, xx, 0.5 * size, 0.5 * size, 0.36 * size, 0.46 * size, 0.0, p["harm"]["liver"] * 0.3)
        img[body] = 0.36 * p["tone"]
        img[_blob(yy, xx, 0.74 * size, 0.5 * size, 0.05 * size, 0.05 * size)] = 0.95  # spine (unlabelled)
        liver, gl = organ("liver", (0.42, 0.32, 0.17, 0.15))
        img[liver] = 0.58 + 0.04 * _smooth_noise(rng, size, 3)[liver]
        geo = {"liver": gl}
        for name, cx in (("right kidney", 0.33), ("left kidney", 0.67)):  # patient's right on image left
            m, g = organ(name, (0.6, cx, 0.065, 0.045))
            img[m] = 0.8
            geo[name] = g
        objs += [(k, organs[k]) for k in group.organs]
        for les in p["lesions"]:
            if les["target"] == "liver tumor":
                m = lesion_mask(les, liver, gl)
                img[m] = 0.28
            else:  # kidney cyst in one kidney
                host = "left kidney" if les["side"] else "right kidney"
                les = dict(les, u=les["u"] * 0.5, v=les["v"] * 0.5, r=les["r"] * 0.6)
                m = lesion_mask(les, organs[host], geo[host])
                img[m] = 0.15
            objs.append((les["target"], m))
        img = img + rng.normal(0, 0.045, img.shape).astype(np.float32)  # CT noise
        rgb = np.repeat(img[..., None], 3, -1)
    elif group.name == "MRI":
        img = np.zeros((size, size), np.float32)
        cy, cx, ry, rx, _ = _organ_geom(p, "brain", (0.5, 0.5, 0.38, 0.31), t, size)
        skull = _blob(yy, xx, cy, cx, ry * 1.1, rx * 1.12, 0.0)
        img[skull] = 0.85
        brain, gb = organ("brain", (0.5, 0.5, 0.38, 0.31))
        img[brain] = 0.45 + 0.07 * _smooth_noise(rng, size, 2.5)[brain] * p["tone"]
        for side in (-1, 1):  # ventricles (unlabelled)
            img[_blob(yy, xx, cy, cx + side * 0.06 * size, 0.09 * size, 0.025 * size, side * 0.3)] = 0.25
        objs.append(("brain", brain))
        for les in p["lesions"]:
            m = lesion_mask(les, brain, gb)
            if les["target"] == "brain tumor":  # ring-enhancing: bright rim, dark core
                core = binary_erosion(m, iterations=2)
                img[m] = 0.95
                img[core] = 0.3
            else:
                img[m] = 0.05
            objs.append((les["target"], m))
        img = gaussian_filter(img, 0.8) + rng.normal(0, 0.01, img.shape).astype(np.float32)
        rgb = np.repeat(img[..., None], 3, -1)
    elif group.name == "X-Ray":
        body = _blob(yy, xx, 0.55 * size, 0.5 * size, 0.6 * size, 0.47 * size)
        img = np.where(body, 0.55 + 0.25 * (yy / size) - 0.15 * np.abs(xx / size - 0.5), 0.04).astype(np.float32)
        heart, _ = organ("heart", (0.6, 0.56, 0.14, 0.13))
        ribs = 0.05 * np.sin(yy / size * 2 * np.pi * 7 + 0.5 * np.sin(xx / size * 6))
        lungs = {}
        for name, cx in (("right lung", 0.3), ("left lung", 0.7)):
            m, g = organ(name, (0.45, cx, 0.28, 0.14))
            m = m & ~heart
            organs[name] = lungs[name] = m
            img[m] = 0.16 + ribs[m]
        img[heart] = 0.78
        objs += [("left lung", lungs["left lung"]), ("right lung", lungs["right lung"]), ("heart", heart)]
        haze = np.zeros_like(img)
        for les in p["lesions"]:
            host = "left lung" if les["target"].startswith("left") else "right lung"
            g = _organ_geom(p, host, (0.45, 0.7 if host == "left lung" else 0.3, 0.28, 0.14), t, size)
            m = lesion_mask(dict(les, r=les["r"] * 1.2), lungs[host], g)
            haze[m] = 0.38
            objs.append((les["target"], m))
        img = gaussian_filter(img + gaussian_filter(haze, 0.7), 0.7)
        rgb = np.repeat(img[..., None], 3, -1)
    else:  # Dermoscopy
        tex = _smooth_noise(rng, size, 4)
        rgb = p["skin"][None, None, :] * (1 + 0.06 * tex[..., None])
        fov = _blob(yy, xx, 0.5 * size, 0.5 * size, 0.56 * size, 0.56 * size)
        vs = p["vessel"]
        x0, x1 = vs["x0"] * size, vs["x1"] * size
        shift = 0.02 * t * size
        ycurve = (vs["y0"] * size + shift + vs["amp"] * size * np.sin(2 * np.pi * xx / (vs["lam"] * size) + vs["ph"]))
        vessel = (np.abs(yy - ycurve) <= vs["w"]) & (xx >= x0) & (xx <= x1) & fov
        rgb[vessel] = np.array([0.72, 0.16, 0.18])
        objs.append(("blood vessel", vessel))
        for les in p["lesions"]:
            m = lesion_mask(les, fov & ~vessel, (0.5 * size, 0.5 * size, 0.3 * size, 0.3 * size, 0))
            core = binary_erosion(m, iterations=2)
            rgb[m] = np.array([0.42, 0.25, 0.15])
            rgb[core] = np.array([0.28, 0.15, 0.08])
            objs.append((les["target"], m))
        rgb = rgb + rng.normal(0, 0.015, rgb.shape)
        rgb[~fov] = 0.02
    return np.clip(rgb, 0, 1), [(n, m) for n, m in objs if m.any()]


# ---------------------------------------------------------------------------------------- splits
def split_cases(cases: list[str], fraction: float, salt: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split of case ids into (kept, held_out) with round(fraction * n) held out (>= 1 when
    fraction > 0 and n >= 2). The same function makes the reader's val split (by case, never by slice)."""
    cases = sorted(set(cases))
    n_out = round(fraction * len(cases))
    if fraction > 0 and len(cases) >= 2:
        n_out = min(max(n_out, 1), len(cases) - 1)
    perm = np.random.default_rng(np.random.SeedSequence([salt, 7919])).permutation(len(cases))
    out = {cases[i] for i in perm[:n_out]}
    return [c for c in cases if c not in out], [c for c in cases if c in out]


def case_of(file_name: str) -> str:
    """Case (patient) id of a BiomedParse file name `{case}_{slice}_{modality}_{site}[...]`.

    A 2D set has no slice index (`dermIS_SSM18_dermoscopy_skin.png`, `benign (46)_ultrasound_breast.png`):
    the token before `{modality}_{site}` is not a number, so every image is its own case."""
    stem = Path(file_name).stem
    parts = stem.split("_")
    if len(parts) >= 4 and parts[-3].isdigit():
        return "_".join(parts[:-3])
    return "_".join(parts[:-2]) if len(parts) >= 3 else stem


# ------------------------------------------------------------------------------------------- text
def _article(word: str) -> str:
    """By sound: "an MRI", "an X-ray", "a CT", "a tumor"."""
    return "an" if word[0] in "aeiou" or word.split("-")[0] in ("MRI", "X") else "a"


def _lesion_phrase(target: str) -> str:
    finding, where = FINDING[target]
    return f"{_article(finding)} {finding} in the {where}"


def _modality_word(group: GroupSpec) -> str:
    return {"CT": "CT", "MRI": "MRI", "X-Ray": "X-ray", "Dermoscopy": "dermoscopy"}[group.name]


def _vqa_items(group: GroupSpec, lesions: list[str], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Candidate (question, answer, answer_type) pairs answerable from the image."""
    mw = _modality_word(group)
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
        ow = _modality_word(other)
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


def _pick_vqa(items: list, n: int, rng: np.random.Generator) -> list:
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


def _dialogues(group: GroupSpec, anns: list[tuple[str, int]], lesions: list[str], rng: np.random.Generator,
               n: int) -> list[tuple[list[tuple[str, str]], list[int]]]:
    """n grounded dialogues: ([(question, answer), ...], ann ids in <mask> order)."""
    mw = _modality_word(group)
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
                parts = [f"{_lesion_phrase(t)} <mask>" for t in les]
                out.append(([(q, "There is " + " and ".join(parts) + ".")], [by_target[t] for t in les]))
            else:
                out.append(([(q, "No abnormality is found in this image.")], []))
        elif kind == "multi":
            t = organs[int(rng.integers(0, len(organs)))]
            turns = [("What modality is this image?", f"This is {_article(mw)} {mw} image."),
                     (f"Segment the {t}.", f"The {t} is at <mask>.")]
            ids = [by_target[t]]
            if les:
                turns.append(("Is there any abnormality?", f"Yes, there is {_lesion_phrase(les[0])} <mask>."))
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
            desc = " and ".join(_lesion_phrase(t) for t in les) if les else "no abnormality"
            text = f"This is {_article(mw)} {mw} image of the {group.site} showing {desc}."
            out.append(([("Describe this image.", text)], []))
    return out


# -------------------------------------------------------------------------------------- generator
def generator_params(cfg: Any) -> dict[str, Any]:
    """Everything the output depends on: data.synthetic.* and data.val_fraction."""
    from omegaconf import OmegaConf
    syn = OmegaConf.to_container(cfg.data.synthetic, resolve=True) if not isinstance(cfg.data.synthetic, dict) \
        else dict(cfg.data.synthetic)
    return {"synthetic": syn, "val_fraction": float(cfg.data.val_fraction)}


def is_current(root: Path | str, params: dict[str, Any]) -> bool:
    """True when `root` holds a complete dataset made by this generator version with these params."""
    f = Path(root) / "generator.json"
    if not f.is_file() or not (Path(root) / "biomedparse" / "meta.json").is_file():
        return False
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("version") == GENERATOR_VERSION and saved.get("params") == params


def ensure_synthetic(root: Path | str, cfg: Any = None, force: bool = False) -> bool:
    """Generate the synthetic dataset into `root` unless it is already current. Returns True if written."""
    if cfg is None:
        from medsight.config import load_config
        cfg = load_config("stage1")
    params = generator_params(cfg)
    if not force and is_current(root, params):
        log.info("synthetic dataset in %s is up to date", root)
        return False
    generate(root, params)
    return True


def _png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, compress_level=1)


def generate(root: Path | str, params: dict[str, Any]) -> dict[str, Any]:
    """Write the whole dataset into `root` (owned subfolders are replaced). Returns summary stats."""
    root = Path(root)
    syn = params["synthetic"]
    size, n_cases, n_slices = int(syn["image_size"]), int(syn["cases_per_group"]), int(syn["slices_per_case"])
    root.mkdir(parents=True, exist_ok=True)
    (root / "generator.json").unlink(missing_ok=True)  # written last: marks a complete dataset
    for name in OWNED:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    bp = root / "biomedparse"
    categories = [{"id": i, "name": n, "supercategory": "abnormal" if 10 <= i <= 14 else "normal"}
                  for i, n in CLASSES.items()]
    meta: dict[str, list] = {"roots": [], "mask_roots": [], "json_paths": [], "modality_labels": []}
    sets: dict[str, dict[str, list]] = {k: {"train": [], "val": [], "test": []} for k in ("vqa", "instruct", "diagseg")}
    mcq: dict[str, list] = {g.name: [] for g in GROUPS}
    corpus: dict[str, None] = {}
    img_id = ann_id = 0
    stats = {"images": 0, "masks": 0, "lesions": 0, "max_lesion_fraction": 0.0, "lesion_free_images": 0}
    bar = tqdm(total=len(GROUPS) * n_cases * n_slices, desc="synthetic", disable=None, file=sys.stderr)
    for gi, group in enumerate(GROUPS):
        cases = [f"{group.prefix}{c:03d}" for c in range(n_cases)]
        train_cases, test_cases = split_cases(cases, float(syn["test_fraction"]), salt=int(syn["seed"]) * 31 + gi)
        _, val_cases = split_cases(train_cases, params["val_fraction"], salt=0)
        split_of = {c: "test" for c in test_cases} | {c: "train" for c in train_cases} | {c: "val" for c in val_cases}
        coco = {s: {"info": {"description": f"{group.dataset} (medsight synthetic)", "version": GENERATOR_VERSION},
                    "images": [], "annotations": [], "categories": categories} for s in ("train", "test")}
        for s in ("train", "test", "train_mask", "test_mask"):
            (bp / group.dataset / s).mkdir(parents=True, exist_ok=True)
        for ci, case in enumerate(cases):
            crng = np.random.default_rng(np.random.SeedSequence([int(syn["seed"]), gi, ci]))
            lesion_free = bool(crng.random() < float(syn["lesion_free_fraction"]))
            p = _case_params(group, crng, lesion_free)
            bsplit = "test" if case in test_cases else "train"
            for z in range(n_slices):
                srng = np.random.default_rng(np.random.SeedSequence([int(syn["seed"]), gi, ci, z, 1]))
                t = (z / max(n_slices - 1, 1)) - 0.5
                rgb, objs = _draw(group, p, t, srng, size)
                stem = f"{case}_{z}_{group.modality}_{group.site}"
                _png(bp / group.dataset / bsplit / f"{stem}.png", (rgb * 255 + 0.5).astype(np.uint8))
                img_id += 1
                coco[bsplit]["images"].append({"file_name": f"{stem}.png", "height": size, "width": size, "id": img_id})
                anns: list[tuple[str, int]] = []
                for target, m in objs:
                    ann_id += 1
                    mask_file = f"{stem}_{target.replace(' ', '+')}.png"
                    _png(bp / group.dataset / f"{bsplit}_mask" / mask_file, m.astype(np.uint8) * 255)
                    ys, xs = np.nonzero(m)
                    cls = TARGET_CLASS[target]
                    sents = [f"{target} in {group.site} {group.modality}", target]
                    coco[bsplit]["annotations"].append({
                        "mask_file": mask_file, "area": int(m.sum()), "iscrowd": 0, "image_id": img_id,
                        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                        "category_id": cls, "id": ann_id, "slice_ratio": round(z / max(n_slices - 1, 1), 4),
                        "file_name": f"{stem}.png", "split": bsplit,
                        "sentences": [{"raw": s, "sent": s.lower(), "sent_id": ann_id * 10 + k} for k, s in enumerate(sents)],
                        "sent_ids": [ann_id * 10 + k for k in range(len(sents))], "ann_id": ann_id, "ref_id": ann_id,
                    })
                    for s in sents:
                        corpus[s] = None
                    anns.append((target, ann_id))
                    stats["masks"] += 1
                    if cls >= 10:
                        stats["lesions"] += 1
                        stats["max_lesion_fraction"] = max(stats["max_lesion_fraction"], float(m.mean()))
                stats["images"] += 1
                lesions = [t for t, _ in anns if t in FINDING]
                stats["lesion_free_images"] += not lesions
                rel_img = f"biomedparse/{group.dataset}/{bsplit}/{stem}.png"
                rel_mask = {a: f"biomedparse/{group.dataset}/{bsplit}_mask/{stem}_{t.replace(' ', '+')}.png" for t, a in anns}
                cls_of = {a: TARGET_CLASS[t] for t, a in anns}
                split = split_of[case]
                trng = np.random.default_rng(np.random.SeedSequence([int(syn["seed"]), gi, ci, z, 2]))
                # VQA (LLaVA-Med form)
                for k, (q, a, at) in enumerate(_pick_vqa(_vqa_items(group, lesions, trng), int(syn["vqa_per_image"]), trng)):
                    sets["vqa"][split].append({
                        "id": f"{stem}-vqa{k}", "image": rel_img,
                        "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
                        "answer_type": at, "modality": group.name})
                    corpus[q] = corpus[a] = None
                # grounded dialogues (LLaVA conversation form)
                for k, (turns, ids) in enumerate(_dialogues(group, anns, lesions, trng, int(syn["instruct_per_image"]))):
                    conv = []
                    for ti, (q, a) in enumerate(turns):
                        conv += [{"from": "human", "value": ("<image>\n" if ti == 0 else "") + q}, {"from": "gpt", "value": a}]
                        corpus[q] = corpus[a.replace(" <mask>", "")] = None
                    sets["instruct"][split].append({
                        "id": f"{stem}-ins{k}", "image": rel_img, "conversations": conv,
                        "mask_files": {str(i): rel_mask[i] for i in ids}, "mask_orders": [str(i) for i in ids],
                        "mask_classes": {str(i): cls_of[i] for i in ids}, "modality": group.name})
                # DiagSeg (diagnose, then segment)
                mw = _modality_word(group)
                q = [f"What abnormality is present in this {mw} image? Please segment it.",
                     f"Can you diagnose this {mw} image and segment the finding?"][int(trng.integers(0, 2))]
                les_ids = {t: a for t, a in anns if t in FINDING}
                if set(les_ids) == {"left lung infection", "right lung infection"}:
                    answer, short = "There is an infection in both lungs <mask>.", "infection"
                    mask_ids: list = [[les_ids["left lung infection"], les_ids["right lung infection"]]]
                elif les_ids:
                    answer = "There is " + " and ".join(f"{_lesion_phrase(t)} <mask>" for t in les_ids) + "."
                    short = " and ".join(FINDING[t][0] for t in les_ids)
                    mask_ids = list(les_ids.values())
                else:
                    answer, short, mask_ids = "No abnormality is found in this image.", "no abnormality", []
                sets["diagseg"][split].append({
                    "qa_id": f"{stem}-dx", "question": q, "answer": answer, "short_answer": short,
                    "image_file": rel_img, "mask_ids": mask_ids,
                    "masks": [[a, rel_mask[a]] for a in les_ids.values()],
                    "mask_classes": {str(a): cls_of[a] for a in les_ids.values()},
                    "answer_type": "OPEN", "modality": group.name})
                corpus[q] = corpus[answer.replace(" <mask>", "")] = corpus[short] = None
                # OmniMedVQA-style multiple choice (test images only)
                if bsplit == "test":
                    for k in range(int(syn["mcq_per_image"])):
                        mq, gt, opts = _mcq(group, lesions, trng, k)
                        mcq[group.name].append({
                            "question_id": f"{stem}-mc{k}", "question": mq, "gt_answer": gt, "image_path": rel_img,
                            **{f"option_{'ABCD'[i]}": o for i, o in enumerate(opts)}, "modality_type": group.name})
                        corpus[mq] = None
                        for o in opts:
                            corpus[o] = None
                bar.update(1)
        for s in ("train", "test"):
            (bp / group.dataset / f"{s}.json").write_text(json.dumps(coco[s]))
            meta["roots"].append(f"{group.dataset}/{s}")
            meta["mask_roots"].append(f"{group.dataset}/{s}_mask")
            meta["json_paths"].append(f"{group.dataset}/{s}.json")
            meta["modality_labels"].append(gi)
    bar.close()
    (bp / "meta.json").write_text(json.dumps(meta, indent=1))
    for name, by_split in sets.items():
        (root / name).mkdir(exist_ok=True)
        for s, rows in by_split.items():
            (root / name / f"{s}.json").write_text(json.dumps(rows, indent=0))
    (root / "omnimedvqa").mkdir(exist_ok=True)
    for g, rows in mcq.items():
        (root / "omnimedvqa" / f"{g}.json").write_text(json.dumps(rows, indent=0))
    (root / "corpus.txt").write_text("\n".join(corpus) + "\n")
    stats["lesion_share"] = stats["lesions"] / max(stats["masks"], 1)
    (root / "generator.json").write_text(json.dumps({"version": GENERATOR_VERSION, "params": params,
                                                     "stats": stats}, indent=1))
    return stats


def _mcq(group: GroupSpec, lesions: list[str], rng: np.random.Generator, k: int) -> tuple[str, str, list[str]]:
    """An OmniMedVQA-style question with 4 options (gt among them)."""
    kind = (int(rng.integers(0, 3)) + k) % 3
    if kind == 0:
        q, gt = "Which imaging modality was used to take this image?", _modality_word(group)
        opts = [_modality_word(g) for g in GROUPS]
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


# --------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """`python -m medsight.data.synthetic [--root DIR] [--force] [key=value ...]`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data/synthetic")
    ap.add_argument("--force", action="store_true", help="regenerate even when up to date")
    ap.add_argument("overrides", nargs="*", help="data.synthetic.* (prefix optional) or data.val_fraction")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from medsight.config import load_config
    ov = [o if o.startswith("data.") else f"data.synthetic.{o}" for o in args.overrides]
    cfg = load_config("stage1", overrides=ov)
    t0 = time.perf_counter()
    written = ensure_synthetic(args.root, cfg, force=args.force)
    if written:
        stats = json.loads((Path(args.root) / "generator.json").read_text())["stats"]
        log.info("wrote synthetic dataset to %s in %.1f s: %s", args.root, time.perf_counter() - t0, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
