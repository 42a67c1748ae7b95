"""Vision encoders by name (SPEC section 2): one factory table, `VISION_BACKBONES`, and `build_vision(cfg)`.

Every encoder maps images (B, 3, S, S) to patch features (B, H', W', D) and a pooled/CLS feature (B, D),
both taken from the transformer (or conv) block chosen by `vision.select_layer` (-1 = the last block's
output, before any post-layernorm). Attributes: `out_dim` (D) and `grid` (H' = W').

Names:
- `tiny`: a small randomly initialised encoder for CPU runs. `vision.tiny_arch` picks a convolutional
  stem + ConvNeXt-style blocks (`conv`, default: learns markedly faster on small data) or a tiny CLIP ViT
  (`vit`).
- `hf`: any local Hugging Face CLIP or SigLIP vision checkpoint directory in `vision.path` (offline).
- `clip-vit-l14-336`: the paper's encoder architecture (CLIP ViT-L/14 @ 336 px, QuickGELU); weights from
  `vision.path` (a Hugging Face CLIP directory) when given, so paper configs build without weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn


def _select(hidden_states: tuple[torch.Tensor, ...], select_layer: int, num_blocks: int) -> torch.Tensor:
    """hidden_states[0] is the embedding output, [i] the output of block i; -1 is the last block."""
    if not -num_blocks <= select_layer < num_blocks + 1 or select_layer == 0:
        raise ValueError(f"vision.select_layer={select_layer} is out of range for an encoder with {num_blocks} "
                         f"blocks (use -1..-{num_blocks} or 1..{num_blocks})")
    return hidden_states[select_layer]


# ------------------------------------------------------------------------------------------ tiny conv
class _ConvBlock(nn.Module):
    """ConvNeXt-style residual block: depthwise 7x7, LayerNorm, MLP x4."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, D)
        y = self.dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(y))


class TinyConvEncoder(nn.Module):
    """Strided conv stem (image_size -> image_size / patch_size) followed by `depth` ConvNeXt blocks."""

    def __init__(self, image_size: int, width: int, depth: int, patch_size: int, select_layer: int = -1) -> None:
        super().__init__()
        if patch_size & (patch_size - 1) or patch_size < 2:
            raise ValueError(f"vision.patch_size={patch_size}: the tiny conv stem needs a power of two >= 2")
        n_down = patch_size.bit_length() - 1
        chans = [3] + [max(16, width >> (n_down - 1 - i)) for i in range(n_down)]
        layers: list[nn.Module] = []
        for i in range(n_down):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.GroupNorm(1, chans[i + 1]),
                       nn.GELU()]
        self.stem = nn.Sequential(*layers)
        self.blocks = nn.ModuleList(_ConvBlock(width) for _ in range(depth))
        self.out_dim, self.grid, self.select_layer = width, image_size // patch_size, select_layer

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # contiguous NHWC: the blocks' depthwise convs and LayerNorms run on that layout (the permuted NCHW view
        # made the first block's conv take oneDNN's slow NCHW path; encoder fwd + bwd 270 -> 215-234 ms, B=16)
        x = self.stem(images).permute(0, 2, 3, 1).contiguous()  # (B, H', W', D)
        hidden = [x]
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        feats = _select(tuple(hidden), self.select_layer, len(self.blocks))
        return feats, feats.mean(dim=(1, 2))


# ------------------------------------------------------------------------------------------- HF ViTs
class HFVisionEncoder(nn.Module):
    """Wraps a transformers CLIPVisionModel / SiglipVisionModel. CLIP: patch tokens after the CLS token and
    the CLS token of the selected block; SigLIP (no CLS): all tokens and their mean."""

    def __init__(self, model: nn.Module, select_layer: int = -1) -> None:
        super().__init__()
        self.model = model
        c = model.config
        self.has_cls = c.model_type.startswith("clip")
        self.out_dim, self.grid = c.hidden_size, c.image_size // c.patch_size
        self.num_blocks, self.select_layer = c.num_hidden_layers, select_layer
        _select(tuple(range(self.num_blocks + 1)), select_layer, self.num_blocks)  # validate early

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=images, output_hidden_states=True)
        h = _select(out.hidden_states, self.select_layer, self.num_blocks)  # (B, T, D)
        if self.has_cls:
            pooled, patches = h[:, 0], h[:, 1:]
        else:
            patches = h
            pooled = h.mean(dim=1)
        b, _, d = patches.shape
        return patches.reshape(b, self.grid, self.grid, d), pooled  # (B, H', W', D), (B, D)


