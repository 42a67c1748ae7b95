"""One cached decoding step (one new token per sample) computed straight from the LLM's own modules.

Hugging Face's forward is written for every case at once (training, any attention backend, hooks that record
outputs, mask building for any length). For one new token of a small model that generality is most of the
cost: the tiny default LLM spends ~850 tensor ops per token there, ~22 of them matrix products. `DirectStep`
runs the same arithmetic for the decoder layout that Qwen3, Qwen2 and Llama share (pre-norm attention with
rotary positions, a KV cache, a gated MLP): the model's own projection and MLP modules (so LoRA adapters
stay in), its own rotary table, the same DynamicCache, one fused attention call, in ~150 ops. Prefill stays
Hugging Face's forward and fills the cache both paths share.

It gives Hugging Face's logits within float rounding (tests/test_decode.py compares them step by step,
with left padding, grouped-query attention, biases and LoRA). For anything else (another architecture,
sliding-window attention, a model in training mode) `decode_step` gives Hugging Face's forward behind the
same call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: model_type of the architectures whose decoder layers `DirectStep` computes.
SUPPORTED = ("qwen3", "qwen2", "llama")
_RMS_NORMS = ("Qwen3RMSNorm", "Qwen2RMSNorm", "LlamaRMSNorm")


def unsupported(lm: nn.Module) -> str | None:
    """Why `DirectStep` cannot decode with `lm` (a Hugging Face causal LM), or None when it can."""
    c = lm.config
    if c.model_type not in SUPPORTED:
        return f"model_type {c.model_type!r} is not one of {SUPPORTED}"
    if lm.training:
        return "the model is in training mode (attention dropout)"
    if getattr(c, "use_sliding_window", False) or "sliding_attention" in (getattr(c, "layer_types", None) or []):
        return "sliding-window attention"
    if getattr(c, "pretraining_tp", 1) > 1:
        return "pretraining_tp > 1"
    base = getattr(lm, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "no model.{embed_tokens, layers, norm, rotary_emb}"
    return None


def direct_step(lm: nn.Module) -> DirectStep | None:
    """A DirectStep for `lm`, or None where Hugging Face's forward must decode (see `unsupported`)."""
    return None if unsupported(lm) else DirectStep(lm)


def decode_step(lm: nn.Module, direct: bool = True):
    """The one-token step of cached greedy decoding, `step(ids (B,), position_ids (B, 1), attention_mask (B, L)
    or None, cache) -> logits (B, V)`: a DirectStep where `direct` and the layout allow, else Hugging Face's
    forward with the same signature (attention_mask None: no sample is padded)."""
    step = direct_step(lm) if direct else None
    if step is not None:
        return step

    def hf_step(ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                cache) -> torch.Tensor:
        return lm(input_ids=ids[:, None], attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                  use_cache=True).logits[:, -1]
    return hf_step


def _norm(module: nn.Module):
    """The RMSNorm as one fused op where it is one of the known classes (same formula: float32 statistics,
    weight applied in the input dtype), else the module itself."""
    if type(module).__name__ not in _RMS_NORMS:
        return module
    weight, eps = module.weight, module.variance_epsilon

    def norm(x: torch.Tensor) -> torch.Tensor:
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return norm


def _linear(module: nn.Module):
    """A plain nn.Linear as F.linear on its parameters (no module-call overhead); anything else (a LoRA
    wrapper) as the module."""
    if type(module) is not nn.Linear:
        return module
    weight, bias = module.weight, module.bias
    return lambda x: F.linear(x, weight, bias)


def _mlp(module: nn.Module):
    """The gated MLP, down(act(gate(x)) * up(x)), on plain linear layers without module calls; the module
    itself where any of them is wrapped (LoRA) or it has another form."""
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not hasattr(module, "act_fn") or any(type(m) is not nn.Linear for m in parts):
        return module
    (gate, up, down), act = (_linear(m) for m in parts), module.act_fn
    return lambda x: down(act(gate(x)) * up(x))


class DirectStep:
    """Decode one token per sample: `step(ids (B,), position_ids (B, 1), attention_mask (B, L) or None,
    cache) -> logits (B, V)`; the cache grows by one position. attention_mask covers the cached positions
    and the new one (1 = attend); None when no sample is padded."""

    def __init__(self, lm: nn.Module) -> None:
        base = lm.model
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.final_norm = _norm(base.norm)
        self.head = _linear(lm.lm_head)
        self.layers = []
        for layer in base.layers:
            attn = layer.self_attn
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            self.layers.append(dict(
                idx=attn.layer_idx, head_dim=attn.head_dim, scaling=attn.scaling,
                gqa=attn.num_key_value_groups > 1,
                norm1=_norm(layer.input_layernorm), norm2=_norm(layer.post_attention_layernorm),
                q=_linear(attn.q_proj), k=_linear(attn.k_proj), v=_linear(attn.v_proj), o=_linear(attn.o_proj),
                q_norm=_norm(q_norm) if q_norm is not None else None,
                k_norm=_norm(k_norm) if k_norm is not None else None,
                mlp=_mlp(layer.mlp)))

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 cache) -> torch.Tensor:
        h = self.embed(ids[:, None])  # (B, 1, D)
        b = h.shape[0]
        cos, sin = self.rotary(h, position_ids)  # (B, 1, hd)
        half = cos.shape[-1] // 2
        cos = cos[:, None]  # (B, 1, 1, hd): broadcast over heads
        # rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2], exactly (negation commutes with rounding)
        sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)[:, None]
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()  # (B, 1, 1, L)
        for p in self.layers:
            hd = p["head_dim"]
            x = p["norm1"](h)
            q = p["q"](x).view(b, 1, -1, hd)
            k = p["k"](x).view(b, 1, -1, hd)
            v = p["v"](x).view(b, 1, -1, hd).transpose(1, 2)
            if p["q_norm"] is not None:
                q, k = p["q_norm"](q), p["k_norm"](k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, 1, hd)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            k, v = cache.update(k, v, p["idx"])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=p["scaling"], enable_gqa=p["gqa"])
            h = h + p["o"](o.transpose(1, 2).reshape(b, 1, -1))
            h = h + p["mlp"](p["norm2"](h))
        return self.head(self.final_norm(h))[:, -1]  # (B, V)
