"""`medsight convert open-clip`: an open_clip checkpoint (e.g. UniMed-CLIP ViT-L/14) -> a Hugging Face
`CLIPVisionModel` directory that `vision.name=hf` and `vision.name=clip-vit-l14-336` load.

The checkpoint is a `torch.save` of `{"state_dict": ..., ...}` or a bare state dict (keys may start with
`module.`), read with medsight.safeload (no code runs). The vision tower lives under `visual.` in open_clip's
`VisionTransformer` layout (REAL_FORMATS section 5a). Width, depth, patch and image size come from the
tensors; the head width and the activation (QuickGELU or GELU), which the tensors do not show, from the
open_clip model name. Text-tower keys, `logit_scale` and the joint-space projection `visual.proj` are
listed as ignored; any other key that is not mapped is an error naming it.

Key mapping (open_clip `visual.` -> HF): conv1 -> embeddings.patch_embedding, class_embedding ->
embeddings.class_embedding, positional_embedding -> embeddings.position_embedding.weight, ln_pre ->
pre_layrnorm, resblocks.i.ln_1/ln_2 -> encoder.layers.i.layer_norm1/2, attn.in_proj_{weight,bias} split in
three (q, k, v) -> self_attn.{q,k,v}_proj, attn.out_proj -> self_attn.out_proj, mlp.c_fc/c_proj ->
mlp.fc1/fc2, ln_post -> post_layernorm. open_clip's intermediate i equals HF `hidden_states[i + 1]`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from medsight.data import DataError
from medsight.safeload import load_checkpoint

log = logging.getLogger(__name__)

#: open_clip model name -> what the tensors do not show (head width, activation). Every open_clip ViT
#: config of these families uses head_width 64; "-quickgelu" names use QuickGELU.
OPEN_CLIP_MODELS: dict[str, dict[str, Any]] = {
    "ViT-L-14-336-quickgelu": {"head_width": 64, "hidden_act": "quick_gelu"},
    "ViT-L-14-336": {"head_width": 64, "hidden_act": "gelu"},
    "ViT-L-14-quickgelu": {"head_width": 64, "hidden_act": "quick_gelu"},
    "ViT-L-14": {"head_width": 64, "hidden_act": "gelu"},
    "ViT-B-16-quickgelu": {"head_width": 64, "hidden_act": "quick_gelu"},
    "ViT-B-16": {"head_width": 64, "hidden_act": "gelu"},
    "ViT-B-32-quickgelu": {"head_width": 64, "hidden_act": "quick_gelu"},
    "ViT-B-32": {"head_width": 64, "hidden_act": "gelu"},
}
DEFAULT_MODEL = "ViT-L-14-336-quickgelu"

#: top-level keys of the text tower and the contrastive head (ignored, with the reason)
_IGNORED = (
    (re.compile(r"(text_encoder|text|transformer|token_embedding|ln_final)\."), "text tower"),
    (re.compile(r"(positional_embedding|text_projection|attn_mask)$"), "text tower"),
    (re.compile(r"logit_(scale|bias)$"), "contrastive temperature"),
    (re.compile(r"visual\.proj$"), "projection to the joint image-text space (CLIPVisionModel has none)"),
)


def open_clip_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict of a loaded open_clip checkpoint, without a leading `module.`."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise DataError(f"{source}: not an open_clip checkpoint (expected a state dict or a dict with 'state_dict')",
                        path=source, field="state_dict")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise DataError(f"{source}: state-dict entry '{k}' is a {type(v).__name__}, not a tensor", path=source,
                            field=str(k))
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _block_map(i: int, rest: str, v: torch.Tensor) -> dict[str, torch.Tensor] | None:
    p = f"encoder.layers.{i}."
    m = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
    if m:
        q, k, val = v.chunk(3, dim=0)
        return {f"{p}self_attn.{n}_proj.{m.group(1)}": t for n, t in (("q", q), ("k", k), ("v", val))}
    simple = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    m = re.fullmatch(r"(ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)", rest)
    if m:
        return {f"{p}{simple[m.group(1)]}.{m.group(2)}": v}
    return None


def map_open_clip_visual(state: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(HF CLIPVisionModel state dict, {ignored key: why}); an unmapped key raises DataError naming it."""
    out: dict[str, torch.Tensor] = {}
    ignored: dict[str, str] = {}
    unknown = []
    top = {"visual.conv1.weight": "embeddings.patch_embedding.weight",
           "visual.class_embedding": "embeddings.class_embedding",
           "visual.positional_embedding": "embeddings.position_embedding.weight",
           "visual.ln_pre.weight": "pre_layrnorm.weight", "visual.ln_pre.bias": "pre_layrnorm.bias",
           "visual.ln_post.weight": "post_layernorm.weight", "visual.ln_post.bias": "post_layernorm.bias"}
    for key, v in state.items():
        if key in top:
            out[top[key]] = v
            continue
        m = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.(.+)", key)
        mapped = _block_map(int(m.group(1)), m.group(2), v) if m else None
        if mapped:
            out.update(mapped)
            continue
        why = next((r for pat, r in _IGNORED if pat.match(key)), None)
        if why is None:
            unknown.append(key)
        else:
            ignored[key] = why
    if unknown:
        raise DataError(f"{source}: open_clip keys that medsight cannot map to a CLIP vision tower: {unknown[:8]}"
                        f"{' ...' if len(unknown) > 8 else ''}", path=source, field=unknown[0])
    if "embeddings.patch_embedding.weight" not in out:
        raise DataError(f"{source}: no vision tower (no 'visual.conv1.weight')", path=source,
                        field="visual.conv1.weight")
    return out, ignored


