"""The generation harness behind `medsight eval run`: load an export, answer every test set of a data
root (VQA, OmniMedVQA multiple choice, DiagSeg with masks), write the prediction files, score them with
medsight.scoring and render the report.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medsight.metrics.vqa import PROTOCOLS, gt_answer
from medsight.scoring import EvalInputError, read_json_list, score_diagseg_file, score_mcq_file, score_vqa_file

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
