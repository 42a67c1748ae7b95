"""The paper's benchmark suite: each set read from its distributed layout (`medsight.data.formats`), answered
with the reference's prompts, scored with the same code as `medsight eval vqa|mcq|diagseg`, both protocols.

    medsight eval run --export E --benchmark vqa-rad,slake,pathvqa,omnimedvqa,diagseg|all --data PATH
                      [--out DIR] [--limit N] [--modalities paper|all] [--path-map OLD=NEW ...]

With one benchmark PATH is that set's PATH (see BENCHMARKS); with several, PATH is a folder holding each under
its usual name (VQA-RAD/, SLAKE/, PathVQA/pvqa/, OmniMedVQA/, DiagSeg/SegVQA_Diagnostic_test_vqa.json; the
set's PATH itself is also accepted). Per set: `<out>/<set>/answers.jsonl` (OmniMedVQA:
`answers_<modality>.jsonl`), lines {question_id, prompt, text, gt_ans, metadata} in GT order (DiagSeg lines
also carry `masks`, files under `<out>/diagseg/masks/`), and the GT file that was scored (`gt.json`,
`gt_<modality>.json`: the items asked, authors' paths rewritten); `<out>/results.json` and `<out>/report.md`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsight.data import DataError
from medsight.data.formats import read_format
from medsight.data.formats.common import PathMap, Sample, as_path_map
from medsight.data.formats.omnimedvqa import ALL_MODALITIES, PAPER_MODALITIES
from medsight.metrics.vqa import PROTOCOLS
from medsight.scoring import EvalInputError, score_diagseg_file, score_mcq_file, score_vqa_file

log = logging.getLogger(__name__)

#: The reference's OmniMedVQA suffix, appended to the bare question; the options are NOT shown.
MCQ_SUFFIX = ". Answer this question shortly by only selecting one option."


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set: its layout, how it is scored, where its PATH usually sits and where to get it."""

    name: str
    format: str  # medsight.data.formats.FORMATS key
    scorer: str  # vqa | mcq | diagseg (the `medsight eval` sub-command that scores it)
    subpaths: tuple[str, ...]  # where it sits under a --data folder holding several sets
    source: str  # where to get it


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("vqa-rad", "vqa-rad", "vqa", ("VQA-RAD", "VQA_RAD", "vqa-rad"),
              "https://osf.io/89kps/ (VQA_RAD Dataset Public.json + VQA_RAD Image Folder/)"),
    Benchmark("slake", "slake", "vqa", ("SLAKE", "Slake1.0", "Slake", "slake"),
              "https://huggingface.co/datasets/BoKelvin/SLAKE ({train,validation,test}.json + imgs.zip)"),
    Benchmark("pathvqa", "pathvqa", "vqa", ("PathVQA/pvqa", "pvqa", "PathVQA"),
              "https://github.com/UCSD-AI4H/PathVQA (pvqa/qas/*/*_qa.pkl + pvqa/images/)"),
    Benchmark("omnimedvqa", "omnimedvqa", "mcq", ("OmniMedVQA/OmniMedVQA", "OmniMedVQA"),
              "https://huggingface.co/datasets/foreverbeliever/OmniMedVQA (OmniMedVQA.zip, open-access part)"),
    Benchmark("diagseg", "diagseg", "diagseg",
              ("DiagSeg/SegVQA_Diagnostic_test_vqa.json", "SegVQA_Diagnostic_test_vqa.json"),
              "https://huggingface.co/datasets/Caf0914/DiagSeg (with the BiomedParse test images and masks)"),
)}
PAPER_SETS = tuple(BENCHMARKS)


def benchmark_names(spec: str) -> list[str]:
    """'all' or a comma list -> names (synthetic: today's synthetic test splits); unknown ones are an error."""
    names = list(PAPER_SETS) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in BENCHMARKS and n != "synthetic"]
    if bad or not names:
        raise EvalInputError(f"unknown benchmark(s) {bad or spec!r}; choose from {', '.join(BENCHMARKS)}, synthetic "
                             "or all")
    return names


def _looks_like(b: Benchmark, p: Path) -> bool:
    if b.format == "diagseg":
        return p.is_file()
    marks = {"vqa-rad": ("VQA_RAD Dataset Public.json", "test.json"), "slake": ("test.json",),
             "pathvqa": ("qas", "test.json"), "omnimedvqa": ("QA_information",)}[b.format]
    return p.is_dir() and any((p / m).exists() for m in marks)


def locate(b: Benchmark, data: Path) -> Path:
    """The set's PATH: `data` itself, or one of its usual names under `data`."""
    for cand in (data, *(data / s for s in b.subpaths)):
        if _looks_like(b, cand):
            return cand
    raise EvalInputError(f"{data}: no {b.name} data here (looked for it as PATH and under "
                         f"{', '.join(b.subpaths)}); get it from {b.source}")


def prompt_of(b: Benchmark, s: Sample) -> str:
    """The reference's prompt: the bare question (VQA, DiagSeg); OmniMedVQA question + MCQ_SUFFIX."""
    q = s.question or ""
    return q + MCQ_SUFFIX if b.scorer == "mcq" else q


