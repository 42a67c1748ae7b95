"""Stage-3 and generation benchmarks shared by `medsight.bench` (CPU, the tiny joint model) and
`medsight.bench_gpu` (paper-shaped random LLMs): one train step, greedy decoding with and without the KV
cache, and mask decoding per emitted code. Medians over repeats; nothing here asserts a speed.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
                ) -> float:
    """Median wall seconds of `fn` over `repeats` calls after `warmup` calls (`sync` before each clock read:
    torch.cuda.synchronize on a GPU)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------ the joint model
def instruct_conversations(data_root: Path | str, n: int, code_tokens: list[str]) -> list[list[dict]]:
    """The first `n` instruct conversations of `<data_root>/instruct/train.json` in LLaVA form, each `<mask>`
    replaced by a code token (cycling through `code_tokens`), as stage 2's coded text has them."""
    path = Path(data_root) / "instruct" / "train.json"
    records = json.loads(path.read_text())[:n]
    if len(records) < n:
        raise ValueError(f"{path}: {len(records)} records, the benchmark needs {n}")
    out, k = [], 0
    for rec in records:
        conv = []
        for turn in rec["conversations"]:
            text = turn["value"]
            while "<mask>" in text:
                text = text.replace("<mask>", code_tokens[k % len(code_tokens)], 1)
                k += 1
            conv.append({"from": turn["from"], "value": text})
        out.append(conv)
    return out


def tiny_joint(cfg, tokenizer_dir: Path | str):
    """The stage-3 joint model of `cfg` (random stage-1 modules, the tiny LLM) in the instruct phase."""
    from medsight.model import build_joint
    from medsight.models import stage1_components
    from medsight.models.phases import set_phase
    from medsight.vocab import code_token

    comps = stage1_components(cfg)
    codes = [code_token(g, k) for g in range(cfg.codebook.num_groups) for k in range(cfg.codebook.num_codes)]
    model = build_joint(cfg, comps["vision"], comps["perceiver"], codes, tokenizer_dir)
    set_phase(model, "instruct")
    return model


def bench_joint_step(model, conversations: list[list[dict]], images: torch.Tensor, masks: torch.Tensor,
                     valid: torch.Tensor, repeats: int, cfg) -> dict:
    """One instruct-phase train step of MedSightLM (CE + code-mask loss, backward, AdamW): tokens/s counts
    every non-padding position of the expanded sequence (text + image tokens)."""
    from medsight.train import adamw

    model.train()
    batch = model.tokenize(conversations)
    feats, regions = model.encode_images(images)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, 1e-4, cfg)  # the stages' optimizer (optim.impl)
    with torch.no_grad():
        seq = model.build_inputs(batch["input_ids"], batch["attention_mask"], model.image_embeddings(feats, regions))
    tokens = int(seq["attention_mask"].sum())

    def step() -> None:
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], feats, regions, masks, valid)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    sec = median_time(step, repeats)
    model.eval()
    return {"batch": len(conversations), "seq_len": int(seq["attention_mask"].shape[1]), "tokens": tokens,
            "step_s": sec, "tokens_per_s": tokens / sec, "trainable_params": sum(p.numel() for p in params)}


@contextlib.contextmanager
def fixed_length(model) -> Iterator[None]:
    """Greedy decoding that never stops early (a random LLM may emit the end-of-turn token at once): the
    stop set is replaced by an id no vocabulary has, so every sample decodes the full budget."""
    model.stop_ids = lambda: [-1]
    try:
        yield
    finally:
        del model.stop_ids


@torch.no_grad()
def generate_without_cache(model, feats: torch.Tensor, regions: torch.Tensor, conversations: list[list[dict]],
                           new_tokens: int) -> torch.Tensor:
    """The no-KV-cache baseline of MedSightLM.generate: every step re-runs the whole sequence. (B, new_tokens)."""
    lm = model.causal_lm()
    prompt = model.tokenize(conversations, generation_prompt=True)
    inputs = model.build_inputs(prompt["input_ids"], prompt["attention_mask"], model.image_embeddings(feats, regions))
    embeds, mask, pos = inputs["inputs_embeds"], inputs["attention_mask"], inputs["position_ids"]
    out = []
    for _ in range(new_tokens):
        logits = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False,
                    logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1)  # (B,)
        out.append(nxt)
        embeds = torch.cat([embeds, lm.get_input_embeddings()(nxt)[:, None]], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    return torch.stack(out, 1)


def bench_generation(model, images: torch.Tensor, conversations: list[list[dict]], new_tokens: int,
                     repeats: int) -> dict:
    """Greedy decoding of exactly `new_tokens` per sample, MedSightLM.generate (KV cache) and the no-cache
    baseline timed in turns (cache, none, cache, none, ...) so that both see the same machine load."""
    model.eval()
    feats, regions = model.encode_images(images)

    def cached() -> None:
        with fixed_length(model):
            _, gen = model.generate(feats, regions, conversations, max_new_tokens=new_tokens)
        if any(len(g) != new_tokens for g in gen):
            raise RuntimeError(f"decoded {[len(g) for g in gen]} tokens, expected {new_tokens} each")

    def uncached() -> None:
        generate_without_cache(model, feats, regions, conversations, new_tokens)

    med = interleaved_medians({"cache": cached, "no_cache": uncached}, repeats)
    b = len(conversations)
    return {"batch": b, "new_tokens": new_tokens, "s": med["cache"], "s_no_cache": med["no_cache"],
            "tokens_per_s": b * new_tokens / med["cache"], "tokens_per_s_no_cache": b * new_tokens / med["no_cache"],
            "kv_cache_speedup": med["no_cache"] / med["cache"]}


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds of each function, timed in turns (A B A B ...)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def bench_mask_decode(model, images: torch.Tensor, codes: int, repeats: int) -> dict:
    """Latency of decoding masks for `codes` emitted codes of one image (t->v projector + perceiver in decode
    mode), per code."""
    model.eval()
    feats, _ = model.encode_images(images[:1])
    states = torch.randn(1, codes, model.causal_lm().config.hidden_size)
    sec = median_time(lambda: model.decode_masks(states, feats), repeats)
    return {"codes": codes, "ms": sec * 1e3, "ms_per_code": sec * 1e3 / codes}


__all__ = [
    "bench_generation",
    "bench_joint_step",
    "bench_mask_decode",
    "fixed_length",
    "generate_without_cache",
    "instruct_conversations",
    "interleaved_medians",
    "median_time",
    "tiny_joint",
]
