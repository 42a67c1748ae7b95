"""`make bench-gpu`: the paper-scale hot paths on one GPU (H100/H200 class), one JSON object, about 4 minutes.

    python -m medsight.bench_gpu --peak-tflops 989 [--out bench/gpu_results.json]
    python -m medsight.bench_gpu --smoke --peak-tflops 1   # the same code at tiny sizes on the CPU (< 2 min)

Sections (medians; nothing asserts a speed):
- `stage1_step`: CLIP ViT-L/14@336 (random init, frozen) + Region Perceiver d=1024, 3 stages (24 -> 192 px
  logits), pixel FF on, set loss on 12,544 points of 1024 px masks, AdamW, bf16 autocast; the batch size is
  the largest power of two that fits a memory and step-time budget (`batch_search`); images/s and peak
  memory for `ours` and, when `medsight.models.perceiver_reference` is importable and the config has
  `perceiver.variant`, for `reference` (else a note says why it was skipped).
- `stage3_step`: instruct-shaped sequences (576 patch + 20 region + 128 text tokens) through a random
  Qwen3-8B-shaped LLM with LoRA (r=16 on every projection; frozen bf16 weights) and a Qwen3-1.7B-shaped one
  trained in full (fp32 weights, AdamW, bf16 autocast): tokens/s, peak memory, MFU.
- `generation`: greedy decoding with a KV cache (the loop of MedSightLM.generate) on the 8B-shaped LLM at
  batch 1 and 32, 48 new tokens after the 724-token prompt; `mask_decode_ms_per_code` of the d=1024 perceiver
  in decode mode.

MFU = tokens/s x FLOPs per token / (peak_tflops x 1e12), peak given explicitly (dense bf16: 989 for H100 SXM
and H200; Lightning's table lists the H200 at its sparse figure). FLOPs per token (PaLM appendix B):
N = parameters every token is multiplied by (all but the input embedding table; a tied table counts once,
as the lm_head); attention = 12 x layers x heads x head_dim x sequence length;
full training: 6N + attention; LoRA: 4N (frozen forward and input gradients) + 6 N_lora + attention.

On a lent device machine (its image has torch, transformers, peft, scipy, PyYAML but not omegaconf), carry
the one missing wheel and run from the source tree:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl omegaconf==2.4.0          # here (.whl/ is git-ignored)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site:src python3 -m medsight.bench_gpu --peak-tflops 989 --out $OUT/gpu.json   # there
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medsight.bench_llm import median_time
from medsight.train import auto_fuses

log = logging.getLogger("medsight")

QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
TINY_LLM = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)


class Device:
    """Where the benchmark runs: synchronisation, autocast and peak-memory bookkeeping."""

    def __init__(self, name: str) -> None:
        self.name, self.cuda = name, name.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast("cuda" if self.cuda else "cpu", dtype=torch.bfloat16)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float:
        """Peak allocated device memory since reset_peak (CPU: the process's peak RSS)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def total_mb(self) -> float:
        return torch.cuda.get_device_properties(0).total_memory / 2**20 if self.cuda else float("inf")

    def free(self) -> None:
        """Collect what the finished case left (reference cycles too) and hand the cached blocks back."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ------------------------------------------------------------------------------------------ stage 1
def stage1_overrides(smoke: bool) -> list[str]:
    if smoke:
        return ["vision.name=tiny", "vision.width=32", "vision.depth=1", "vision.trainable=false",
                "data.image_size=32", "perceiver.dim=32", "perceiver.heads=2", "perceiver.head_dim=16",
                "perceiver.num_stages=3", "perceiver.pixel_ffn=true", "loss.num_points=256"]
    return ["vision.name=clip-vit-l14-336", "vision.trainable=false", "data.image_size=336", "perceiver.dim=1024",
            "perceiver.heads=8", "perceiver.head_dim=64", "perceiver.num_stages=3", "perceiver.pixel_ffn=true",
            "loss.num_points=12544"]


def reference_variant() -> tuple[list[str] | None, str | None]:
    """Overrides that select the reference-equivalent perceiver, or why it is skipped."""
    try:
        import medsight.models.perceiver_reference  # noqa: F401
    except ImportError as err:
        return None, f"skipped: medsight.models.perceiver_reference is not importable ({err})"
    from medsight.config import PerceiverConfig

    if "variant" not in PerceiverConfig.__dataclass_fields__:
        return None, "skipped: the config has no perceiver.variant key to select the reference variant"
    return ["perceiver.variant=reference"], None


def stage1_case(overrides: list[str], dev: Device, mask_size: int, batches: list[int], repeats: int,
                step_budget_s: float) -> dict:
    """Batch search (largest power of two within 80% of memory and `step_budget_s`), then images/s."""
    from medsight.config import load_config
    from medsight.models import stage1_components
    from medsight.models.matching import build_criterion
    from medsight.train import adamw

    cfg = load_config("stage1", [], overrides)
    comps = stage1_components(cfg)
    vision = comps["vision"].to(dev.name).requires_grad_(False).eval()
    perceiver = comps["perceiver"].to(dev.name)
    crit = build_criterion(cfg).to(dev.name)
    opt = adamw(perceiver.parameters(), 1e-4, cfg)  # the stages' optimizer (optim.impl)
    s = cfg.data.image_size

    def make_step(b: int):
        g = torch.Generator(device=dev.name).manual_seed(0)
        images = torch.randn(b, 3, s, s, device=dev.name, generator=g)
        masks = torch.rand(b, 3, mask_size, mask_size, device=dev.name, generator=g) > 0.7
        labels = torch.randint(1, 16, (b, 3), device=dev.name, generator=g)
        valid = torch.ones(b, 3, dtype=torch.bool, device=dev.name)

        def step() -> None:
            with dev.autocast():
                with torch.no_grad():
                    feats, _ = vision(images)
                out = perceiver(feats)
                losses, _ = crit(out, labels, masks, valid)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
        return step

    tried, best = [], None
    for b in batches:
        dev.reset_peak()
        try:
            step = make_step(b)
            t0 = time.perf_counter()
            step()
            dev.sync()
            sec = time.perf_counter() - t0  # includes the first call's warm-up: a conservative budget check
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            tried.append({"batch": b, "oom": True})
            dev.free()
            break
        tried.append({"batch": b, "first_step_s": sec, "peak_mb": dev.peak_mb()})
        best = b
        if dev.peak_mb() > 0.4 * dev.total_mb() or sec > step_budget_s:
            break  # the next power of two would pass 80% of memory or the time budget
    if best is None:
        return {"skipped": "batch 1 does not fit", "batch_search": tried}
    dev.reset_peak()
    step = make_step(best)
    sec = median_time(step, repeats, sync=dev.sync)
    res = {"batch": best, "step_s": sec, "images_per_s": best / sec, "peak_mem_mb": dev.peak_mb(),
           "batch_search": tried, "perceiver_params": sum(p.numel() for p in perceiver.parameters())}
    return res  # the models go with this frame; the caller frees the cache


def bench_stage1(dev: Device, smoke: bool, repeats: int) -> dict:
    base = stage1_overrides(smoke)
    batches = [1, 2] if smoke else [1, 2, 4, 8, 16, 32, 64]
    kw = dict(mask_size=64 if smoke else 1024, batches=batches, repeats=repeats,
              step_budget_s=30.0 if smoke else 1.5)
    out = {"ours": stage1_case(base, dev, **kw)}
    dev.free()
    ref, note = reference_variant()
    out["reference"] = stage1_case(base + ref, dev, **kw) if ref else {"skipped": note}
    dev.free()
    return out


# ------------------------------------------------------------------------------------------ stage 3
def qwen3(shape: dict, dev: Device, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**shape, max_position_embeddings=4096, rope_parameters={"rope_type": "default",
                         "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6, bos_token_id=None)
    with torch.device(dev.name):
        return Qwen3ForCausalLM(config).to(dtype)


def flops_per_token(lm, seq_len: int, lora: bool) -> tuple[float, int]:
    """(training FLOPs per token by the module docstring's formula, N)."""
    c = lm.config if not hasattr(lm, "get_base_model") else lm.get_base_model().config
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    base = [p for n, p in lm.named_parameters() if "lora_" not in n]
    n = sum(p.numel() for p in base) - (0 if emb.data_ptr() == head.data_ptr() else emb.numel())
    attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
    if not lora:
        return 6 * n + attn, n
    n_lora = sum(p.numel() for nm, p in lm.named_parameters() if "lora_" in nm)
    return 4 * n + 6 * n_lora + attn, n


def stage3_case(shape: dict, dev: Device, lora: bool, batch: int, seq_len: int, repeats: int, peak_tflops: float
                ) -> dict:
    dev.reset_peak()
    lm = qwen3(shape, dev, torch.bfloat16 if lora else torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        lm.requires_grad_(False)
        lm = get_peft_model(lm, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))
        for n, p in lm.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()  # fp32 adapters, bf16 frozen weights
    params = [p for p in lm.parameters() if p.requires_grad]
    # optim.impl=auto's rule for this one-device bf16 run (fused on a GPU; the smoke run on CPU keeps the loop)
    fused = auto_fuses({p.device.type for p in params}, True, "bf16-mixed", "auto")
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused or None)
    g = torch.Generator(device=dev.name).manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq_len), device=dev.name, generator=g)

    def step() -> None:
        with dev.autocast():
            logits = lm(input_ids=ids, use_cache=False).logits  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec = median_time(step, repeats, sync=dev.sync)
    fpt, n = flops_per_token(lm, seq_len, lora)
    tps = batch * seq_len / sec
    res = {"batch": batch, "seq_len": seq_len, "step_s": sec, "tokens_per_s": tps, "peak_mem_mb": dev.peak_mb(),
           "n_params_for_flops": n, "trainable_params": sum(p.numel() for p in params),
           "flops_per_token": fpt, "mfu": tps * fpt / (peak_tflops * 1e12), "peak_tflops": peak_tflops}
    return res  # the model goes with this frame; the caller frees the cache