def vision_config_from_shapes(hf_state: dict[str, torch.Tensor], model: str, source: str,
                              head_width: int | None = None):
    """A CLIPVisionConfig from the tensors' shapes plus the model name's head width (unless `head_width`
    is given) and activation."""
    from transformers import CLIPVisionConfig

    if model not in OPEN_CLIP_MODELS:
        raise DataError(f"unknown open_clip model '{model}'; choose from {sorted(OPEN_CLIP_MODELS)}", field="model")
    conv = hf_state["embeddings.patch_embedding.weight"]  # (width, 3, patch, patch)
    width, patch = conv.shape[0], conv.shape[-1]
    tokens = hf_state["embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise DataError(f"{source}: positional_embedding has {tokens} rows, not 1 + a square grid", path=source,
                        field="visual.positional_embedding")
    layers = 1 + max(int(k.split(".")[2]) for k in hf_state if k.startswith("encoder.layers."))
    head_width = head_width or OPEN_CLIP_MODELS[model]["head_width"]
    if width % head_width:
        raise DataError(f"{source}: width {width} is not a multiple of the head width {head_width} ({model}; "
                        "--head-width overrides)", path=source, field="model")
    return CLIPVisionConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // head_width,
                            intermediate_size=hf_state["encoder.layers.0.mlp.fc1.weight"].shape[0], patch_size=patch,
                            image_size=grid * patch, hidden_act=OPEN_CLIP_MODELS[model]["hidden_act"],
                            layer_norm_eps=1e-5)


def convert_open_clip(ckpt: str | Path, out: str | Path, model: str = DEFAULT_MODEL,
                      head_width: int | None = None) -> dict[str, Any]:
    """Write a CLIPVisionModel directory (config.json + model.safetensors + medsight_convert.json) to `out`.

    Returns the report that is also written to `medsight_convert.json`: source, open_clip model name,
    hidden_act, dims and the ignored keys with the reason."""
    from transformers import CLIPVisionModel

    source = str(ckpt)
    if model not in OPEN_CLIP_MODELS:  # before reading gigabytes
        raise DataError(f"unknown open_clip model '{model}'; choose from {sorted(OPEN_CLIP_MODELS)}", field="model")
    state = open_clip_state_dict(load_checkpoint(ckpt, map_location="cpu", mmap=True), source)
    hf_state, ignored = map_open_clip_visual(state, source)
    config = vision_config_from_shapes(hf_state, model, source, head_width)
    vision = CLIPVisionModel(config)
    own = vision.state_dict()
    missing = sorted(set(own) - set(hf_state))
    if missing:
        raise DataError(f"{source}: the vision tower lacks {missing[:8]}", path=source, field=missing[0])
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in hf_state.items() if v.shape != own[k].shape]
    if bad:
        raise DataError(f"{source}: tensor shapes do not fit a CLIP vision tower: {bad[:4]}", path=source)
    vision.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in hf_state.items()}, strict=True)
    out = Path(out)
    vision.save_pretrained(out)
    report = {"source": source, "open_clip_model": model, "hidden_act": config.hidden_act,
              "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
              "num_attention_heads": config.num_attention_heads, "patch_size": config.patch_size,
              "image_size": config.image_size, "select_layer_rule": "open_clip intermediate [i] = hidden_states[i+1]",
              "ignored_keys": ignored}
    (out / "medsight_convert.json").write_text(json.dumps(report, indent=2))
    log.info("converted %s -> %s (%d blocks, width %d, %s); %d keys ignored", source, out, config.num_hidden_layers,
             config.hidden_size, config.hidden_act, len(ignored))
    return report


__all__ = ["OPEN_CLIP_MODELS", "convert_open_clip", "map_open_clip_visual", "open_clip_state_dict",
           "vision_config_from_shapes"]
