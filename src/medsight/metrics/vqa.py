"""Scoring for free-text medical VQA (VQA-RAD, SLAKE, PathVQA in LLaVA-Med form), SPEC section 7.

Two protocols:

* ``official`` reproduces the scorer the paper's numbers come from (MedSIGHT ``RegLLM/llava/eval/run_eval.py``
  with LLaVA-Med's ``eval_metrics`` helpers), quirks included:
  - normalisation: lowercase; each of 21 punctuation marks is *deleted* when the text has that mark next
    to a space (or the text has a digit-comma-digit anywhere), otherwise *replaced by a space*; periods
    not followed by a digit are deleted, but at most 32 of them (``re.UNICODE`` was passed as ``count``);
    number words none/zero..ten -> digits; articles dropped; a contraction table applied;
  - open answers are normalised twice (once by the runner, once inside the F1 helper);
  - closed hit: the prediction contains "yes" or "no" *as a substring* and the ground truth is a substring
    of the prediction (so "no" matches "normal", "abnormal", "not", ...);
  - open recall/precision/F1 on word counts where true positives take the *prediction's* multiplicity and
    false negatives the reference's; an empty prediction or no overlap scores 0.
* ``strict`` fixes those flaws: code tokens (``[<letters><group>_<index>]``: ``[C3_17]``, the released
  ``[M3_17]``), ``<mask>`` and chat markup are removed, every punctuation mark becomes a space (decimal
  points and digit-grouping commas survive), closed answers are parsed to yes/no/other and compared exactly
  (non yes/no closed answers need a whole-word phrase match), open scores clip matched counts (SQuAD-style),
  so a repeated word cannot inflate recall.

Both report percentages. "all"/``overall`` is the mean over all questions of the closed hit (closed
questions) or the open recall (open questions); the reference script does not print it, the paper's "all"
column is most likely this (SPEC section 7).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

Protocol = Literal["official", "strict"]
PROTOCOLS: tuple[str, ...] = ("official", "strict")

# ---------------------------------------------------------------------------------------------------
# Normalisation tables (facts read off LLaVA-Med `llava/eval/eval_metrics/glossary.py`).
# ---------------------------------------------------------------------------------------------------
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# The reference table also lists capitalised keys ("Im", "Ive", "Id've", "I'dve") and identities
# ("let's", "she's"); words are lowercased before the lookup, so those never change anything.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_REFERENCE_PERIOD_LIMIT = 32  # the reference passes re.UNICODE (== 32) as re.sub's `count`

#: Tokens the model emits that are not words: region codes, mask placeholders, chat markup.
SPECIAL_TOKENS = re.compile(r"\[[A-Za-z]+\d+_\d+\]|<mask>|<image>|<\|[^|<>]*\|>|</?s>", re.IGNORECASE)


def _finish_words(words: Iterable[str]) -> list[str]:
    """Number words -> digits, drop articles, then expand contractions (the reference's order)."""
    out = []
    for word in words:
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            out.append(CONTRACTIONS.get(word, word))
    return out


def normalize_official(text: str) -> str:
    """The reference answer normalisation (LLaVA-Med ``normalize_word`` applied to lowercased text)."""
    text = text.lower()
    grouped_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The test looks at the *input* text, never the partly cleaned one.
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if (touches_space or grouped_number) else " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_REFERENCE_PERIOD_LIMIT)
    return " ".join(_finish_words(out.lower().split()))


_STRICT_GROUPING_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_STRICT_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_STRICT_NON_WORD = re.compile(r"[^\w'\u2019]|_")


def strict_words(text: str) -> list[str]:
    """Our normalisation: drop special tokens, every punctuation mark -> space (keeping decimal points and
    digit grouping), apostrophes kept inside words, then number words, articles and contractions."""
    text = SPECIAL_TOKENS.sub(" ", text.lower()).replace("\u2019", "'")
    text = _STRICT_GROUPING_COMMA.sub("", text)
    text = _STRICT_DECIMAL_POINT.sub("\x00", text)  # protect decimals from the punctuation pass
    text = _STRICT_NON_WORD.sub(lambda m: m.group() if m.group() in "'\x00" else " ", text)
    words = [w.strip("'").replace("\x00", ".") for w in text.split()]
    return _finish_words(w for w in words if w)


def normalize_strict(text: str) -> str:
    return " ".join(strict_words(text))


# ---------------------------------------------------------------------------------------------------
# Per-question scores
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenScore:
    precision: float
    recall: float
    f1: float


def _prf(true_pos: int, n_pred: int, n_ref: int) -> OpenScore:
    if true_pos == 0:
        return OpenScore(0.0, 0.0, 0.0)
    precision, recall = true_pos / n_pred, true_pos / n_ref
    return OpenScore(precision, recall, 2 * precision * recall / (precision + recall))


def open_score_official(prediction: str, reference: str) -> OpenScore:
    """Reference open-answer scores. Inputs are raw strings; normalised twice like the reference."""
    pred = Counter(normalize_official(normalize_official(prediction)).split())
    ref = Counter(normalize_official(normalize_official(reference)).split())
    if not pred or not ref:
        return OpenScore(0.0, 0.0, 0.0)
    shared = pred.keys() & ref.keys()
    true_pos = sum(pred[w] for w in shared)              # the prediction's multiplicity
    false_pos = sum(pred[w] for w in pred.keys() - shared)
    false_neg = sum(ref[w] for w in ref.keys() - shared)  # the reference's multiplicity
    return _prf(true_pos, true_pos + false_pos, true_pos + false_neg)


def open_score_strict(prediction: str, reference: str) -> OpenScore:
    """Bag-of-words scores with clipped matches: each reference word can be found at most as often as it
    occurs in the reference."""
    pred, ref = Counter(strict_words(prediction)), Counter(strict_words(reference))
    if not pred or not ref:
        return OpenScore(0.0, 0.0, 0.0)
    true_pos = sum((pred & ref).values())
    return _prf(true_pos, sum(pred.values()), sum(ref.values()))


def closed_hit_official(prediction: str, reference: str) -> bool:
    """Reference yes/no rule: substring tests on the normalised strings ("no" matches "normal")."""
    pred, ref = normalize_official(prediction), normalize_official(reference)
    return ("yes" in pred or "no" in pred) and ref in pred


def parse_yes_no(text: str) -> str:
    """'yes' / 'no' from the first whole word that decides it, else 'other'."""
    for word in strict_words(text):
        if word in ("yes", "no"):
            return word
    return "other"


def _contains_phrase(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(words[i:i + n] == phrase for i in range(len(words) - n + 1))


def closed_hit_strict(prediction: str, reference: str) -> bool:
    """yes/no ground truth: the parsed prediction must equal it. Other closed answers ("CT", "left"):
    the normalised answer must occur as a whole-word phrase in the prediction."""
    ref = strict_words(reference)
    if ref in (["yes"], ["no"]):
        return parse_yes_no(prediction) == ref[0]
    return _contains_phrase(strict_words(prediction), ref)


# ---------------------------------------------------------------------------------------------------
# Data set level
# ---------------------------------------------------------------------------------------------------
@dataclass
class VQAScores:
    """Percentages, plus the number of closed and open questions scored."""

    closed_accuracy: float
    open_recall: float
    open_precision: float
    open_f1: float
    overall: float
    n_closed: int
    n_open: int

    def as_dict(self) -> dict:
        return asdict(self)


def answer_kind(answer_type: str) -> str | None:
    """'open' / 'closed' as the reference reads `answer_type` (case-insensitive; 'close...' is closed)."""
    kind = str(answer_type).lower()
    if kind == "open":
        return "open"
    if kind.startswith("close"):
        return "closed"
    return None


def gt_answer(item: Mapping) -> str:
    """The reference answer of a test item: the second conversation turn, else short_answer, else answer."""
    if "conversations" in item:
        return str(item["conversations"][1]["value"])
    if "short_answer" in item:
        return str(item["short_answer"])
    return str(item["answer"])


def score_vqa(items: Iterable[tuple[str, str, str]], protocol: Protocol = "official") -> VQAScores:
    """Score (answer_kind 'open'|'closed', ground truth, prediction text) triples.

    Means over zero questions are reported as 0, like the reference's closed accuracy.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}")
    open_fn = open_score_official if protocol == "official" else open_score_strict
    closed_fn = closed_hit_official if protocol == "official" else closed_hit_strict
    hits: list[float] = []
    opens: list[OpenScore] = []
    for kind, reference, prediction in items:
        if kind == "closed":
            hits.append(float(closed_fn(prediction, reference)))
        elif kind == "open":
            opens.append(open_fn(prediction, reference))
        else:
            raise ValueError(f"answer kind must be 'open' or 'closed', got {kind!r}")

    def mean(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values) if values else 0.0

    recalls = [s.recall for s in opens]
    return VQAScores(
        closed_accuracy=mean(hits),
        open_recall=mean(recalls),
        open_precision=mean([s.precision for s in opens]),
        open_f1=mean([s.f1 for s in opens]),
        overall=mean(hits + recalls),
        n_closed=len(hits),
        n_open=len(opens),
    )
