"""Scoring for multiple-choice medical VQA (OmniMedVQA), SPEC section 7.

* ``official`` (MedSIGHT ``RegLLM/llava/eval/run_eval_mc.py``, ``evaluate_mc``): the options are A, B, then
  C if the item has it, then D only when C exists. The prediction text is mapped to the option whose
  ``difflib.SequenceMatcher(None, option, text).ratio()`` is *strictly* above every earlier option's,
  starting from 0 (ties keep the earlier option; all-zero ratios map to no option). The ground truth
  (``gt_answer``, case kept) is mapped the same way, and the item is correct iff both map to the same
  option -- including both mapping to none. Comparison is case-sensitive.
* ``strict``: a letter answer ("B", "(B)", "B.", "Option B", "answer is B") selects that option; otherwise
  the one option whose normalised text occurs as a whole-word phrase in the prediction (a match inside a
  longer matching option does not count). Anything else, including empty or ambiguous answers, is wrong.
  The ground truth must equal one option after normalisation.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from medsight.metrics.vqa import PROTOCOLS, SPECIAL_TOKENS, Protocol

LETTERS = ("A", "B", "C", "D")


def options_of(item: Mapping) -> list[str]:
    """Options in the order the reference builds them (C only if present, D only if C is present)."""
    options = []
    for letter in LETTERS:
        value = item.get(f"option_{letter}")
        if value is None:
            break
        options.append(str(value))
    if len(options) < 2:
        raise ValueError("a multiple-choice item needs at least option_A and option_B")
    return options


def most_similar_official(options: list[str], text: str) -> int | None:
    """Index of the first option with the strictly highest SequenceMatcher ratio above 0, else None."""
    best, best_ratio = None, 0.0
    for i, option in enumerate(options):
        ratio = difflib.SequenceMatcher(None, option, text).ratio()
        if ratio > best_ratio:
            best, best_ratio = i, ratio
    return best


def correct_official(options: list[str], gt: str, prediction: str) -> bool:
    return most_similar_official(options, prediction) == most_similar_official(options, gt)


_LETTER_ALONE = re.compile(r"^\s*[\(\[]?([A-D])[\)\]]?(?:[.:,)\s]|$)")
_LETTER_NAMED = re.compile(r"\b(?:option|answer|choice)\s*(?:is\s*)?[:\-]?\s*[\(\[]?([A-D])\b", re.IGNORECASE)


def _norm_words(text: str) -> list[str]:
    text = SPECIAL_TOKENS.sub(" ", text.lower())
    return re.sub(r"[^\w.]|_|\.(?!\d)", " ", text).split()


def _contains(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(words[i:i + n] == phrase for i in range(len(words) - n + 1))


def parse_choice_strict(options: list[str], prediction: str) -> int | None:
    """Index of the option the prediction selects, or None when it selects none or several."""
    text = SPECIAL_TOKENS.sub(" ", prediction).strip()
    for pattern in (_LETTER_ALONE, _LETTER_NAMED):
        match = pattern.search(text)
        if match and LETTERS.index(match.group(1).upper()) < len(options):
            return LETTERS.index(match.group(1).upper())
    words = _norm_words(text)
    phrases = [_norm_words(o) for o in options]
    found = [i for i, p in enumerate(phrases) if _contains(words, p)]
    # An option that is part of another matching option ("mass" inside "renal mass") does not count.
    found = [i for i in found if not any(j != i and len(phrases[j]) > len(phrases[i])
                                         and _contains(phrases[j], phrases[i]) for j in found)]
    distinct = {tuple(phrases[i]) for i in found}
    return found[0] if len(distinct) == 1 else None


def gt_index_strict(options: list[str], gt: str) -> int:
    target = _norm_words(gt)
    for i, option in enumerate(options):
        if _norm_words(option) == target:
            return i
    raise ValueError(f"ground-truth answer {gt!r} is none of the options {options}")


def correct_strict(options: list[str], gt: str, prediction: str) -> bool:
    choice = parse_choice_strict(options, prediction)
    return choice is not None and choice == gt_index_strict(options, gt)


def mcq_gt_answer(item: Mapping) -> str:
    """`gt_answer` as is (case kept), else the second conversation turn lowercased (the reference's rule)."""
    if "gt_answer" in item:
        return str(item["gt_answer"])
    return str(item["conversations"][1]["value"]).lower()


@dataclass
class MCQScores:
    """Accuracy in percent over `n` items, and per modality (item key `modality_type`)."""

    accuracy: float
    n: int
    per_modality: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.n, "per_modality": self.per_modality}


def score_mcq(pairs: Iterable[tuple[Mapping, str]], protocol: Protocol = "official") -> MCQScores:
    """Score (ground-truth item, prediction text) pairs."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}")
    judge = correct_official if protocol == "official" else correct_strict
    groups: dict[str, list[bool]] = {}
    hits: list[bool] = []
    for item, prediction in pairs:
        hit = judge(options_of(item), mcq_gt_answer(item), prediction)
        hits.append(hit)
        groups.setdefault(str(item.get("modality_type", "unknown")), []).append(hit)
    per_modality = {m: {"accuracy": 100.0 * sum(h) / len(h), "n": len(h)} for m, h in sorted(groups.items())}
    return MCQScores(100.0 * sum(hits) / len(hits) if hits else 0.0, len(hits), per_modality)