def _generate(model: Any, samples: list[Sample], prompts: list[str], batch_size: int, desc: str) -> list[dict]:
    """Greedy answers in GT order; an image that does not load is an error naming it (never a text-only answer)."""
    from tqdm.auto import tqdm

    from medsight.data.io import load_image

    out: list[dict] = []
    with tqdm(total=len(samples), desc=desc, unit="q", disable=None, file=sys.stderr) as bar:
        for i in range(0, len(samples), batch_size):
            batch = samples[i:i + batch_size]
            images = []
            for s in batch:
                try:
                    images.append(load_image(s.image))
                except DataError as e:
                    raise DataError(f"{s.image}: cannot read the image of item {s.id} of {s.source} ({e})",
                                    path=s.image, field="image") from None
            answers = model.answer_batch(images, prompts[i:i + batch_size])
            if len(answers) != len(batch):
                raise RuntimeError(f"answer_batch returned {len(answers)} answers for {len(batch)} questions")
            out.extend(answers)
            bar.update(len(batch))
    return out


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def run_vqa(b: Benchmark, model: Any, samples: list[Sample], out: Path, batch_size: int) -> dict:
    prompts = [prompt_of(b, s) for s in samples]
    answers = _generate(model, samples, prompts, batch_size, b.name)
    rows = [{"question_id": s.extra["qid"], "prompt": p, "text": a["text"], "gt_ans": s.answer, "metadata": {}}
            for s, p, a in zip(samples, prompts, answers)]
    pred = _jsonl(out / "answers.jsonl", rows)
    gt = _json(out / "gt.json", [{"id": s.extra["qid"], "image": s.image, "answer_type": s.answer_type,
                                  "conversations": [{"from": "human", "value": s.question},
                                                    {"from": "gpt", "value": s.answer}]} for s in samples])
    return {p: score_vqa_file(gt, pred, p) for p in PROTOCOLS}


def run_mcq(b: Benchmark, model: Any, samples: list[Sample], out: Path, batch_size: int,
            modalities: Sequence[str]) -> dict:
    per: dict[str, dict] = {}
    for m in modalities:
        items = [s for s in samples if s.extra["modality_group"] == m]
        if not items:
            continue
        prompts = [prompt_of(b, s) for s in items]
        answers = _generate(model, items, prompts, batch_size, f"{b.name}/{m}")
        rows = [{"question_id": s.extra["qid"], "prompt": p, "text": a["text"], "gt_ans": s.answer, "metadata": {}}
                for s, p, a in zip(items, prompts, answers)]
        pred = _jsonl(out / f"answers_{m}.jsonl", rows)
        gt = _json(out / f"gt_{m}.json", [s.extra["row"] for s in items])
        per[m] = {p: score_mcq_file(gt, pred, p) for p in PROTOCOLS}
    res: dict[str, Any] = {}
    for p in PROTOCOLS:
        accs = {m: r[p]["accuracy"] for m, r in per.items()}
        res[p] = {"per_modality": {m: {"accuracy": accs[m], "n": per[m][p]["n"]} for m in per},
                  "mean": float(np.mean(list(accs.values()))) if accs else 0.0,
                  "n": sum(per[m][p]["n"] for m in per)}
    return res


def run_diagseg(b: Benchmark, model: Any, samples: list[Sample], out: Path, batch_size: int) -> dict:
    from PIL import Image

    prompts = [prompt_of(b, s) for s in samples]
    answers = _generate(model, samples, prompts, batch_size, b.name)
    rows, gt_items = [], []
    for s, p, a in zip(samples, prompts, answers):
        files = []
        for i, region in enumerate(a.get("regions", [])):
            name = f"masks/{s.id}_{i}.png"
            (out / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(region["mask"], dtype=bool).astype(np.uint8) * 255).save(out / name)
            files.append(name)
        rows.append({"question_id": s.extra["qid"], "prompt": p, "text": a["text"], "gt_ans": s.extra["short_answer"],
                     "masks": files, "metadata": {"codes": [r.get("code") for r in a.get("regions", [])],
                                                  "image_index": [r.get("image_index", 0) for r in
                                                                  a.get("regions", [])]}})
        row = dict(s.extra["row"])  # authors' paths as resolved (path map applied)
        row["image_file"] = s.image
        ids = [str(x) for e in row["mask_ids"] for x in (e if isinstance(e, list) else [e])]
        flat = {a_id: f for a_id, group in zip(s.ann_ids, s.masks) for a_id, f in zip(a_id.split("+"), group)}
        row["masks"] = [[m[0], flat.get(str(m[0]), m[1])] for m in row["masks"] if str(m[0]) in ids]
        gt_items.append(row)
    pred = _jsonl(out / "answers.jsonl", rows)
    gt = _json(out / "gt.json", gt_items)
    return {p: score_diagseg_file(gt, pred, protocol=p) for p in PROTOCOLS}


