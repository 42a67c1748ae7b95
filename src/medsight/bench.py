"""`make bench`: speed and memory of every hot path on the CPU, as one JSON object.

Every number is a median over repeats measured in this one run (the machine is noisy; compare ratios
within one run, not absolute numbers across runs). Nothing here asserts a speed: tests never time code.

Sections: `data_segmentation` (the default stage-1 loader) and `loader_over_step` (its images/s over the
stage-1 step's), `stage1_step` (+ the other pixel_ffn setting), `stage3_step` (instruct phase of the tiny
joint model), `generation` (greedy decoding of 48 tokens at batch 1 and 8 with the KV cache, the no-cache
baseline and their ratio; mask decoding per code), `loss_memory` (the stage-1 loss at 192 px logits vs
1024 px masks on points and at full resolution, each in its own process), `denormal`.

    python -m medsight.bench [--out bench/results.json] [--repeats 5] [--quick] [key=value config overrides]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from medsight.config import load_config, offline_env


def _median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_data(cfg, repeats: int) -> dict:
    from medsight.data.datamodule import MedicalDataModule

    dm = MedicalDataModule(cfg, task="segmentation")
    t0 = time.perf_counter()
    loader = dm.train_dataloader()
    n = len(dm.dataset("train"))
    cache_s = time.perf_counter() - t0

    def epoch() -> None:
        for _ in loader:
            pass

    sec = _median_time(epoch, repeats)
    return {"images": n, "cache_build_s": cache_s, "epoch_s": sec, "images_per_s": n / sec}


def _paper_like_folder(root: Path, n_images: int, size: int = 1024, masks_per_image: int = 3) -> Path:
    """A BiomedParse-layout folder of `n_images` size x size RGB PNGs (textured, like scans) with their
    binary mask PNGs; returns its meta file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ds = root / "Bench" / "CT"
    for sub in ("train", "train_mask"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    images, anns = [], []
    for i in range(n_images):
        base = (np.sin(xx / (17 + i)) + np.cos(yy / (23 + i))) * 60 + 120
        img = np.clip(base[..., None] + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        name = f"bench_{i:04d}_{i}_CT_abdomen.png"
        Image.fromarray(img).save(ds / "train" / name)
        images.append({"file_name": name, "height": size, "width": size, "id": i})
        for k in range(masks_per_image):
            cy, cx, r = rng.integers(200, size - 200, 2).tolist() + [int(rng.integers(40, 160))]
            m = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).astype(np.uint8) * 255
            mname = f"bench_{i:04d}_{i}_CT_abdomen_organ{k}.png"
            Image.fromarray(m).save(ds / "train_mask" / mname)
            anns.append({"mask_file": mname, "image_id": i, "category_id": 1 + k, "id": len(anns)})
    (ds / "train.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    meta = root / "meta.json"
    meta.write_text(json.dumps({"roots": ["Bench/CT/train"], "mask_roots": ["Bench/CT/train_mask"],
                                "json_paths": ["Bench/CT/train.json"], "modality_labels": [0]}))
    return meta


def bench_paper_preprocessing(repeats: int, n_images: int = 8, image_size: int = 336) -> dict:
    """One DataLoader worker's throughput on paper-scale inputs: 1024 px PNG + 3 mask PNGs -> decode, resize
    to 336 px, normalise (data.cache off: every epoch decodes again, as at 211k images)."""
    import tempfile

    from medsight.data.datamodule import MedicalDataModule

    with tempfile.TemporaryDirectory() as tmp:
        meta = _paper_like_folder(Path(tmp), n_images)
        cfg = load_config("stage1", [], ["data.format=biomedparse", f"data.root={tmp}", f"data.meta={meta}",
                                         f"data.image_size={image_size}", "data.cache=false", "data.val_fraction=0.0",
                                         "data.num_workers=0", "data.modality_groups=[CT,MRI,X-Ray,Dermoscopy]"])
        ds = MedicalDataModule(cfg, task="segmentation").dataset("train")

        def epoch() -> None:
            for i in range(len(ds)):
                ds[i]

        sec = _median_time(epoch, repeats)
    return {"images": n_images, "source_px": 1024, "masks_per_image": 3, "image_size": image_size,
            "images_per_s_per_worker": n_images / sec}


def bench_stage1_step(cfg, repeats: int, batch: int) -> dict:
    """Forward + backward + AdamW step of encoder + perceiver + set loss on one batch."""
    from medsight.models import stage1_components
    from medsight.models.matching import build_criterion
    from medsight.train import adamw

    comps = stage1_components(cfg)
    vision, perceiver = comps["vision"], comps["perceiver"]
    crit = build_criterion(cfg)
    params = list(vision.parameters()) + list(perceiver.parameters())
    opt = adamw(params, 1e-3, cfg)  # the stages' optimizer (optim.impl)
    s = cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, s, s, generator=g)
    masks = (torch.rand(batch, 3, s, s, generator=g) > 0.7).float()
    valid = torch.ones(batch, 3, dtype=torch.bool)
    labels = torch.randint(1, 16, (batch, 3), generator=g)
    timing = {"match_s": 0.0}

    def step() -> None:
        feats, _ = vision(images)
        out = perceiver(feats)
        t0 = time.perf_counter()
        losses, _ = crit(out, labels, masks, valid)
        timing["match_s"] = time.perf_counter() - t0
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()

    sec = _median_time(step, repeats)
    with torch.no_grad():
        feats, _ = vision(images)
        infer = _median_time(lambda: perceiver(feats), repeats)
        q = torch.randn(batch, 7, cfg.perceiver.dim)
        decode = _median_time(lambda: perceiver(feats, queries=q), repeats)
    return {"batch": batch, "train_step_s": sec, "train_images_per_s": batch / sec,
            "loss_incl_matching_s": timing["match_s"], "perceiver_forward_s": infer,
            "decode_7_queries_s": decode,
            "params": {"vision": sum(p.numel() for p in vision.parameters()),
                       "perceiver": sum(p.numel() for p in perceiver.parameters())}}


def bench_denormal(repeats: int) -> dict:
    """Why every entry point calls torch.set_flush_denormal(True): sigmoid + BCE-style arithmetic on
    confident mask logits (|x| ~ 90, where exp(-|x|) is a denormal float), with flushing off and on."""
    logits = torch.linspace(-95.0, -85.0, 2_000_000)
    out = {}
    for flush in (False, True):
        torch.set_flush_denormal(flush)

        def work() -> None:
            p = torch.sigmoid(logits)  # denormal probabilities
            (p * (1 - p) + p * p).sum()

        out[f"flush_{str(flush).lower()}_s"] = _median_time(work, repeats)
    torch.set_flush_denormal(True)
    out["slowdown_without_flush"] = out["flush_false_s"] / out["flush_true_s"]
    return out


def bench_stage3_and_generation(overrides: list[str], repeats: int, new_tokens: int = 48) -> dict:
    """stage3_step (instruct phase, batch 8) and generation (batch 1 and 8, KV cache vs none) of the tiny
    joint model built from the stage-3 config."""
    from medsight.bench_llm import (
        bench_generation,
        bench_joint_step,
        bench_mask_decode,
        instruct_conversations,
        tiny_joint,
    )

    cfg = load_config("stage3", [], overrides)
    with tempfile.TemporaryDirectory() as tok_dir:
        model = tiny_joint(cfg, tok_dir)
    g = torch.Generator().manual_seed(0)
    s, batch = cfg.data.image_size, 8
    images = torch.randn(batch, 3, s, s, generator=g)
    convs = instruct_conversations(cfg.data.root, batch, model.code_tokens)
    masks = (torch.rand(batch, 1, s, s, generator=g) > 0.7).float()
    valid = torch.ones(batch, 1, dtype=torch.bool)
    out = {"stage3_step": bench_joint_step(model, convs, images, masks, valid, repeats, cfg)}
    gen: dict = {"new_tokens": new_tokens}
    for b in (1, 8):
        r = bench_generation(model, images[:b], convs[:b], new_tokens, repeats)
        gen[f"tokens_per_s_batch{b}"] = r["tokens_per_s"]
        gen[f"tokens_per_s_batch{b}_no_cache"] = r["tokens_per_s_no_cache"]
        gen[f"kv_cache_speedup_batch{b}"] = r["kv_cache_speedup"]
    dec = bench_mask_decode(model, images, codes=1, repeats=2 * repeats)
    dec4 = bench_mask_decode(model, images, codes=4, repeats=2 * repeats)
    gen["mask_decode_ms_per_code"] = dec["ms_per_code"]
    gen["mask_decode_ms_per_code_4_codes"] = dec4["ms_per_code"]
    out["generation"] = gen
    return out


def bench_loss_memory(masks: int = 16) -> dict:
    """The stage-1 loss at 192 px logits vs 1024 px masks, each way in its own process (medsight.bench_loss)."""
    from medsight.bench_loss import in_subprocess

    pts, full = in_subprocess("points", masks=masks), in_subprocess("full", masks=masks)
    return {"points_mb": pts["peak_mb"], "full_resolution_mb": full["peak_mb"], "num_points": pts["points"],
            "logit_size": pts["logit_size"], "mask_size": pts["mask_size"], "masks_per_image": masks,
            "batch": pts["batch"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m medsight.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="skip the pixel_ffn comparison and the denormal check")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides (stage1 and stage3 configs)")
    args = ap.parse_args(argv)
    offline_env()
    torch.set_flush_denormal(True)
    cfg = load_config("stage1", [], args.overrides)
    from medsight.data.synthetic import ensure_synthetic

    ensure_synthetic(cfg.data.root)
    results: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "node": platform.node()},
        "config": {"image_size": cfg.data.image_size, "perceiver_dim": cfg.perceiver.dim,
                   "num_queries": cfg.perceiver.num_queries, "num_stages": cfg.perceiver.num_stages,
                   "pixel_ffn": cfg.perceiver.pixel_ffn},
        "repeats": args.repeats,
    }
    results["data_segmentation"] = bench_data(cfg, args.repeats)
    results["stage1_step"] = bench_stage1_step(cfg, args.repeats, args.batch)
    results["loader_over_step"] = (results["data_segmentation"]["images_per_s"]
                                   / results["stage1_step"]["train_images_per_s"])
    if not args.quick:
        other = load_config("stage1", [], [*args.overrides, f"perceiver.pixel_ffn={not cfg.perceiver.pixel_ffn}"])
        alt = bench_stage1_step(other, args.repeats, args.batch)
        results[f"stage1_step_pixel_ffn_{str(not cfg.perceiver.pixel_ffn).lower()}"] = alt
        results["pixel_ffn_off_over_on_speed"] = (
            (alt if cfg.perceiver.pixel_ffn else results["stage1_step"])["train_images_per_s"]
            / (results["stage1_step"] if cfg.perceiver.pixel_ffn else alt)["train_images_per_s"])
    paper = bench_paper_preprocessing(args.repeats)
    paper["stage1_step_train_images_per_s"] = results["stage1_step"]["train_images_per_s"]
    paper["workers_to_keep_up"] = paper["stage1_step_train_images_per_s"] / paper["images_per_s_per_worker"]
    results["data_paper_preprocessing"] = paper
    results.update(bench_stage3_and_generation(args.overrides, args.repeats))
    results["loss_memory"] = bench_loss_memory()
    if not args.quick:
        results["denormal"] = bench_denormal(args.repeats)
    results["peak_rss_mb"] = _peak_rss_mb()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
