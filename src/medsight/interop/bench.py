"""Benchmark: peak resident memory of `medsight import official` and of `medsight.load` on a randomly
initialised LLM directory in the released layout (>= 1B parameters, bf16, sharded) against its size on disk.

    python -m medsight.interop.bench [--params 1.04e9] [--workdir /tmp/medsight_import_bench] [--out FILE]

Writes one JSON object (stdout, and --out). Import and load each run in a fresh subprocess (peak RSS: its
VmHWM, Linux); `baseline` is a subprocess that only imports what they import. The work directory is deleted
at the end (--keep keeps it). Nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

VISION_WIDTH = 64  # tiny encoder and perceiver: the LLM dominates the memory


def qwen3_fields(params: float) -> dict[str, Any]:
    """A Qwen3 shape with about `params` parameters (hidden 2048, 6144 MLP, vocab 32768, untied head)."""
    h, inter, vocab = 2048, 6144, 32768
    per_layer = 2 * h * h + 2 * h * (h // 2) + 3 * h * inter + 4 * 128 + 2 * h  # q,o + k,v + MLP + norms
    layers = max(1, math.ceil((params - 2 * vocab * h) / per_layer))
    return dict(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)


def write_released(root: Path, params: float, shard_bytes: int = 512 << 20) -> dict[str, Any]:
    """Random released-layout files under `root`: `llm/` (llava_qwen config, bf16 shards written one at a
    time, a tokenizer with code tokens), `vision/` (a tiny HF CLIP) and `perceiver.pt`."""
    import argparse as ap

    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from medsight.models.perceiver_reference import ReferenceRegionPerceiver

    llm = root / "llm"
    llm.mkdir(parents=True)
    fields = qwen3_fields(params)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Qwen3ForCausalLM(Qwen3Config(**fields)).state_dict().items()}
    extra = {"model.mm_projector.0.weight": (fields["hidden_size"], VISION_WIDTH),
             "model.mm_projector.0.bias": (fields["hidden_size"],),
             "model.mm_projector.2.weight": (fields["hidden_size"], fields["hidden_size"]),
             "model.mm_projector.2.bias": (fields["hidden_size"],),
             "model.token_projection.0.weight": (fields["hidden_size"], fields["hidden_size"]),
             "model.token_projection.0.bias": (fields["hidden_size"],),
             "model.token_projection.2.weight": (VISION_WIDTH, fields["hidden_size"]),
             "model.token_projection.2.bias": (VISION_WIDTH,)}
    shapes.update(extra)
    shard: dict[str, torch.Tensor] = {}
    size, count, weight_map, n_params = 0, 0, {}, 0
    keys = list(shapes)
    for i, key in enumerate(keys):
        t = torch.randn(shapes[key], dtype=torch.bfloat16) * 0.02
        shard[key] = t
        size += t.numel() * 2
        n_params += t.numel() if key not in extra else 0
        if size >= shard_bytes or i == len(keys) - 1:  # one shard in memory at a time
            count += 1
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(llm / name))
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0
    (llm / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (llm / "config.json").write_text(json.dumps({**fields, "model_type": "llava_qwen", "rope_theta": 1e6,
                                                 "torch_dtype": "bfloat16", "mm_vision_select_layer": -2,
                                                 "mm_hidden_size": VISION_WIDTH, "mm_projector_type": "mlp2x_gelu"}))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["where is the liver", "the liver is here"], trainer=trainers.BpeTrainer(
        vocab_size=64, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")
    fast.add_tokens([f"[M{g}_{k}]" for g in range(18) for k in range(32)], special_tokens=True)
    fast.save_pretrained(str(llm))

    CLIPVisionModel(CLIPVisionConfig(hidden_size=VISION_WIDTH, num_hidden_layers=2, num_attention_heads=1,
                                     intermediate_size=4 * VISION_WIDTH, patch_size=14, image_size=336,
                                     hidden_act="quick_gelu")).save_pretrained(root / "vision")
    p = ReferenceRegionPerceiver(in_dim=VISION_WIDTH, dim=VISION_WIDTH, num_queries=20, num_stages=1, heads=1,
                                 head_dim=64, ff_mult=4, num_classes=17)
    torch.save({"model": released_perceiver_keys(p), "steps": 1,
                "args": ap.Namespace(num_stacks=1, use_self_attn=False, up_sample_mode="conv")}, root / "perceiver.pt")
    return {"llm_params": n_params, "llm_layers": fields["num_hidden_layers"]}


def released_perceiver_keys(p) -> dict[str, torch.Tensor]:
    """A ReferenceRegionPerceiver's weights under the released names (the inverse of the import mapping)."""
    from medsight.interop.reference_perceiver import _map_one

    ours = p.state_dict()
    names = ["region_queries", "segmentation_cls_head.proj.weight", "segmentation_cls_head.proj.bias",
             "segmentation_cls_head.class_embed.weight", "segmentation_cls_head.class_embed.bias"]
    for blk in ("init_cross_attn", ):
        names += [f"{blk}.{n}.{w}" for n in ("norm_latents", "norm_media") for w in ("weight", "bias")]
        names += [f"{blk}.{n}.weight" for n in ("to_q", "to_kv", "to_out")]
    names += [f"{n}.{w}" for n in ("init_cross_norm", "init_ff_norm", "init_ff.0") for w in ("weight", "bias")]
    names += ["init_ff.1.weight", "init_ff.3.weight"]
    for s in range(len(p.stages)):
        names += [f"conv_adapters.{s}.conv.weight", f"conv_adapters.{s}.conv.bias"]
        for a in ("region_to_image", "image_to_region"):
            names += [f"bi_blocks.{s}.{a}.{n}.{w}" for n in ("norm_latents", "norm_media") for w in ("weight", "bias")]
            names += [f"bi_blocks.{s}.{a}.{n}.weight" for n in ("to_q", "to_kv", "to_out")]
        for n in ("region_to_image_norm", "image_to_region_norm", "ff_region_norm", "ff_image_norm",
                  "ff_region.0", "ff_image.0"):
            names += [f"bi_blocks.{s}.{n}.{w}" for w in ("weight", "bias")]
        names += [f"bi_blocks.{s}.{f}.{i}.weight" for f in ("ff_region", "ff_image") for i in (1, 3)]
    out = {}
    for n in names:
        t = ours[_map_one(n)]
        out[f"region_perceiver.{n}"] = t[None] if n == "region_queries" else t
    return out


