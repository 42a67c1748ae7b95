"""Scorers: hand-computed normalisation quirks, adversarial predictions, equality with the reference
scorers (tests/reference_scorers.py, a test oracle transliterated from the reference source) on random
prediction files, and CLI round trips. Runs in a few seconds on CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from medsight import cli
from medsight.metrics.diagseg import (
    DiagSegRecord,
    dice,
    item_dice,
    score_diagseg,
    target_masks,
    to_binary,
)
from medsight.metrics.mcq import (
    correct_official,
    correct_strict,
    most_similar_official,
    parse_choice_strict,
)
from medsight.metrics.vqa import (
    closed_hit_official,
    closed_hit_strict,
    normalize_official,
    normalize_strict,
    open_score_official,
    open_score_strict,
    parse_yes_no,
)
from medsight.scoring import EvalInputError, score_mcq_file, score_vqa_file
from tests import reference_scorers as ref

DATA = Path(__file__).parent / "data"


# --------------------------------------------------------------------------------------------------
# Official normalisation, one quirk per row (hand-computed from the reference rules)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Yes, it is.", "yes it is"),                      # ", " touches a space -> deleted; final period dropped
    ("left-lobe", "left lobe"),                        # "-" touches no space -> becomes a space
    ("ct-scan, mri", "ct scan mri"),                   # per mark: "," deleted, "-" spaced
    ("mass- like tumor-free", "mass like tumorfree"),  # the test is on the whole text: every "-" deleted
    ("1,000 left-lobe", "1000 leftlobe"),              # any digit,digit -> every mark deleted everywhere
    ("3.5 cm. approx.5", "3.5 cm approx.5"),           # a period survives only before a digit
    ("." * 40 + "x", "." * 8 + "x"),                   # at most 32 periods removed (re.UNICODE as count)
    ("none of the three", "0 of 3"),                   # number words, 'none' -> 0, article dropped
    ("A an THE liver", "liver"),                       # articles after lowercasing
    ("dont isnt oclock", "don't isn't o'clock"),       # contractions table
    ("somebody'd", "somebodyd"),                       # ... including its one backwards entry
    ("Im", "im"),                                      # capitalised keys never match (text is lowercased)
    ("[C3_17] <mask>", "c3 17 mask"),                  # code tokens survive as words in `official`
    ("(left)", "left"),
    ("", ""),
])
def test_normalize_official(text, expected):
    assert normalize_official(text) == expected
    assert ref.normalize_word(text.lower()) == expected


@pytest.mark.parametrize("text, expected", [
    ("Hello [C3_17] world <mask>.", "hello world"),
    ("Hello [M3_17] world [M0_0].", "hello world"),  # the released code-token names
    ("<|im_end|>Yes", "yes"),
    ("mass- like tumor-free", "mass like tumor free"),
    ("1,000 cells; 3.5 cm.", "1000 cells 3.5 cm"),
    ("." * 40 + "x", "x"),
    ("Two lesions", "2 lesions"),
    ("it's the 'left' lobe", "it's left lobe"),
])
def test_normalize_strict(text, expected):
    assert normalize_strict(text) == expected


# --------------------------------------------------------------------------------------------------
# Closed and open rules
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, gt, official, strict", [
    ("The liver looks normal.", "no", True, False),     # the known flaw: "no" inside "normal"
    ("Not sure.", "no", True, False),                   # "no" inside "not"
    ("abnormal", "no", True, False),
    ("No.", "no", True, True),
    ("No, there is no mass.", "No", True, True),
    ("Yes, but no mass", "yes", True, True),            # strict: the first yes/no word decides
    ("No, yes", "yes", True, False),
    ("", "no", False, False),                            # empty answer
    ("It is CT", "CT", False, True),                    # official needs yes/no somewhere in the answer
    ("No, it is CT", "CT", True, True),
    ("No, it is CTA", "CT", True, False),               # strict: whole words only
    ("Yes [C0_1]", "yes", True, True),
])
def test_closed_rules(pred, gt, official, strict):
    assert closed_hit_official(pred, gt) is official
    assert closed_hit_strict(pred, gt) is strict


def test_parse_yes_no():
    assert parse_yes_no("Yes.") == "yes"
    assert parse_yes_no("normal") == "other"
    assert parse_yes_no("I cannot say; no") == "no"


def test_open_scores_multiplicity():
    # official: true positives count the prediction's multiplicity, false negatives the reference's
    s = open_score_official("left left left", "left lung")
    assert (s.precision, s.recall) == (1.0, 0.75) and s.f1 == pytest.approx(6 / 7)
    # strict: clipped counts
    s = open_score_strict("left left left", "left lung")
    assert (s.precision, s.recall, s.f1) == pytest.approx((1 / 3, 0.5, 0.4))


def test_open_scores_code_tokens_and_empty():
    s = open_score_official("[C1_2] pleural-effusion", "Pleural effusion")
    assert (s.precision, s.recall) == (0.5, 1.0)
    s = open_score_strict("[C1_2] pleural-effusion", "Pleural effusion")
    assert (s.precision, s.recall, s.f1) == (1.0, 1.0, 1.0)
    for fn in (open_score_official, open_score_strict):
        for pred, gt in (("", "liver"), ("liver", ""), ("kidney", "liver"), ("<mask>", "liver")):
            assert (fn(pred, gt).precision, fn(pred, gt).recall, fn(pred, gt).f1) == (0.0, 0.0, 0.0)


def test_open_official_normalises_twice():
    # 40 periods: the first pass removes 32, the F1 helper's second pass the other 8 (precision 1, not 1/2)
    s = open_score_official("." * 40 + " one", "1")
    assert (s.precision, s.recall) == (1.0, 1.0)
    assert ref.calculate_f1score(ref.normalize_word(("." * 40 + " one").lower()), "1")[1] == 1.0


def test_number_words_and_repeats():
    assert open_score_official("Two.", "2").recall == 1.0
    assert open_score_official("two two two", "2 lesions").recall == 0.75   # 3 / (3 + 1)
    assert open_score_strict("two two two", "2 lesions").recall == 0.5


# --------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------
OPTS = ["CT", "MRI", "X-Ray", "Ultrasound"]


def test_mcq_official_difflib_rule():
    assert most_similar_official(OPTS, "B") is None            # no similarity at all -> no option
    assert most_similar_official(OPTS, "MRI") == 1
    assert most_similar_official(["ab", "ab"], "ab") == 0         # ties keep the earlier option
    assert most_similar_official(OPTS, "mri") == 3                # case-sensitive: "r" of Ultrasound
    assert correct_official(OPTS, "MRI", "B") is False
    assert correct_official(["xx", "yy"], "zz", "qq") is True     # both map to none: counted correct


@pytest.mark.parametrize("pred, expected", [
    ("B", 1), ("(B)", 1), ("B. MRI", 1), ("Option C", 2), ("The answer is D", 3), ("answer: a", 0),
    ("mri", 1), ("It is an X-ray [C0_1].", 2), ("CT or MRI", None), ("", None), ("E", None),
    ("Because of the CT", 0),
])
def test_mcq_strict_parser(pred, expected):
    assert parse_choice_strict(OPTS, pred) == expected


def test_mcq_strict_nested_options():
    assert parse_choice_strict(["mass", "renal mass"], "a renal mass") == 1
    assert correct_strict(["Normal", "Abnormal"], "Abnormal", "abnormal") is True
    with pytest.raises(ValueError, match="none of the options"):
        correct_strict(OPTS, "PET", "A")


# --------------------------------------------------------------------------------------------------
# DiagSeg
# --------------------------------------------------------------------------------------------------
def test_dice_and_items():
    g = np.zeros((4, 4), bool)
    g[:2] = True
    p = np.zeros((4, 4), bool)
    p[:1] = True
    assert dice(p, g) == pytest.approx(8 / 12)
    assert dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    assert item_dice([], [g]) is None
    assert item_dice([p, g], [g]) == pytest.approx((8 / 12 + 1) / 2)  # one target: every mask against it
    targets = target_masks([[1, 2]], {"1": g, "2": ~g})
    assert targets[0].all()                                             # nested ids -> union


def test_logits_upsampled_bilinear_threshold_zero():
    logits = np.array([[5.0, -5.0], [5.0, -5.0]], np.float32)
    mask = to_binary(logits, (4, 4))
    assert mask[:, :2].all() and not mask[:, 2:].any()
    assert to_binary(np.array([[1, 0], [0, 0]], np.uint8), (4, 4)).sum() == 4  # binary: nearest


def test_diagseg_macro_micro():
    scores = score_diagseg([DiagSegRecord("CT", 1.0, 0.8), DiagSegRecord("CT", 1.0, 1.0),
                            DiagSegRecord("MRI", 0.0, None)])
    assert scores.dice_micro == pytest.approx(60.0) and scores.dice_macro == pytest.approx(45.0)
    assert scores.n_no_mask == 1 and scores.per_modality["MRI"]["n_no_mask"] == 1


# --------------------------------------------------------------------------------------------------
# Equality with the reference scorers on random adversarial prediction files
# --------------------------------------------------------------------------------------------------
WORDS = ["yes", "no", "normal", "abnormal", "not", "none", "one", "two", "ten", "a", "an", "the", "The",
         "dont", "isnt", "Im", "somebody'd", "liver", "left", "lung", "lobe", "mass", "CT", "MRI", "x-ray",
         "3.5", "1,000", "12", "cm", "[C3_17]", "[C0_1]", "<mask>", "<|im_end|>", "Yes", "NO", "lésion",
         "ünïcode", "left-lobe", "e.g.", "...", "?!", "(a)", "{b}", "@", "`", "\\", "_", "=+", "", " "]
SEPS = [" ", " ", " ", "", ", ", ",", ". ", ".", "-", " - ", "/", ";", "!", "?", "  ", "\t", "\n", '"', "'"]


def _random_text(rng: random.Random, max_words: int = 8) -> str:
    n = rng.choice([0, 1, 1, 2, 3, max_words, rng.randint(0, max_words)])
    words = [rng.choice(WORDS) for _ in range(n)]
    if n and rng.random() < 0.2:
        words = words + [words[-1]] * rng.randint(1, 4)        # repeated words
    if rng.random() < 0.05:
        words.append("." * rng.randint(30, 45))               # past the 32-period limit
    return "".join(w + rng.choice(SEPS) for w in words).strip() if rng.random() < 0.8 else "".join(words)


def _random_vqa(rng: random.Random) -> tuple[list[dict], list[dict]]:
    gt, pred = [], []
    for i in range(rng.randint(1, 12)):
        kind = rng.choice(["OPEN", "CLOSED", "closed", "Open"])
        answer = rng.choice(["yes", "no", "Yes", "No"]) if kind.lower() == "closed" and rng.random() < 0.8 \
            else _random_text(rng, 4)
        gt.append({"id": i, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}],
                   "answer_type": kind})
        text = rng.choice([_random_text(rng), answer, answer + rng.choice(SEPS) + _random_text(rng, 3),
                           _random_text(rng, 3) + rng.choice(SEPS) + answer.upper(), (answer + " ") * 3])
        pred.append({"question_id": i, "text": text})
    if rng.random() < 0.1:  # closed-only file
        gt = [dict(g, answer_type="CLOSED") for g in gt]
    return gt, pred


def _write(tmp: Path, name: str, gt: list[dict], pred: list[dict]) -> tuple[Path, Path]:
    gt_path, pred_path = tmp / f"{name}.json", tmp / f"{name}.jsonl"
    gt_path.write_text(json.dumps(gt))
    shuffled = pred[:]
    random.Random(len(pred)).shuffle(shuffled)  # our scorer matches by id; order must not matter
    pred_path.write_text("".join(json.dumps(p) + "\n" for p in shuffled))
    return gt_path, pred_path


def test_vqa_official_equals_reference_on_random_files(tmp_path):
    rng = random.Random(1234)
    for k in range(200):
        gt, pred = _random_vqa(rng)
        expected = ref.evaluate(gt, pred)  # positional pairing: pred is in test-set order here
        got = score_vqa_file(*_write(tmp_path, f"v{k}", gt, pred), protocol="official")
        for key in ("closed_accuracy", "open_recall", "open_precision", "open_f1", "overall"):
            assert got[key] == pytest.approx(100 * expected[key], abs=1e-6), (k, key, gt, pred)
        assert (got["n_closed"], got["n_open"]) == (expected["n_closed"], expected["n_open"])


def test_vqa_strict_is_a_fraction_and_ignores_code_tokens(tmp_path):
    rng = random.Random(7)
    for k in range(50):
        gt, pred = _random_vqa(rng)
        a = score_vqa_file(*_write(tmp_path, f"s{k}", gt, pred), protocol="strict")
        coded = [dict(p, text=f"[C1_{k}] " + p["text"].replace(" ", " <mask> ", 1)) for p in pred]
        b = score_vqa_file(*_write(tmp_path, f"c{k}", gt, coded), protocol="strict")
        assert a == b
        assert all(0.0 <= a[key] <= 100.0 for key in ("closed_accuracy", "open_recall", "overall"))


def _random_mcq(rng: random.Random) -> tuple[list[dict], list[dict]]:
    pool = ["CT", "MRI", "X-Ray", "x-ray", "Ultrasound", "Normal", "Abnormal", "Liver", "liver", "Kidney",
            "Lung cancer", "Lung", "", "A", "B", "Option A"]
    gt, pred = [], []
    for i in range(rng.randint(1, 10)):
        n = rng.choice([2, 3, 4])
        options = [rng.choice(pool) for _ in range(n)]
        item = {"question_id": f"m{i}", "question": "?", "modality_type": rng.choice(["CT", "MRI"]),
                "gt_answer": rng.choice(options + [rng.choice(pool)])}
        item.update({f"option_{'ABCD'[j]}": o for j, o in enumerate(options)})
        if n == 4 and rng.random() < 0.2:
            del item["option_C"]  # D without C: the reference ignores D
        gt.append(item)
        text = rng.choice([rng.choice(options), rng.choice("ABCDE"), f"({rng.choice('ABCD')})",
                           f"The answer is {rng.choice(options)}.", _random_text(rng, 3), "",
                           rng.choice(options).lower(), rng.choice(options).upper()])
        pred.append({"question_id": f"m{i}", "text": text})
    return gt, pred


def test_mcq_official_equals_reference_on_random_files(tmp_path):
    rng = random.Random(99)
    for k in range(200):
        gt, pred = _random_mcq(rng)
        expected = 100 * ref.evaluate_mc(gt, pred)
        got = score_mcq_file(*_write(tmp_path, f"m{k}", gt, pred), protocol="official")
        assert got["accuracy"] == pytest.approx(expected, abs=1e-6), (k, gt, pred)
        assert got["n"] == len(gt)


# --------------------------------------------------------------------------------------------------
# Fixture files and CLI round trips
# --------------------------------------------------------------------------------------------------
def _cli_json(capsys, argv: list[str]) -> dict:
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # exactly one JSON object
    return json.loads(out[0])


def test_cli_vqa_fixture(capsys):
    args = ["eval", "vqa", "--gt", str(DATA / "vqa_test.json"), "--pred", str(DATA / "vqa_pred.jsonl")]
    official = _cli_json(capsys, args + ["--protocol", "official"])
    assert official == pytest.approx({"closed_accuracy": 200 / 3, "open_recall": 275 / 3,
                                      "open_precision": 170 / 3, "open_f1": 100 * (6 / 7 + 1 / 3 + 2 / 3) / 3,
                                      "overall": 100 * 4.75 / 6, "n_closed": 3, "n_open": 3})
    strict = _cli_json(capsys, args + ["--protocol", "strict"])
    assert strict == pytest.approx({"closed_accuracy": 100 / 3, "open_recall": 250 / 3,
                                    "open_precision": 100 * (1 / 3 + 1 / 4 + 1) / 3, "open_f1": 60.0,
                                    "overall": 100 * 3.5 / 6, "n_closed": 3, "n_open": 3})


def test_cli_mcq_fixture(capsys):
    args = ["eval", "mcq", "--gt", str(DATA / "mcq_test.json"), "--pred", str(DATA / "mcq_pred.jsonl")]
    official = _cli_json(capsys, args)
    assert official["accuracy"] == pytest.approx(100 / 3) and official["n"] == 3
    assert set(official) == {"accuracy", "n", "per_modality"}
    strict = _cli_json(capsys, args + ["--protocol", "strict"])
    assert strict["accuracy"] == pytest.approx(200 / 3)
    assert strict["per_modality"]["CT"] == {"accuracy": 100.0, "n": 2}


def test_cli_diagseg_fixture(capsys):
    got = _cli_json(capsys, ["eval", "diagseg", "--gt", str(DATA / "diagseg_test.json"),
                             "--pred", str(DATA / "diagseg_pred.jsonl")])
    assert got["dice_micro"] == pytest.approx(60.0) and got["dice_macro"] == pytest.approx(45.0)
    assert got["diagnosis_recall"] == pytest.approx(200 / 3)
    assert (got["n"], got["n_no_mask"]) == (3, 1)
    assert got["per_modality"]["CT"]["dice"] == pytest.approx(90.0)


def _cli_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medsight: error:") and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_missing_prediction_names_the_id(tmp_path, capsys):
    pred = tmp_path / "p.jsonl"
    lines = (DATA / "vqa_pred.jsonl").read_text().splitlines()
    pred.write_text("\n".join(line for line in lines if '"q4"' not in line) + "\n")
    err = _cli_error(capsys, ["eval", "vqa", "--gt", str(DATA / "vqa_test.json"), "--pred", str(pred)])
    assert "q4" in err


def test_cli_malformed_line_names_file_and_line(tmp_path, capsys):
    pred = tmp_path / "bad.jsonl"
    lines = (DATA / "mcq_pred.jsonl").read_text().splitlines()
    pred.write_text(lines[0] + "\n" + '{"question_id": "m2", "text": "B"' + "\n" + lines[2] + "\n")
    err = _cli_error(capsys, ["eval", "mcq", "--gt", str(DATA / "mcq_test.json"), "--pred", str(pred)])
    assert "bad.jsonl" in err and "line 2" in err


def test_cli_other_input_errors(tmp_path, capsys):
    gt = str(DATA / "vqa_test.json")
    assert "file not found" in _cli_error(capsys, ["eval", "vqa", "--gt", gt, "--pred", str(tmp_path / "x")])
    dup = tmp_path / "dup.jsonl"
    dup.write_text((DATA / "vqa_pred.jsonl").read_text() + '{"question_id": "q1", "text": "no"}\n')
    assert "duplicate" in _cli_error(capsys, ["eval", "vqa", "--gt", gt, "--pred", str(dup)])
    extra = tmp_path / "extra.jsonl"
    extra.write_text((DATA / "vqa_pred.jsonl").read_text() + '{"question_id": "zz", "text": "no"}\n')
    assert "zz" in _cli_error(capsys, ["eval", "vqa", "--gt", gt, "--pred", str(extra)])
    with pytest.raises(SystemExit):
        cli.main(["eval", "vqa", "--gt", gt, "--pred", gt, "--protocol", "lenient"])
    with pytest.raises(EvalInputError, match="unknown protocol"):
        score_vqa_file(gt, DATA / "vqa_pred.jsonl", protocol="lenient")
