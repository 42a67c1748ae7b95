"""Region Perceiver, `reference` variant: the forward of the authors' released perceiver
(Aofei-Chang/MedSIGHT `source/regtok/region_perceiver.py`, `upsample_mode: conv`, `num_stacks: 1`, no query
self-attention), so that their checkpoints (`region_perceiver/0079280.pt`) compute what they computed.

Same constructor arguments and forward interface as `medsight.models.perceiver.RegionPerceiver`
(`perceiver.variant: reference` selects it in `build_perceiver`). What differs from our default (`ours`):
- feed-forwards are LayerNorm -> Linear (no bias) -> GELU -> Linear (no bias), inside the residual;
- a query whose attention mask blocks every pixel attends uniformly to all pixels (the reference fills
  blocked scores with -1e9 before the softmax) instead of being un-masked;
- no input projection: the feature width must equal the perceiver width;
- the pixel -> query update always has its feed-forward (`pixel_ffn` must be True).
Everything else is the same: sine positions added at the start and after every upsampling, masked
query -> pixel attention from the previous head's prediction bilinearly resized to the new resolution
(a pixel is blocked where sigmoid(logit) < mask_threshold), unmasked pixel -> query attention, dot-product
mask head with a biased Linear(d, d), class head on the region tokens. The checkpoint's
`region_position_embed` does not enter the reference's forward and has no counterpart here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsight.models.perceiver import CrossAttention, sine_position_encoding


class ReferenceCrossAttention(CrossAttention):
    """Our CrossAttention (same parameters: LayerNorm on both inputs, bias-free q / kv / out projections),
    except for a masked row: blocked scores are excluded, and a row that blocks every key gets uniform
    weights over all keys (the reference's -1e9 fill), i.e. the mean of the values."""

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return super().forward(x, ctx)
        q, k, v = self.qkv(x, ctx)
        blocked_row = ~mask.any(dim=-1)  # (B, Nq)
        allow = mask | blocked_row[..., None]  # any finite choice; those rows are replaced below
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allow[:, None])  # (B, h, Nq, hd)
        uniform = v.mean(dim=2, keepdim=True).expand_as(out)  # softmax of equal scores = mean of values
        out = torch.where(blocked_row[:, None, :, None], uniform, out)
        return self.merge_heads(out)


class ReferenceFeedForward(nn.Sequential):
    """LayerNorm -> Linear (no bias) -> GELU -> Linear (no bias)."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class ReferenceUpdate(nn.Module):
    """x <- LN(x + CrossAttn(x -> ctx, mask)); x <- LN(x + FF(x)) (used for queries and for pixels)."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        self.attn, self.norm1 = ReferenceCrossAttention(dim, heads, head_dim), nn.LayerNorm(dim)
        self.ff, self.norm2 = ReferenceFeedForward(dim, ff_mult), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, ctx, mask))
        return self.norm2(x + self.ff(x))


class ReferenceAdapter(nn.Module):
    """Bilinear x2 upsampling then Conv2d 3x3 (d -> d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, H, W, d) -> (B, 2H, 2W, d)
        x = F.interpolate(f.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(x).permute(0, 2, 3, 1)


class ReferenceStage(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        self.adapter = ReferenceAdapter(dim)
        self.query_update = ReferenceUpdate(dim, heads, head_dim, ff_mult)
        self.pixel_update = ReferenceUpdate(dim, heads, head_dim, ff_mult)


class ReferenceRegionPerceiver(nn.Module):
    """The released Region Perceiver's forward; inputs and outputs as `RegionPerceiver` (see module doc)."""

    variant = "reference"

    def __init__(self, in_dim: int, dim: int = 1024, num_queries: int = 20, num_stages: int = 3, heads: int = 8,
                 head_dim: int = 64, ff_mult: int = 4, num_classes: int = 17, pixel_ffn: bool = True,
                 mask_threshold: float = 0.5) -> None:
        super().__init__()
        if in_dim != dim:
            raise ValueError(f"perceiver.variant 'reference' has no input projection: the encoder width ({in_dim}) "
                             f"must equal perceiver.dim ({dim})")
        if not pixel_ffn:
            raise ValueError("perceiver.variant 'reference' always has the pixel feed-forward: set perceiver.pixel_ffn=true")
        self.dim, self.num_queries, self.num_classes = dim, num_queries, num_classes
        self.mask_threshold = mask_threshold
        self.query_embed = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.init_block = ReferenceUpdate(dim, heads, head_dim, ff_mult)
        self.stages = nn.ModuleList(ReferenceStage(dim, heads, head_dim, ff_mult) for _ in range(num_stages))
        self.mask_embed = nn.Linear(dim, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        nn.init.normal_(self.mask_embed.weight, std=dim ** -1)  # same start scale as ours (perceiver.py)
        nn.init.zeros_(self.mask_embed.bias)

    def _add_pos(self, f: torch.Tensor) -> torch.Tensor:
        _, h, w, d = f.shape
        return f + sine_position_encoding(h, w, d, f.device, f.dtype)

    def head(self, q: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, M, h, w) = <Linear(Q_n), F[b,h,w]> and class logits (B, M, C+1)."""
        return torch.einsum("bnd,bhwd->bnhw", self.mask_embed(q), f), self.class_head(q)

    def attention_mask(self, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, M, h, w) logits -> (B, M, H*W) bool "may attend" at the next resolution (no row un-masking)."""
        m = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
        return (m.sigmoid() >= self.mask_threshold).flatten(2)

    def forward(self, feats: torch.Tensor, queries: torch.Tensor | None = None) -> dict:
        if feats.shape[-1] != self.dim:
            raise ValueError(f"reference perceiver expects features of width {self.dim}, got {feats.shape[-1]}")
        f = self._add_pos(feats)  # (B, H, W, d)
        b = f.shape[0]
        q = self.query_embed.unsqueeze(0).expand(b, -1, -1) if queries is None else queries  # (B, M, d)
        q = self.init_block(q, f.flatten(1, 2))
        masks, logits = self.head(q, f)
        aux = []
        for stage in self.stages:
            aux.append({"pred_masks": masks, "pred_logits": logits})
            f = self._add_pos(stage.adapter(f))
            hh, ww = f.shape[1:3]
            flat = f.flatten(1, 2)  # (B, H*W, d)
            q = stage.query_update(q, flat, self.attention_mask(masks, (hh, ww)))
            f = stage.pixel_update(flat, q).view(b, hh, ww, -1)
            masks, logits = self.head(q, f)
        return {"pred_masks": masks, "pred_logits": logits, "queries": q, "aux": aux}


__all__ = ["ReferenceRegionPerceiver", "ReferenceCrossAttention"]
