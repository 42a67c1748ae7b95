"""Benchmark plumbing (never timings): the no-cache baseline decodes the same tokens as the KV-cache loop
it is compared with, the fixed-length switch restores the model, the loss-memory probe runs, and
`medsight.bench_gpu --smoke` writes every key the GPU run writes."""

from __future__ import annotations

import json
import math

import torch

from medsight.bench_llm import fixed_length, generate_without_cache, instruct_conversations
from tests.test_joint import small_joint


def test_no_cache_baseline_decodes_what_the_kv_cache_loop_decodes(tmp_path, synthetic_root):
    model, cfg = small_joint(tmp_path)
    model.eval()
    convs = instruct_conversations(synthetic_root, 2, model.code_tokens)
    assert all("<mask>" not in t["value"] for c in convs for t in c)
    images = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size)
    feats, regions = model.encode_images(images)
    stops = model.stop_ids()
    with fixed_length(model):
        _, cached = model.generate(feats, regions, convs, max_new_tokens=5)
    assert model.stop_ids() == stops  # the switch is undone
    assert [len(g) for g in cached] == [5, 5]
    plain = generate_without_cache(model, feats, regions, convs, 5)
    assert plain.tolist() == cached


def test_loss_memory_probe_runs_both_ways():
    from medsight.bench_loss import run

    pts = run("points", points=64, masks=2, logit_size=8, mask_size=32)
    full = run("full", masks=2, logit_size=8, mask_size=32)
    assert pts["points"] == 64 and full["points"] == 32 * 32
    assert math.isfinite(pts["loss"]) and math.isfinite(full["loss"]) and pts["peak_mb"] >= 0


def test_bench_gpu_smoke_writes_the_gpu_keys(tmp_path):
    from medsight.bench_gpu import main

    out = tmp_path / "gpu.json"
    main(["--smoke", "--peak-tflops", "1", "--out", str(out), "--repeats", "1"])
    res = json.loads(out.read_text())
    s1 = res["stage1_step"]["ours"]
    assert s1["images_per_s"] > 0 and s1["peak_mem_mb"] > 0 and s1["batch"] >= 1
    assert "reference" in res["stage1_step"]
    for case in ("qwen3_8b_lora", "qwen3_1_7b_full"):
        r = res["stage3_step"][case]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_mb"] > 0
    lora, full = res["stage3_step"]["qwen3_8b_lora"], res["stage3_step"]["qwen3_1_7b_full"]
    assert lora["trainable_params"] < full["trainable_params"]
    g = res["generation"]
    assert g["tokens_per_s_batch1"] > 0 and g["tokens_per_s_batch32"] > 0 and g["mask_decode_ms_per_code"] > 0