def _hf_config_model(config) -> nn.Module:
    from transformers import CLIPVisionModel, SiglipVisionModel

    return (CLIPVisionModel if config.model_type.startswith("clip") else SiglipVisionModel)(config)


def load_hf_vision(path: str | Path) -> nn.Module:
    """A local CLIP or SigLIP (vision or full) checkpoint directory -> its vision tower, offline."""
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"vision.path '{path}' is not a Hugging Face model directory (no config.json)")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    kind = cfg.model_type
    if kind.startswith("clip"):
        return CLIPVisionModel.from_pretrained(path, local_files_only=True)
    if kind.startswith("siglip"):
        return SiglipVisionModel.from_pretrained(path, local_files_only=True)
    raise ValueError(f"vision.path '{path}' holds a '{kind}' model; the 'hf' backbone reads CLIP or SigLIP")


def build_tiny(cfg: DictConfig) -> nn.Module:
    v = cfg.vision
    if cfg.data.image_size % v.patch_size:
        raise ValueError(f"data.image_size={cfg.data.image_size} is not divisible by vision.patch_size={v.patch_size}")
    if v.tiny_arch == "conv":
        return TinyConvEncoder(cfg.data.image_size, v.width, v.depth, v.patch_size, v.select_layer)
    if v.tiny_arch == "vit":
        from transformers import CLIPVisionConfig

        c = CLIPVisionConfig(hidden_size=v.width, num_hidden_layers=v.depth, num_attention_heads=max(1, v.width // 32),
                             intermediate_size=4 * v.width, patch_size=v.patch_size, image_size=cfg.data.image_size,
                             hidden_act="quick_gelu")
        return HFVisionEncoder(_hf_config_model(c), v.select_layer)
    raise ValueError(f"vision.tiny_arch '{v.tiny_arch}'; choose from ['conv', 'vit']")


def build_hf(cfg: DictConfig) -> nn.Module:
    if not cfg.vision.path:
        raise ValueError("vision.name=hf needs vision.path (a local CLIP or SigLIP checkpoint directory)")
    return HFVisionEncoder(load_hf_vision(cfg.vision.path), cfg.vision.select_layer)


def clip_vit_l14_336_config():
    """CLIP ViT-L/14 at 336 px with QuickGELU (the paper's UniMed-CLIP encoder architecture)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                            patch_size=14, image_size=336, hidden_act="quick_gelu", projection_dim=768)


def build_clip_vit_l14_336(cfg: DictConfig) -> nn.Module:
    if cfg.vision.path:
        model = load_hf_vision(cfg.vision.path)
        want, got = clip_vit_l14_336_config(), model.config
        bad = [k for k in ("hidden_size", "num_hidden_layers", "patch_size", "image_size") if getattr(want, k) != getattr(got, k)]
        if bad:
            raise ValueError(f"vision.path '{cfg.vision.path}' is not a ViT-L/14@336 (differs in {bad}); use vision.name=hf")
    else:
        model = _hf_config_model(clip_vit_l14_336_config())
    return HFVisionEncoder(model, cfg.vision.select_layer)


#: name -> factory(cfg) -> encoder. The one place a vision backbone name is resolved.
VISION_BACKBONES: dict[str, Callable[[DictConfig], nn.Module]] = {
    "tiny": build_tiny,
    "hf": build_hf,
    "clip-vit-l14-336": build_clip_vit_l14_336,
}


def build_vision(cfg: DictConfig) -> nn.Module:
    """The encoder named by `vision.name` (module with `out_dim`, `grid`; forward -> (feats, pooled))."""
    name = cfg.vision.name
    if name not in VISION_BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose from {sorted(VISION_BACKBONES)}")
    return VISION_BACKBONES[name](cfg)


__all__ = [
    "VISION_BACKBONES",
    "HFVisionEncoder",
    "TinyConvEncoder",
    "build_vision",
    "clip_vit_l14_336_config",
    "load_hf_vision",
]