# ------------------------------------------------------------------------------------------ decoding
@torch.no_grad()
def decode_tokens_per_s(lm, dev: Device, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Greedy decoding with a DynamicCache, the loop of MedSightLM.generate: prefill, then one token a step
    (through models.decode's direct step where the LLM's layout allows, as there)."""
    from transformers import DynamicCache

    from medsight.models.decode import DirectStep, decode_step

    g = torch.Generator(device=dev.name).manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (batch, prompt_len), device=dev.name, generator=g)
    step = decode_step(lm)

    def run() -> None:
        cache = DynamicCache(config=lm.config)
        with dev.autocast():
            logits = lm(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            pos = torch.full((batch, 1), prompt_len - 1, device=dev.name)
            for _ in range(new_tokens):
                pos = pos + 1
                logits = step(logits.argmax(-1), pos, None, cache)  # no padding: no mask

    sec = median_time(run, repeats, sync=dev.sync)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "s": sec,
            "tokens_per_s": batch * new_tokens / sec, "decode": "direct" if isinstance(step, DirectStep) else "hf"}


@torch.no_grad()
def mask_decode_ms(dev: Device, smoke: bool, repeats: int) -> float:
    """The paper-scale perceiver in decode mode: one code's query on one image's features, ms."""
    from medsight.config import load_config
    from medsight.models.perceiver import build_perceiver

    cfg = load_config("stage1", [], stage1_overrides(smoke))
    d = cfg.perceiver.dim
    perceiver = build_perceiver(cfg, d).to(dev.name).eval()
    side = 2 if smoke else 24
    feats = torch.randn(1, side, side, d, device=dev.name)
    q = torch.randn(1, 1, d, device=dev.name)

    def run() -> None:
        with dev.autocast():
            perceiver(feats, queries=q)

    return median_time(run, repeats, sync=dev.sync) * 1e3


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m medsight.bench_gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak-tflops", type=float, required=True,
                    help="the device's dense bf16 peak in TFLOP/s (989 for H100 SXM / H200)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, the same code and keys")
    ap.add_argument("--out", default="bench/gpu_results.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from medsight.config import offline_env

    offline_env()
    if args.smoke:
        dev = Device("cpu")
        torch.set_flush_denormal(True)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu needs a CUDA device (use --smoke on a CPU)")
        dev = Device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    res: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "machine": {"device": torch.cuda.get_device_name(0) if dev.cuda else platform.processor() or "cpu",
                             "torch": torch.__version__, "python": platform.python_version(),
                             "node": platform.node()},
                 "smoke": args.smoke, "peak_tflops": args.peak_tflops, "repeats": args.repeats}
    res["stage1_step"] = bench_stage1(dev, args.smoke, args.repeats)
    from medsight.models.llm import qwen3_8b_config

    big = TINY_LLM if args.smoke else qwen3_8b_config()
    big = {k: big[k] for k in TINY_LLM} | {"tie_word_embeddings": False}  # the Qwen3-8B shape (untied head)
    small = (TINY_LLM | {"tie_word_embeddings": True}) if args.smoke else QWEN3_1_7B
    seq = 40 if args.smoke else 576 + 20 + 128
    res["stage3_step"] = {}
    for name, shape, lora in (("qwen3_8b_lora", big, True), ("qwen3_1_7b_full", small, False)):
        res["stage3_step"][name] = stage3_case(shape, dev, lora, 2 if args.smoke else 8, seq, args.repeats,
                                               args.peak_tflops)
        dev.free()
    dev.reset_peak()
    lm = qwen3(big, dev, torch.bfloat16).eval()
    gen = {f"batch{b}": decode_tokens_per_s(lm, dev, b, seq, 48, args.repeats) for b in (1, 32)}
    res["generation"] = {"tokens_per_s_batch1": gen["batch1"]["tokens_per_s"],
                         "tokens_per_s_batch32": gen["batch32"]["tokens_per_s"], "peak_mem_mb": dev.peak_mb(),
                         "runs": gen, "mask_decode_ms_per_code": mask_decode_ms(dev, args.smoke, args.repeats)}
    del lm
    dev.free()
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
