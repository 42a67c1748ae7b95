"""Scoring prediction files against test sets (VQA, OmniMedVQA multiple choice, DiagSeg): the readers,
the id pairing and one scorer per kind (`SCORERS`), used by `medsight eval score`, the benchmark table
(medsight.benchmarks) and the generation harness (medsight.evaluate).

Prediction files are JSONL, one object per line, matched to the test set by id (`question_id` in the
prediction; `qid`/`id`/`qa_id` or `question_id` in the test set). A test item without a prediction, a
prediction without a test item, a duplicate id or a malformed line is an error that names the id or the
file and line: nothing is skipped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsight.metrics.diagseg import (
    DiagSegRecord,
    diagnosis_recall,
    dice,
    item_dice,
    read_mask_file,
    score_diagseg,
    target_masks,
    to_binary,
)
from medsight.metrics.mcq import score_mcq
from medsight.metrics.vqa import PROTOCOLS, answer_kind, gt_answer, score_vqa


class EvalInputError(ValueError):
    """A test set or prediction file that cannot be scored; the message names the file, line or id."""


# ---------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------
def read_json_list(path: str | Path) -> list[dict]:
    """A JSON test set: a list of objects."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise EvalInputError(f"{path}: expected a JSON list of objects")
    return data


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: file not found")
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalInputError(f"{path}, line {lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise EvalInputError(f"{path}, line {lineno}: expected a JSON object")
            records.append((lineno, record))
    return records


def item_id(item: Mapping, keys: Sequence[str], where: str) -> str:
    for key in keys:
        if key in item:
            return str(item[key])
    raise EvalInputError(f"{where}: test item without an id (looked for {', '.join(keys)})")


def pair_predictions(gt_items: list[dict], gt_path: str | Path, pred_path: str | Path,
                     id_keys: Sequence[str], required: Sequence[str] = ("text",)) -> list[tuple[dict, dict]]:
    """(test item, prediction) pairs in test-set order, matched by id; every mismatch is an error."""
    predictions: dict[str, dict] = {}
    for lineno, record in read_jsonl(pred_path):
        if "question_id" not in record:
            raise EvalInputError(f"{pred_path}, line {lineno}: prediction without 'question_id'")
        qid = str(record["question_id"])
        if qid in predictions:
            raise EvalInputError(f"{pred_path}, line {lineno}: duplicate prediction for id {qid}")
        for key in required:
            if key not in record:
                raise EvalInputError(f"{pred_path}, line {lineno}: prediction for id {qid} has no {key!r}")
        if not isinstance(record.get("text", ""), str):
            raise EvalInputError(f"{pred_path}, line {lineno}: 'text' of id {qid} is not a string")
        predictions[qid] = record
    pairs, seen = [], set()
    for item in gt_items:
        qid = item_id(item, id_keys, str(gt_path))
        if qid in seen:
            raise EvalInputError(f"{gt_path}: duplicate test id {qid}")
        seen.add(qid)
        if qid not in predictions:
            raise EvalInputError(f"{pred_path}: no prediction for test id {qid} of {gt_path}")
        pairs.append((item, predictions[qid]))
    extra = sorted(set(predictions) - seen)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise EvalInputError(f"{pred_path}: {len(extra)} prediction(s) for ids not in {gt_path}: {shown}")
    return pairs


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise EvalInputError(f"unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}")


# ---------------------------------------------------------------------------------------------------
# Scoring files
# ---------------------------------------------------------------------------------------------------
VQA_ID_KEYS = ("qid", "id", "qa_id")  # the reference's order
MCQ_ID_KEYS = ("question_id", "id")
DIAGSEG_ID_KEYS = ("qa_id", "id", "question_id")


def vqa_test_items(items: list[dict]) -> list[dict]:
    """The test items of a VQA file as the reference scores them: a raw SLAKE file (rows with `q_lang`) keeps
    its English rows, the raw VQA-RAD file (rows with `phrase_type`) its test_freeform/test_para rows; a
    LLaVA-Med-style test.json is kept whole."""
    if items and "q_lang" in items[0]:
        items = [it for it in items if it.get("q_lang") == "en"]
    if items and "phrase_type" in items[0]:
        items = [it for it in items if str(it.get("phrase_type", "")).startswith("test_")]
    return items


def score_vqa_file(gt_path: str | Path, pred_path: str | Path, protocol: str = "official") -> dict:
    """Closed accuracy, open recall/precision/F1 and overall (percent) of a VQA prediction file. The test set
    may be LLaVA-Med style, raw SLAKE (English rows) or raw VQA-RAD (test rows), as the reference scorer reads."""
    _check_protocol(protocol)
    triples = []
    for item, pred in pair_predictions(vqa_test_items(read_json_list(gt_path)), gt_path, pred_path, VQA_ID_KEYS):
        kind = answer_kind(item.get("answer_type", ""))
        if kind is None:
            qid = item_id(item, VQA_ID_KEYS, str(gt_path))
            raise EvalInputError(f"{gt_path}: test id {qid} has answer_type {item.get('answer_type')!r}; "
                                 "expected OPEN or CLOSED")
        try:
            reference = gt_answer(item)
        except (KeyError, IndexError, TypeError):
            qid = item_id(item, VQA_ID_KEYS, str(gt_path))
            raise EvalInputError(f"{gt_path}: test id {qid} has no answer (conversations[1].value)") from None
        triples.append((kind, reference, pred["text"]))
    return score_vqa(triples, protocol).as_dict()


def score_mcq_file(gt_path: str | Path, pred_path: str | Path, protocol: str = "official") -> dict:
    """Accuracy (percent) of a multiple-choice prediction file, with a per-modality breakdown."""
    _check_protocol(protocol)
    pairs = pair_predictions(read_json_list(gt_path), gt_path, pred_path, MCQ_ID_KEYS)
    try:
        return score_mcq([(item, pred["text"]) for item, pred in pairs], protocol).as_dict()
    except (ValueError, KeyError) as err:
        raise EvalInputError(f"{gt_path}: {err}") from None


def _resolve(path: str, roots: Sequence[Path]) -> Path:
    """`path` if absolute, else the first of `roots` under which it exists (the last one if none)."""
    p = Path(path)
    if p.is_absolute():
        return p
    for root in roots:
        if (root / p).exists():
            return root / p
    return roots[-1] / p


#: DiagSeg modality names the reference's `--modality_split` merges.
DIAGSEG_MODALITY_MERGE = {"Dermatoscopy": "Dermoscopy"}


def _official_diagseg_item(item: Mapping, emitted_paths: list[Path], gt_roots: Sequence[Path], text: str,
                           short: str) -> tuple[float, float | None, bool]:
    """(recall, Dice, has_target) as the reference notebook scores DiagSeg: the GT is the mask(s) of the LAST
    `mask_ids` entry (a nested entry: their union), binarised > 127 at native size; each emitted mask, at that
    size, is scored against it (Dice eps 1e-8: two empty masks score 1) and the mean is the item's Dice;
    recall is the reference's open recall of short_answer."""
    from medsight.metrics.vqa import open_score_official

    recall = open_score_official(text, short).recall
    if not item["mask_ids"]:
        return recall, None, False
    files = {str(mid): p for mid, p in item["masks"]}
    last = item["mask_ids"][-1]
    ids = [str(x) for x in (last if isinstance(last, (list, tuple)) else [last])]
    missing = [x for x in ids if x not in files]
    if missing:
        raise KeyError(f"mask_ids {missing} not listed in 'masks'")
    gt = np.logical_or.reduce([read_mask_file(_resolve(files[x], gt_roots)) for x in ids])
    if not emitted_paths:
        return recall, None, True
    emitted = [to_binary(read_mask_file(p), gt.shape) for p in emitted_paths]
    return recall, float(np.mean([dice(m, gt, 1e-8) for m in emitted])), True


def score_diagseg_file(gt_path: str | Path, pred_path: str | Path, masks_dir: str | Path | None = None,
                       protocol: str = "strict", path_map: Any = None) -> dict:
    """Diagnosis recall and Dice (macro and micro over modalities, percent) of a DiagSeg prediction file.

    protocol "strict" (SPEC section 7): every `mask_ids` entry is a target, strict recall; "official": the
    reference notebook's rule (`_official_diagseg_item`). Both merge Dermatoscopy into Dermoscopy.
    `path_map` ({OLD: NEW} or a medsight.data.formats.common.PathMap) rewrites the authors' absolute GT paths.

    Prediction lines: {"question_id", "text", "masks": [path, ...]} with mask paths (PNG, or .npy logits
    or binary arrays) relative to the prediction file's folder. GT mask paths are relative to `masks_dir`
    (default: the test set's folder, else the dataset root above it, as in data/synthetic/diagseg/).
    Items whose `mask_ids` is empty (no finding) count for diagnosis recall only (`n_no_target`).
    """
    from medsight.data.formats.common import as_path_map

    _check_protocol(protocol)
    pmap = as_path_map(path_map)
    gt_path, pred_path = Path(gt_path), Path(pred_path)
    gt_roots = [Path(masks_dir)] if masks_dir is not None else [gt_path.parent, gt_path.parent.parent]
    records = []
    for item, pred in pair_predictions(read_json_list(gt_path), gt_path, pred_path, DIAGSEG_ID_KEYS,
                                       required=("text", "masks")):
        if pmap and isinstance(item.get("masks"), list):
            item = {**item, "masks": [[m[0], pmap.apply(str(m[1]))] if isinstance(m, list) and len(m) == 2 else m
                                      for m in item["masks"]]}
        qid = item_id(item, DIAGSEG_ID_KEYS, str(gt_path))
        if not isinstance(pred["masks"], list):
            raise EvalInputError(f"{pred_path}: 'masks' of id {qid} must be a list of mask file paths")
        modality = str(item.get("modality", "unknown"))
        modality = DIAGSEG_MODALITY_MERGE.get(modality, modality)
        if protocol == "official":
            try:
                recall, score, has_target = _official_diagseg_item(
                    item, [_resolve(p, [pred_path.parent]) for p in pred["masks"]], gt_roots, pred["text"],
                    str(item.get("short_answer", item.get("answer", ""))))
            except (KeyError, ValueError, FileNotFoundError, OSError) as err:
                raise EvalInputError(f"{gt_path}: test id {qid}: {err}") from None
            records.append(DiagSegRecord(modality, recall, score, has_target=has_target))
            continue
        try:
            gt_masks = {str(mid): read_mask_file(_resolve(p, gt_roots)) for mid, p in item["masks"]}
            targets = target_masks(item["mask_ids"], gt_masks)
            score = None
            if targets:
                size = targets[0].shape
                emitted = [to_binary(read_mask_file(_resolve(p, [pred_path.parent])), size) for p in pred["masks"]]
                score = item_dice(emitted, targets)
        except (KeyError, ValueError, FileNotFoundError, OSError) as err:
            raise EvalInputError(f"{gt_path}: test id {qid}: {err}") from None
        short = item.get("short_answer", item.get("answer", ""))
        records.append(DiagSegRecord(modality, diagnosis_recall(pred["text"], str(short)),
                                     score, has_target=bool(targets)))
    return score_diagseg(records).as_dict()


SCORERS: dict[str, Callable[..., dict]] = {
    "vqa": score_vqa_file,
    "mcq": score_mcq_file,
    "diagseg": score_diagseg_file,
}
