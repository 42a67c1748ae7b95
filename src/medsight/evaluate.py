"""Evaluation: score prediction files against test sets, and the generation harness behind `medsight eval`.

Prediction files are JSONL, one object per line, matched to the test set by id (`question_id` in the
prediction; `qid`/`id`/`qa_id` or `question_id` in the test set). A test item without a prediction, a
prediction without a test item, a duplicate id or a malformed line is an error that names the id or the
file and line: nothing is skipped silently.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
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

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------------------
# Generation harness: `medsight eval run`
# ---------------------------------------------------------------------------------------------------
#: OmniMedVQA prompt: the reference appends this suffix to the bare question (it never shows the
#: options, so the model must guess their wording); we list the options first and keep the suffix.
MCQ_SUFFIX = ". Answer this question shortly by only selecting one option."


def mcq_prompt(item: Mapping) -> str:
    options = " ".join(f"{letter}. {item[f'option_{letter}']}" for letter in "ABCD"
                       if item.get(f"option_{letter}") is not None)
    return f"{str(item['question']).rstrip(' .?')}? Options: {options}{MCQ_SUFFIX}"


def vqa_prompt(item: Mapping) -> str:
    return str(item["conversations"][0]["value"]).replace("<image>\n", "").replace("<image>", "").strip()


def _generate(model: Any, items: list[dict], image_of: Callable[[dict], Path], prompt_of: Callable[[dict], str],
              batch_size: int, desc: str) -> list[dict]:
    """The model's answers to `items`, in batches; every image must load (no answer without its image)."""
    from tqdm.auto import tqdm

    from medsight.data.io import load_image

    answers: list[dict] = []
    with tqdm(total=len(items), desc=desc, unit="q", disable=None, file=sys.stderr) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            images = [load_image(image_of(item)) for item in batch]
            out = model.answer_batch(images, [prompt_of(item) for item in batch])
            if len(out) != len(batch):
                raise RuntimeError(f"answer_batch returned {len(out)} answers for {len(batch)} questions")
            answers.extend(out)
            bar.update(len(batch))
    return answers


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _split_vqa(model, data: Path, out: Path, items: list[dict], batch_size: int) -> dict:
    answers = _generate(model, items, lambda it: data / it["image"], vqa_prompt, batch_size, "vqa")
    rows = [{"question_id": it["id"], "prompt": vqa_prompt(it), "text": a["text"], "gt_ans": gt_answer(it),
             "metadata": {"n_regions": len(a.get("regions", []))}} for it, a in zip(items, answers)]
    pred = _write_jsonl(out / "vqa_predictions.jsonl", rows)
    gt = _write_subset(out, "vqa_test.json", items)
    return {p: score_vqa_file(gt, pred, p) for p in PROTOCOLS}


def _write_subset(out: Path, name: str, items: list[dict]) -> Path:
    """The test items actually asked (all of them unless --limit), so scoring sees exactly those."""
    path = out / "gt" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def _split_mcq(model, data: Path, out: Path, files: dict[str, list[dict]], batch_size: int) -> dict:
    per_file: dict[str, dict] = {}
    for name, items in files.items():
        answers = _generate(model, items, lambda it: data / it["image_path"], mcq_prompt, batch_size,
                            f"omnimedvqa/{name}")
        rows = [{"question_id": it["question_id"], "prompt": mcq_prompt(it), "text": a["text"],
                 "gt_ans": it["gt_answer"], "metadata": {}} for it, a in zip(items, answers)]
        pred = _write_jsonl(out / f"omnimedvqa_{name}_predictions.jsonl", rows)
        gt = _write_subset(out, f"omnimedvqa_{name}.json", items)
        per_file[name] = {p: score_mcq_file(gt, pred, p) for p in PROTOCOLS}
    result = {}
    for p in PROTOCOLS:
        accs = {name: r[p]["accuracy"] for name, r in per_file.items()}
        counts = {name: r[p]["n"] for name, r in per_file.items()}
        total = sum(counts.values())
        result[p] = {
            "accuracy_macro": float(np.mean(list(accs.values()))) if accs else 0.0,
            "accuracy_micro": sum(accs[k] * counts[k] for k in accs) / total if total else 0.0,
            "n": total,
            "per_file": {k: {"accuracy": accs[k], "n": counts[k]} for k in accs},
        }
    return result


def _split_diagseg(model, data: Path, out: Path, items: list[dict], batch_size: int) -> dict:
    from PIL import Image

    answers = _generate(model, items, lambda it: data / it["image_file"], lambda it: str(it["question"]),
                        batch_size, "diagseg")
    mask_dir = out / "diagseg_masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for it, a in zip(items, answers):
        files = []
        for i, region in enumerate(a.get("regions", [])):
            name = f"{_safe(str(it['qa_id']))}_{i}.png"
            Image.fromarray(np.asarray(region["mask"], dtype=bool).astype(np.uint8) * 255).save(mask_dir / name)
            files.append(f"diagseg_masks/{name}")
        rows.append({"question_id": it["qa_id"], "prompt": str(it["question"]), "text": a["text"], "masks": files,
                     "codes": [r.get("code") for r in a.get("regions", [])], "gt_ans": it.get("short_answer")})
    pred = _write_jsonl(out / "diagseg_predictions.jsonl", rows)
    gt = _write_subset(out, "diagseg_test.json", items)
    return score_diagseg_file(gt, pred, masks_dir=data)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_eval_dir(export: str | Path) -> Path:
    """checkpoints/<run>/stage3/export -> checkpoints/<run>/eval."""
    return Path(export).resolve().parent.parent / "eval"


