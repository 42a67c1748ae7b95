"""`make demo`: the whole job in one command: data, stage 1, stage 2, stage 3, eval, one prediction.

Each step runs as its own process, exactly as a user would type it, so the demo exercises the real
entry points. At the end it prints one table of the metrics every step reported and where to look.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _run(step: str, cmd: list[str], timings: dict[str, float]) -> None:
    print(f"\n==> [{step}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd)
    timings[step] = time.time() - t0
    if proc.returncode != 0:
        print(f"demo: step '{step}' failed (exit {proc.returncode}); see the output above", file=sys.stderr)
        sys.exit(proc.returncode)
    print(f"<== [{step}] done in {timings[step]:.0f} s", flush=True)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pick_example(data: Path) -> tuple[str, str]:
    """A test image and a grounded question about it: preferably one that names several structures (the
    overlay then shows several labelled masks), else any segmentation request, else a DiagSeg question."""
    dialogues = data / "instruct" / "test.json"
    if dialogues.is_file():
        items = json.loads(dialogues.read_text())
        for prefix in ("Segment all", "Segment the"):
            for item in items:
                question = item["conversations"][0]["value"].replace("<image>", "").strip()
                if question.startswith(prefix) and item.get("mask_orders"):
                    return str(data / item["image"]), question
    diag = data / "diagseg" / "test.json"
    if diag.is_file():
        items = json.loads(diag.read_text())
        if items:
            return str(data / items[0]["image_file"]), items[0]["question"]
    images = sorted((data / "biomedparse").rglob("test/*.png"))
    return str(images[0]), "What abnormality is present in this image? Please segment it."


def _cell(value) -> str:
    """A table value: floats to 3 decimals, counts and text as they are."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def metrics_table(run_root: Path) -> str:
    """Markdown table of the headline numbers of every stage of a run."""
    rows = []
    s1 = _load(run_root / "stage1" / "metrics.json")
    s2 = _load(run_root / "stage2" / "metrics.json")
    s3 = _load(run_root / "stage3" / "metrics.json")
    for name, d, keys in [
        ("stage1", s1, ["val/dice", "val/dice_oracle", "wall_time_s"]),
        ("stage2", s2, ["val/dice_continuous", "val/dice_quantized", "wall_time_s"]),
        ("stage3", s3, ["test/closed_accuracy", "test/open_recall", "test/grounded_dice", "test/diagseg_recall",
                        "test/diagseg_dice", "wall_time_s"]),
    ]:
        for k in keys:
            if k in d:
                rows.append(f"| {name} | {k} | {_cell(d[k])} |")
    ev = _load(run_root / "eval" / "results.json")
    for section, d in ev.items():
        if isinstance(d, dict):
            for k, v in d.items():
                if section == "run" and k != "wall_time_s":  # the settings (seed, batch size), not results
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    rows.append(f"| eval | {section}/{k} | {_cell(v)} |")
    return "| step | metric | value |\n|---|---|---|\n" + "\n".join(rows)


def training_summary(run_root: Path) -> str:
    """One line per stage: its seed, the optimizer steps it trained (per phase for stage 3) and whether a time
    cap cut it short (the default budgets are steps only, so two machines train the same steps)."""
    lines = []
    for stage in ("stage1", "stage2", "stage3"):
        d = _load(run_root / stage / "metrics.json")
        if not d:
            continue
        steps = d.get("steps") or {"": d.get("global_step")}
        capped = d.get("stopped_by_time_cap")
        capped = capped if isinstance(capped, dict) else {"": capped}
        parts = [f"{p + ' ' if p else ''}{n} steps{' (cut by its time cap)' if capped.get(p) else ''}"
                 for p, n in steps.items()]
        lines.append(f"{stage}: seed {d.get('seed', '?')}, {', '.join(parts)}, {d.get('wall_time_s', 0):.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m medsight.demo", description=__doc__)
    ap.add_argument("--run", default="default", help="run name (checkpoints/<run>/)")
    ap.add_argument("--data", default="data/synthetic", help="synthetic dataset folder")
    ap.add_argument("--skip-existing", action="store_true", help="skip stages whose export already exists")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    py = sys.executable
    bindir = Path(py).parent
    medsight_cli = str(bindir / "medsight") if (bindir / "medsight").exists() else None
    cli = [medsight_cli] if medsight_cli else [py, "-m", "medsight.cli"]
    run_root = Path("checkpoints") / args.run
    timings: dict[str, float] = {}
    t0 = time.time()
    _run("data", [py, "-m", "medsight.data.synthetic", "--root", args.data], timings)
    for stage in ("stage1", "stage2", "stage3"):
        if args.skip_existing and (run_root / stage / "export" / "meta.json").is_file():
            print(f"==> [{stage}] export exists, skipped (--skip-existing)")
            continue
        _run(stage, [py, "-m", f"stages.{stage}", f"run_name={args.run}", f"data.root={args.data}"], timings)
    export = run_root / "stage3" / "export"
    _run("eval", [*cli, "eval", "run", "--export", str(export), "--data", args.data], timings)
    image, question = _pick_example(Path(args.data))
    out = run_root / "predict"
    _run("predict", [*cli, "predict", "--export", str(export), "--image", image, "--question", question,
                     "--out", str(out)], timings)
    answer = _load(out / "answer.json")
    print("\n" + "=" * 78)
    print(f"medsight demo finished in {time.time() - t0:.0f} s "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})\n")
    print(training_summary(run_root) + "\n")
    print(metrics_table(run_root))
    print(f"\nexample question: {question}\nanswer: {answer.get('text', '?')}")
    print(f"overlay picture:   {out / 'overlay.png'}")
    print(f"eval report:       {run_root / 'eval' / 'report.md'}")
    print(f"TensorBoard logs:  {run_root}/<stage>/tb   (make tensorboard)")


if __name__ == "__main__":
    main()
