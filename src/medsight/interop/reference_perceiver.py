"""Key mapping from the released Region Perceiver (Aofei-Chang/MedSIGHT `RegTok.region_perceiver`, keys
`region_perceiver.*` in `0079280.pt`) to `medsight.models.perceiver_reference.ReferenceRegionPerceiver`.

Every key of the checkpoint is either mapped or returned as unused with the reason; a tensor the model
needs and the checkpoint lacks is an error naming it.
"""

from __future__ import annotations

import re

import torch

from medsight.data import DataError

_ATTN = {"norm_latents": "norm_q", "norm_media": "norm_kv", "to_q": "to_q", "to_kv": "to_kv", "to_out": "to_out"}
_BLOCK = {  # BiDirectionalBlock attribute -> (our ReferenceStage submodule, part)
    "region_to_image": ("query_update", "attn"),
    "region_to_image_norm": ("query_update", "norm1"),
    "ff_region": ("query_update", "ff"),
    "ff_region_norm": ("query_update", "norm2"),
    "image_to_region": ("pixel_update", "attn"),
    "image_to_region_norm": ("pixel_update", "norm1"),
    "ff_image": ("pixel_update", "ff"),
    "ff_image_norm": ("pixel_update", "norm2"),
}
# released keys that do not enter the perceiver's forward, with the reason
_UNUSED = (
    (re.compile(r"region_position_embed\."), "not used by the reference forward"),
    (re.compile(r"(to_code|code_decoder|quantizer)\."), "stage-2 codebook part (read by --codebook)"),
)


def _attn_key(rest: str) -> str | None:
    head, _, tail = rest.partition(".")
    return f"{_ATTN[head]}.{tail}" if head in _ATTN and tail else None


def _map_one(key: str) -> str | None:
    """Our key for one released key (without the `region_perceiver.` prefix), None when not a forward key."""
    if key == "region_queries":
        return "query_embed"
    m = re.fullmatch(r"init_cross_attn\.(.+)", key)
    if m:
        sub = _attn_key(m.group(1))
        return f"init_block.attn.{sub}" if sub else None
    for ref, ours in (("init_cross_norm", "norm1"), ("init_ff_norm", "norm2"), ("init_ff", "ff")):
        if key.startswith(ref + "."):
            return f"init_block.{ours}.{key[len(ref) + 1:]}"
    m = re.fullmatch(r"conv_adapters\.(\d+)\.conv\.(weight|bias)", key)
    if m:
        return f"stages.{m.group(1)}.adapter.conv.{m.group(2)}"
    m = re.fullmatch(r"bi_blocks\.(\d+)\.([a-z_]+)\.(.+)", key)
    if m and m.group(2) in _BLOCK:
        sub, part = _BLOCK[m.group(2)]
        rest = m.group(3)
        if part == "attn":
            rest = _attn_key(rest)  # type: ignore[assignment]
            if rest is None:
                return None
        return f"stages.{m.group(1)}.{sub}.{part}.{rest}"
    m = re.fullmatch(r"segmentation_cls_head\.(proj|class_embed)\.(weight|bias)", key)
    if m:
        return f"{'mask_embed' if m.group(1) == 'proj' else 'class_head'}.{m.group(2)}"
    return None


def map_reference_perceiver(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str, prefix: str = "region_perceiver."
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(our state dict, {released key: why unused}) from a released state dict.

    `expected` is our model's state dict (names and shapes to fill). Keys outside `prefix` are returned as
    unused (other parts of RegTok); a key under `prefix` that is neither mapped nor known-unused, a shape
    mismatch, or a missing tensor raises DataError naming the key and `source`.
    """
    out: dict[str, torch.Tensor] = {}
    unused: dict[str, str] = {}
    unknown = []
    for key, value in state.items():
        if not key.startswith(prefix):
            unused[key] = "outside the region perceiver"
            continue
        rest = key[len(prefix):]
        ours = _map_one(rest)
        if ours is None:
            why = next((r for pat, r in _UNUSED if pat.match(rest)), None)
            if why is None:
                unknown.append(key)
            else:
                unused[key] = why
            continue
        if ours == "query_embed":
            value = value.reshape(value.shape[-2], value.shape[-1])  # (1, N, d) -> (N, d)
        if ours not in expected:
            raise DataError(f"{source}: released perceiver key '{key}' maps to '{ours}', which the configured model lacks "
                            f"(num_stages too small?)", path=source, field=key)
        if tuple(expected[ours].shape) != tuple(value.shape):
            raise DataError(f"{source}: released perceiver key '{key}' has shape {tuple(value.shape)}, the model needs "
                            f"{tuple(expected[ours].shape)} for '{ours}'", path=source, field=key)
        out[ours] = value
    if unknown:
        raise DataError(f"{source}: released perceiver keys not understood: {unknown[:8]}", path=source, field=unknown[0])
    missing = sorted(set(expected) - set(out))
    if missing:
        raise DataError(f"{source}: released perceiver lacks tensors the model needs: {missing[:8]}", path=source,
                        field=missing[0])
    return out, unused


__all__ = ["map_reference_perceiver"]