def load_for_eval(export: str | Path, device: str | None = None) -> Any:
    """`medsight.load(export)` on `device` (default: cuda when available), or EvalInputError when there is no
    export directory."""
    import torch

    import medsight

    if not Path(export).is_dir():
        raise EvalInputError(f"{export}: no export directory; run make stage3 first")
    return medsight.load(export, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))


def run_evaluation(export: str | Path, data: str | Path = "data/synthetic", out: str | Path | None = None,
                   batch_size: int = 8, seed: int = 0, limit: int | None = None, model: Any = None,
                   device: str | None = None) -> dict:
    """Generate greedily on every synthetic test split, score with both protocols, write the results.

    Writes <out>/results.json, <out>/report.md, the prediction JSONL files (and DiagSeg mask PNGs) and
    returns the results with the report under "table". `model` (anything with `answer_batch`) replaces
    loading `export`, for tests.
    """
    data = Path(data)
    splits = {"vqa": data / "vqa" / "test.json", "diagseg": data / "diagseg" / "test.json"}
    mcq_files = sorted((data / "omnimedvqa").glob("*.json")) if (data / "omnimedvqa").is_dir() else []
    if not any(p.is_file() for p in splits.values()) and not mcq_files:
        raise EvalInputError(f"{data}: no test splits (vqa/test.json, omnimedvqa/*.json, diagseg/test.json); "
                             "run make data first")
    if batch_size < 1:
        raise EvalInputError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out) if out is not None else default_eval_dir(export)
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed)
    model = model if model is not None else load_for_eval(export, device)

    def head(items: list[dict]) -> list[dict]:
        return items if limit is None else items[:limit]

    t0 = time.time()
    results: dict[str, Any] = {"run": {"export": str(export), "data": str(data), "seed": seed,
                                       "batch_size": batch_size, "decoding": "greedy", "limit": limit,
                                       "mcq_prompt_suffix": MCQ_SUFFIX}}
    if splits["vqa"].is_file():
        vqa = _split_vqa(model, data, out, head(read_json_list(splits["vqa"])), batch_size)
        for p in PROTOCOLS:
            results[f"vqa_{p}"] = vqa[p]
    if mcq_files:
        mcq = _split_mcq(model, data, out, {f.stem: head(read_json_list(f)) for f in mcq_files}, batch_size)
        for p in PROTOCOLS:
            results[f"omnimedvqa_{p}"] = mcq[p]
    if splits["diagseg"].is_file():
        results["diagseg"] = _split_diagseg(model, data, out, head(read_json_list(splits["diagseg"])), batch_size)
    results["run"]["wall_time_s"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    table = render_report(results)
    (out / "report.md").write_text(table, encoding="utf-8")
    return {**results, "table": table, "out": str(out)}


def _fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))


def render_report(results: Mapping[str, Any]) -> str:
    """Markdown tables of the evaluation results (percentages)."""
    run = results["run"]
    lines = ["# medsight evaluation", "",
             f"export `{run['export']}`, data `{run['data']}`, greedy decoding, seed {run['seed']}, "
             f"batch {run['batch_size']}" + (f", first {run['limit']} items per split" if run.get("limit") else ""),
             ""]
    if "vqa_official" in results:
        lines += ["## VQA (closed accuracy, open recall/precision/F1, overall = mean of closed hit / open recall)",
                  "", "| protocol | closed acc | open recall | open precision | open F1 | overall | n closed | n open |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in PROTOCOLS:
            r = results[f"vqa_{p}"]
            lines.append(f"| {p} | " + " | ".join(_fmt(r[k]) for k in ("closed_accuracy", "open_recall",
                         "open_precision", "open_f1", "overall", "n_closed", "n_open")) + " |")
        lines.append("")
    if "omnimedvqa_official" in results:
        names = list(results["omnimedvqa_official"]["per_file"])
        lines += ["## Multiple choice (OmniMedVQA-style accuracy per modality file)", "",
                  "| protocol | " + " | ".join(names) + " | macro | micro | n |",
                  "|---|" + "---|" * (len(names) + 3)]
        for p in PROTOCOLS:
            r = results[f"omnimedvqa_{p}"]
            lines.append(f"| {p} | " + " | ".join(_fmt(r["per_file"][k]["accuracy"]) for k in names)
                         + f" | {_fmt(r['accuracy_macro'])} | {_fmt(r['accuracy_micro'])} | {r['n']} |")
        lines.append("")
    if "diagseg" in results:
        r = results["diagseg"]
        lines += ["## DiagSeg (diagnosis recall; Dice of emitted masks, no mask = 0)", "",
                  "| modality | diagnosis recall | Dice | n | no mask emitted | no GT mask |", "|---|---|---|---|---|---|"]
        for m, s in r["per_modality"].items():
            lines.append(f"| {m} | {_fmt(s['diagnosis_recall'])} | {_fmt(s['dice'])} | {s['n']} | "
                         f"{s['n_no_mask']} | {s['n_no_target']} |")
        lines.append(f"| **all** | {_fmt(r['diagnosis_recall'])} | macro {_fmt(r['dice_macro'])} / micro "
                     f"{_fmt(r['dice_micro'])} | {r['n']} | {r['n_no_mask']} | {r['n_no_target']} |")
        lines.append("")
    lines.append(f"wall time {run.get('wall_time_s', '?')} s")
    return "\n".join(lines) + "\n"
