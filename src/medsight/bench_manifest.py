"""Benchmark (not a test): what verifying an export costs next to reading it, on a synthesised export of
Qwen3-8B size in bf16 (~16.4 GB, one `llm.safetensors` like a stage-3 export), as one JSON object.

    python -m medsight.bench_manifest --dir /path/with/20GB/free [--out bench/manifest.json] [--keep]

Measures: writing through medsight.manifest (streamed, hashed while written), a cold sequential read of the
file (its pages dropped from the page cache with posix_fadvise first), a cold and a warm (page-cached)
verification against the manifest, one-thread sha256 throughput and, with --load, loading into memory cold
with safetensors' `load_file` (unverified) vs `verify_file` then `load_file` (what `load_component` does;
the load then reads from the page cache the verification filled). The export is deleted afterwards
unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from medsight import manifest

#: Qwen3-8B: 36 decoder layers, hidden 4096, 8 KV heads of 128, MLP 12288, vocabulary 151936, untied lm_head
LAYERS, HIDDEN, KV, MLP, VOCAB = 36, 4096, 1024, 12288, 151936


def qwen3_8b_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN),
                                          "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
                       p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,),
                       p + "mlp.gate_proj.weight": (MLP, HIDDEN), p + "mlp.up_proj.weight": (MLP, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, MLP), p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,)})
    return shapes


class LazyWeights(Mapping):
    """bf16 tensors made on access (one at a time in memory), filled with a cheap non-constant pattern."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        n = 1
        for d in self.shapes[name]:
            n *= d
        t = torch.empty(n, dtype=torch.int16)
        t[: min(n, 4096)] = torch.arange(min(n, 4096), dtype=torch.int16)
        return t.view(torch.bfloat16).view(self.shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="folder for the synthesised export (needs ~17 GB free)")
    ap.add_argument("--out", default="bench/manifest.json")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 36 layers (smoke runs)")
    ap.add_argument("--load", action="store_true", help="also time loading into memory (needs that much free RAM)")
    a = ap.parse_args(argv)
    shapes = qwen3_8b_shapes()
    if a.scale < 1:
        keep = int(LAYERS * a.scale)
        shapes = {k: v for k, v in shapes.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < keep}
        shapes["model.embed_tokens.weight"] = shapes["lm_head.weight"] = (int(VOCAB * a.scale), HIDDEN)
    export = Path(a.dir) / "bench_export"
    free = shutil.disk_usage(a.dir).free
    need = sum(2 * torch.Size(s).numel() for s in shapes.values())
    if free < need * 1.1:
        raise SystemExit(f"{a.dir}: {free / 1e9:.1f} GB free, the export needs {need / 1e9:.1f} GB")
    res: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "params": need // 2, "bytes": need}
    try:
        t0 = time.perf_counter()
        with manifest.staged_dir(export) as out:
            out.write_safetensors("llm.safetensors", LazyWeights(shapes))
        res["write_hashed_s"] = time.perf_counter() - t0
        f = export / "llm.safetensors"
        _drop_cache(f)
        res["read_cold_s"] = _read(f)
        _drop_cache(f)
        manifest._verified.clear()
        t0 = time.perf_counter()
        manifest.verify_file(export, "llm.safetensors")
        res["verify_cold_s"] = time.perf_counter() - t0
        manifest._verified.clear()
        t0 = time.perf_counter()
        manifest.verify_file(export, "llm.safetensors")
        res["verify_warm_s"] = time.perf_counter() - t0  # pages cached as far as memory allows
        res["read_warm_s"] = _read(f)
        if a.load:  # loading into memory (needs the export's size in free RAM): safetensors vs verified
            from safetensors.torch import load_file

            def touch(state: dict) -> None:  # read one byte of every page: mmap-backed tensors are lazy
                for t in state.values():
                    if t.numel():
                        t.reshape(-1).view(torch.uint8)[::4096].sum()

            _drop_cache(f)
            t0 = time.perf_counter()
            state = load_file(str(f))
            touch(state)
            res["load_file_cold_s"] = time.perf_counter() - t0
            del state
            _drop_cache(f)
            manifest._verified.clear()
            t0 = time.perf_counter()
            manifest.verify_file(export, "llm.safetensors")  # what load_component does: verify, then load
            state = load_file(str(f))
            touch(state)
            res["load_verified_cold_s"] = time.perf_counter() - t0
            del state
            res["load_verified_over_load_file"] = res["load_verified_cold_s"] / res["load_file_cold_s"]
        block = os.urandom(256 << 20)
        t0 = time.perf_counter()
        hashlib.sha256(block).digest()
        res["sha256_one_thread_GBps"] = len(block) / (time.perf_counter() - t0) / 1e9
        res["read_cold_GBps"] = need / res["read_cold_s"] / 1e9
        res["verify_cold_over_read_cold"] = res["verify_cold_s"] / res["read_cold_s"]
    finally:
        if not a.keep:
            shutil.rmtree(export, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    logging.getLogger("medsight").info(json.dumps(main(), indent=2))
