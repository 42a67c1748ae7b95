"""Peak memory of the stage-1 set loss at the paper's mask size, one way per process (a process's peak
cannot be split): 20 queries of 192 px logits against 1024 px GT masks, forward + backward, either on
`loss.num_points` sampled points (medsight's default at paper scale) or at full resolution (every logit map
bilinearly upsampled to 1024 px first, as the reference code does).

    python -m medsight.bench_loss --mode points|full [--points 12544] [--masks 16]

Prints one JSON object; `peak_mb` is the process's peak resident memory during the loss above what it
held just before it (inputs already built), so it is the loss's own working memory. The peak is reset
before the loss through /proc/self/clear_refs where the kernel offers it (`peak_reset` says whether).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(mode: str, points: int = 12544, masks: int = 16, logit_size: int = 192, mask_size: int = 1024,
        batch: int = 2, queries: int = 20) -> dict:
    """Build the inputs, then measure one forward + backward of the loss in this process."""
    from medsight.models.matching import SetCriterion

    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, queries, logit_size, logit_size, generator=g) * 3).requires_grad_()
    cls = torch.randn(batch, queries, 18, generator=g).requires_grad_()
    gt = torch.randint(0, 10, (batch, masks, mask_size, mask_size), generator=g, dtype=torch.uint8) > 6  # bool
    labels = torch.randint(1, 17, (batch, masks), generator=g)
    valid = torch.ones(batch, masks, dtype=torch.bool)
    weights = {"class": 2.0, "bce": 5.0, "dice": 5.0, "no_object": 0.1}
    crit = SetCriterion(17, weights, num_points=points if mode == "points" else 0)
    reset = _reset_peak()
    before = _rss_mb() if reset else max(_rss_mb(), _peak_mb())  # without a reset the build's peak counts
    pred = logits if mode == "points" else F.interpolate(logits, size=(mask_size, mask_size), mode="bilinear",
                                                         align_corners=False)
    losses, _ = crit({"pred_masks": pred, "pred_logits": cls}, labels, gt, valid)
    losses["loss"].backward()
    return {"mode": mode, "points": points if mode == "points" else mask_size * mask_size,
            "logit_size": logit_size, "mask_size": mask_size, "masks": masks, "batch": batch,
            "peak_mb": _peak_mb() - before, "peak_reset": reset, "loss": float(losses["loss"].detach())}


def in_subprocess(mode: str, **kw) -> dict:
    """`run` in a fresh interpreter, so that each way's peak is its own."""
    args = [sys.executable, "-m", "medsight.bench_loss", "--mode", mode]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m medsight.bench_loss", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["points", "full"], required=True)
    ap.add_argument("--points", type=int, default=12544)
    ap.add_argument("--masks", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    res = run(args.mode, args.points, args.masks)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