def run_benchmarks(export: str | Path, benchmarks: str | Sequence[str], data: str | Path,
                   out: str | Path | None = None, limit: int | None = None, batch_size: int = 8, seed: int = 0,
                   modalities: str = "paper", path_map: PathMap | dict | None = None, model: Any = None,
                   device: str | None = None) -> dict:
    """Generate on each benchmark, score with both protocols, write answers, results.json and report.md.
    `model` (anything with `answer_batch`) replaces loading `export`, for tests."""
    from medsight.evaluate import _seed_everything, default_eval_dir, load_for_eval, run_evaluation

    names = benchmark_names(benchmarks) if isinstance(benchmarks, str) else list(benchmarks)
    data = Path(data)
    if modalities not in ("paper", "all"):
        raise EvalInputError(f"--modalities must be paper or all, got {modalities!r}")
    mods = PAPER_MODALITIES if modalities == "paper" else ALL_MODALITIES
    pmap = as_path_map(path_map)
    out = Path(out) if out is not None else default_eval_dir(export)
    located = {n: locate(BENCHMARKS[n], data) for n in names if n != "synthetic"}  # fail before loading
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed)
    model = model if model is not None else load_for_eval(export, device)
    results: dict[str, Any] = {"run": {"export": str(export), "data": str(data), "benchmarks": names, "seed": seed,
                                       "batch_size": batch_size, "decoding": "greedy", "limit": limit,
                                       "modalities": list(mods), "mcq_prompt_suffix": MCQ_SUFFIX}}
    t0 = time.time()
    for name in names:
        if name == "synthetic":
            syn = run_evaluation(export, data=data, out=out / "synthetic", batch_size=batch_size, seed=seed,
                                 limit=limit, model=model)
            results["synthetic"] = {k: v for k, v in syn.items() if k not in ("table", "out", "run")}
            continue
        b = BENCHMARKS[name]
        opts: dict[str, Any] = {"modalities": list(mods)} if b.format == "omnimedvqa" else {}
        samples = read_format(b.format, located[name], "test", path_map=pmap, **opts).samples
        samples = samples if limit is None else samples[:limit]
        if not samples:
            raise EvalInputError(f"{located[name]}: no {name} test items")
        runner: Callable[..., dict] = {"vqa": run_vqa, "diagseg": run_diagseg}.get(b.scorer, run_mcq)
        extra = (mods,) if b.scorer == "mcq" else ()
        results[name] = {"path": str(located[name]), **runner(b, model, samples, out / name, batch_size, *extra)}
    results["run"]["wall_time_s"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    table = render_benchmarks(results)
    (out / "report.md").write_text(table, encoding="utf-8")
    return {**results, "table": table, "out": str(out)}


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def render_benchmarks(results: dict) -> str:
    """Markdown laid out like the paper's tables (percentages): VQA close/all per set, OmniMedVQA per modality
    and mean, DiagSeg diagnosis recall and Dice per modality."""
    run = results["run"]
    lines = ["# medsight benchmarks", "", f"export `{run['export']}`, greedy decoding, seed {run['seed']}"
             + (f", first {run['limit']} items per set" if run.get("limit") else ""), ""]
    vqa = [n for n in ("vqa-rad", "slake", "pathvqa") if n in results]
    if vqa:
        lines += ["## VQA (close = closed accuracy, all = overall)", "",
                  "| protocol | " + " | ".join(f"{n} close | {n} all" for n in vqa) + " |",
                  "|---|" + "---|---|" * len(vqa)]
        for p in PROTOCOLS:
            lines.append(f"| {p} | " + " | ".join(f"{_f(results[n][p]['closed_accuracy'])} | "
                                                 f"{_f(results[n][p]['overall'])}" for n in vqa) + " |")
        lines.append("")
    if "omnimedvqa" in results:
        mods = list(results["omnimedvqa"]["official"]["per_modality"])
        lines += ["## OmniMedVQA (accuracy per modality)", "", "| protocol | " + " | ".join(mods) + " | mean | n |",
                  "|---|" + "---|" * (len(mods) + 2)]
        for p in PROTOCOLS:
            r = results["omnimedvqa"][p]
            lines.append(f"| {p} | " + " | ".join(_f(r["per_modality"][m]["accuracy"]) for m in mods)
                         + f" | {_f(r['mean'])} | {r['n']} |")
        lines.append("")
    if "diagseg" in results:
        mods = list(results["diagseg"]["official"]["per_modality"])
        lines += ["## DiagSeg (diagnosis recall / Dice per modality)", "",
                  "| protocol | " + " | ".join(mods) + " | all |", "|---|" + "---|" * (len(mods) + 1)]
        for p in PROTOCOLS:
            r = results["diagseg"][p]
            lines.append(f"| {p} | " + " | ".join(f"{_f(r['per_modality'][m]['diagnosis_recall'])} / "
                                                 f"{_f(r['per_modality'][m]['dice'])}" for m in mods)
                         + f" | {_f(r['diagnosis_recall'])} / {_f(r['dice_micro'])} |")
        lines.append("")
    lines.append(f"wall time {run.get('wall_time_s', '?')} s")
    return "\n".join(lines) + "\n"


__all__ = ["BENCHMARKS", "MCQ_SUFFIX", "Benchmark", "benchmark_names", "locate", "render_benchmarks",
           "run_benchmarks"]