_CHILD = {
    "baseline": "import medsight.interop.official, medsight.model, transformers, safetensors",
    "import": ("from medsight.interop.official import import_official; "
               "import_official({root!r} + '/perceiver.pt', {root!r} + '/llm', {root!r} + '/vision', {root!r} + '/export')"),
    # load, then one forward over a few tokens: every weight is read at least once (mmap'd pages count then)
    "load": ("import medsight, torch; m = medsight.load({root!r} + '/export'); lm = m.model.causal_lm(); "
             "torch.no_grad()(lambda: lm(input_ids=torch.tensor([[1, 2, 3]])))(); assert lm.dtype == torch.bfloat16"),
}


def _child_peak_mb(code: str) -> tuple[float, float]:
    """(peak RSS MB, seconds) of `code` run in a fresh interpreter."""
    # VmHWM: this process image's own high-water mark (getrusage's ru_maxrss carries the parent's over fork)
    wrapped = (f"import re, time; t = time.time(); {code}; "
               "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
               "print(int(hwm) / 1024.0, time.time() - t)")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed: {proc.stderr[-2000:]}")
    peak, secs = proc.stdout.strip().splitlines()[-1].split()
    log.info("child done in %.0f s", time.time() - t0)
    return float(peak), float(secs)


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run(params: float, workdir: Path, keep: bool = False) -> dict[str, Any]:
    if workdir.exists():
        shutil.rmtree(workdir)
    try:
        t0 = time.time()
        info = write_released(workdir, params)
        write_s = time.time() - t0
        base, _ = _child_peak_mb(_CHILD["baseline"])
        imp, imp_s = _child_peak_mb(_CHILD["import"].format(root=str(workdir)))
        load, load_s = _child_peak_mb(_CHILD["load"].format(root=str(workdir)))
        return {"llm_params": info["llm_params"], "llm_layers": info["llm_layers"], "dtype": "bfloat16",
                "released_shard_mb": 512, "load_includes": "medsight.load + one 3-token forward",
                "released_llm_dir_mb": round(_dir_mb(workdir / "llm"), 1),
                "export_mb": round(_dir_mb(workdir / "export"), 1), "write_random_s": round(write_s, 1),
                "peak_rss_mb": {"baseline_imports": round(base, 1), "import": round(imp, 1), "load": round(load, 1)},
                "above_baseline_mb": {"import": round(imp - base, 1), "load": round(load - base, 1)},
                "seconds": {"import": round(imp_s, 1), "load": round(load_s, 1)},
                "fp32_copy_would_be_mb": round(info["llm_params"] * 4 / 2**20, 1)}
    finally:
        if not keep and workdir.exists():
            shutil.rmtree(workdir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m medsight.interop.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.04e9, help="LLM parameters (default 1.04e9)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "medsight_import_bench"))
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    result = run(args.params, Path(args.workdir), args.keep)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    sys.stdout.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
