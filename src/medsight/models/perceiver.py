"""Region Perceiver (SPEC section 3): learnable region queries + dual cross-attention over progressively
upsampled patch features, with a Mask2Former-style dot-product mask head.

forward(feats (B, H, W, Din), queries (B, M, d) | None) -> dict:
    pred_masks  (B, M, h, w) mask logits at the last stage's resolution (H * 2**num_stages)
    pred_logits (B, M, C + 1) class logits (last = "no object")
    queries     (B, M, d) final region tokens (given to the LLM)
    aux         list of {pred_masks, pred_logits} of the init block and the intermediate stages
With `queries=None` the N learned queries are used; otherwise any number M of external queries (decode
mode: the LLM's projected hidden state of an emitted code token). Features are always passed in.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn


def sine_position_encoding(h: int, w: int, dim: int, device=None, dtype=None, temperature: float = 1e4) -> torch.Tensor:
    """Mask2Former/DETR sine encoding, normalised, scale 2*pi; first half of channels y, second half x.
    Returns (h, w, dim)."""
    if dim % 4:
        raise ValueError(f"positional encoding needs perceiver.dim divisible by 4, got {dim}")
    npf = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32)
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    dim_t = torch.arange(npf, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)
    py, px = y[:, None] / dim_t, x[:, None] / dim_t  # (h, npf), (w, npf)
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat([py[:, None, :].expand(h, w, npf), px[None, :, :].expand(h, w, npf)], dim=-1)
    return pos.to(dtype or torch.float32)  # (h, w, dim)


class CrossAttention(nn.Module):
    """LayerNorm on both inputs, bias-free q / kv / out projections, scaled dot-product attention.

    `forward` is the textbook form. Between a few queries and a large pixel set the projections of the
    pixel side can be folded into the few tokens' side instead (exact up to float rounding: matmul
    reassociation, and softmax ignores a per-row constant), which `attend_pixels` (queries -> pixels) and
    `pixels_attend` (pixels -> queries) do whenever it costs fewer FLOPs; both take the pixels already
    normalised without affine (`ln_hat`), so one normalisation serves both directions.
    """

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def qkv(self, x: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q (B, h, Nq, hd) of x and k, v (B, h, Nk, hd) of ctx (kv channels: keys, then values)."""
        b, nq, _ = x.shape
        q = self.to_q(self.norm_q(x)).view(b, nq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(self.norm_kv(ctx)).view(b, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        """(B, h, Nq, hd) per-head outputs -> (B, Nq, d)."""
        b, _, nq, _ = o.shape
        return self.to_out(o.transpose(1, 2).reshape(b, nq, -1))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, Nq, d) attends to ctx (B, Nk, d); mask (B, Nq, Nk) bool, True = may attend."""
        q, k, v = self.qkv(x, ctx)
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None]))

    def _fold_pays(self, few: int, dim: int) -> bool:
        """Per pixel: folded 2 * heads * few * d multiply-adds vs projected 2 * d * inner + 2 * inner * few."""
        inner = self.heads * self.head_dim
        return self.heads * few * dim < dim * inner + inner * few

    def attend_pixels(self, x: torch.Tensor, ctx: torch.Tensor, ctx_hat: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """`forward(x, ctx, mask)` for few x (B, Nq, d) and many ctx (B, L, d); ctx_hat = layer_norm(ctx)
        without affine."""
        b, nq, d = x.shape
        if not self._fold_pays(nq, d):
            return self(x, ctx, mask)
        h, hd = self.heads, self.head_dim
        g, beta = self.norm_kv.weight, self.norm_kv.bias
        w_k, w_v = self.to_kv.weight.view(2, h, hd, d).unbind(0)  # (h, hd, d) each
        q = self.to_q(self.norm_q(x)).view(b, nq, h, hd)  # (B, Nq, h, hd)
        # <q_h, W_k,h (g * c + beta)> = <g * W_k,h^T q_h, c> + const(query): the const drops out of softmax
        qk = torch.einsum("bnhe,hed->bhnd", q, w_k) * g  # (B, h, Nq, d)
        qk = qk.reshape(b, 1, h * nq, d)  # heads folded into the query axis: (B, 1, h*Nq, d)
        attn_mask = None
        if mask is not None:  # (B, Nq, L) -> (B, 1, h*Nq, L), shared by the heads
            attn_mask = mask[:, None].expand(b, h, nq, mask.shape[-1]).reshape(b, 1, h * nq, -1)
        kv = ctx_hat[:, None]  # (B, 1, L, d)
        z = F.scaled_dot_product_attention(qk, kv, kv, attn_mask=attn_mask, scale=hd ** -0.5)  # (B,1,h*Nq,d)
        # rows of the attention sum to 1: A (g * c + beta) = g * (A c) + beta
        z = z.view(b, h, nq, d) * g + beta
        v = torch.einsum("bhnd,hed->bnhe", z, w_v).reshape(b, nq, h * hd)  # (B, Nq, inner)
        return self.to_out(v)

    def pixels_attend(self, x: torch.Tensor, x_hat: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """`forward(x, ctx)` for many x (B, L, d) and few ctx (B, Nk, d); x_hat = layer_norm(x) without
        affine."""
        b, nk, d = ctx.shape
        if not self._fold_pays(nk, d):
            return self(x, ctx)
        h, hd, L = self.heads, self.head_dim, x_hat.shape[1]
        g, beta = self.norm_q.weight, self.norm_q.bias
        w_q = self.to_q.weight.view(h, hd, d)
        w_o = self.to_out.weight.view(d, h, hd)
        k, v = self.to_kv(self.norm_kv(ctx)).view(b, nk, 2, h, hd).unbind(2)  # (B, Nk, h, hd) each
        kq = torch.einsum("bnhe,hed->bhnd", k, w_q) * hd ** -0.5  # (B, h, Nk, d): keys in pixel space
        bias = (kq @ beta).reshape(b, 1, h * nk)  # <kq, beta> per key: (B, 1, h*Nk)
        kq = (kq * g).reshape(b, h * nk, d)  # (B, h*Nk, d)
        vo = torch.einsum("bnhe,dhe->bhnd", v, w_o).reshape(b, h * nk, d)  # values already through to_out
        s = torch.baddbmm(bias, x_hat, kq.transpose(1, 2))  # (B, L, h*Nk) scores
        p = s.view(b, L, h, nk).softmax(-1).view(b, L, h * nk)  # softmax per head over the Nk keys
        return p @ vo  # (B, L, d)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class QueryUpdate(nn.Module):
    """Q <- LN(Q + CrossAttn(Q -> F, mask)); Q <- LN(Q + FF(Q))."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        self.attn, self.norm1 = CrossAttention(dim, heads, head_dim), nn.LayerNorm(dim)
        self.ff, self.norm2 = FeedForward(dim, ff_mult), nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None = None,
                f_hat: torch.Tensor | None = None) -> torch.Tensor:
        """f_hat: layer_norm(f) without affine when the caller has it already."""
        if f_hat is None:
            f_hat = F.layer_norm(f, f.shape[-1:])
        q = self.norm1(q + self.attn.attend_pixels(q, f, f_hat, mask))
        return self.norm2(q + self.ff(q))


class PixelUpdate(nn.Module):
    """F <- LN(F + CrossAttn(every pixel -> queries)); F <- LN(F + FF(F)) (the FF only with pixel_ffn)."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int, pixel_ffn: bool) -> None:
        super().__init__()
        self.attn, self.norm1 = CrossAttention(dim, heads, head_dim), nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult) if pixel_ffn else None
        self.norm2 = nn.LayerNorm(dim) if pixel_ffn else None

    def forward(self, f: torch.Tensor, q: torch.Tensor, f_hat: torch.Tensor | None = None) -> torch.Tensor:
        """f_hat: layer_norm(f) without affine when the caller has it already."""
        if f_hat is None:
            f_hat = F.layer_norm(f, f.shape[-1:])
        f = self.norm1(f + self.attn.pixels_attend(f, f_hat, q))
        if self.ff is not None:
            f = self.norm2(f + self.ff(f))
        return f


#: `conv_layout="auto"` on CPU while training (direct adapter only): the conv runs channels-last when one image's
#: output map (2H x 2W x d floats) has at most this many elements, contiguous NCHW above it. Measured with oneDNN
#: on this project's 2-core CPU (fwd + bwd, ms, NCHW vs channels-last): d=128 32 px B=16 217 vs 115, d=128 64 px
#: B=2 111 vs 76, d=64 128 px B=2 90 vs 72, d=128 96 px B=2 149 vs 140, d=256 48 px B=2 142 vs 124;
#: d=256 96 px B=2 624 vs 729, d=256 96 px B=4 1136 vs 1537, d=256 192 px B=2 2577 vs 4609.
CHANNELS_LAST_MAX_ELEMENTS = 1 << 20
CONV_LAYOUTS = ("auto", "nchw", "channels_last")
ADAPTER_IMPLS = ("factored", "direct")


@functools.lru_cache(maxsize=64)
def upsample_conv_taps(n: int, device: torch.device) -> torch.Tensor:
    """(2n, 3n) matrix T of one axis of "bilinear x2 upsampling (align_corners=False), then a 3-tap
    correlation with zero padding": for tap maps z_0, z_1, z_2 of length n stacked along the contracted axis,
    (T @ [z_0; z_1; z_2])[m] = sum_k up(z_k)[m + k - 1], with up(z)[-1] = up(z)[2n] = 0 (the conv's padding).
    Built from torch's own 1-D linear interpolation of the identity, so its edge rule is torch's."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if first built in inference
        up = F.interpolate(torch.eye(n, dtype=torch.float64)[None], scale_factor=2, mode="linear",
                           align_corners=False)[0].t()  # (2n, n): column j = up(e_j)
        padded = F.pad(up, (0, 0, 1, 1))  # rows -1 and 2n are the conv's zero padding
        taps = torch.stack([padded[k:k + 2 * n] for k in range(3)], dim=1)  # (2n, 3 taps, n)
        return taps.reshape(2 * n, 3 * n).to(device=device, dtype=torch.float32)


class ConvAdapter(nn.Module):
    """Bilinear x2 upsampling then Conv2d 3x3 (d -> d), in one of two ways that compute the same function (up
    to float rounding) from the same `conv` parameters:

    - `factored` (default): the channel mixing runs at the input resolution. Upsampling and shifting act on
      the pixel axes only and the conv's per-tap weights W_k on the channels only, so they commute:
      conv(up(x)) = sum_k shift_k(up(W_k x)) + bias. The 9 products W_k x cost a quarter of the conv's
      multiply-adds; the upsample-and-shift of each axis is one small dense matmul (`upsample_conv_taps`).
      Measured fwd + bwd on 2 CPU threads (direct NCHW / channels-last -> factored, ms): d=128 16->32 px
      B=2 95.7 / 94.8 -> 34.2; d=128 8->16 px B=16 127.7 / 143.2 -> 66.2; d=256 24->48 px B=2 121.8 / 117.4
      -> 45.6; d=256 48->96 px B=2 851 / 756 -> 259.
    - `direct`: `F.interpolate` then `nn.Conv2d`, the memory layout picked by `layout` (`nchw`,
      `channels_last`, or `auto`: channels-last for forward-only passes, and on CPU while training for maps up
      to CHANNELS_LAST_MAX_ELEMENTS per image).
    """

    def __init__(self, dim: int, layout: str = "auto", impl: str = "factored") -> None:
        super().__init__()
        if layout not in CONV_LAYOUTS:
            raise ValueError(f"perceiver.conv_layout='{layout}': choose from {list(CONV_LAYOUTS)}")
        if impl not in ADAPTER_IMPLS:
            raise ValueError(f"perceiver.adapter_impl='{impl}': choose from {list(ADAPTER_IMPLS)}")
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.layout, self.impl = layout, impl

    def channels_last(self, f: torch.Tensor) -> bool:
        if self.layout != "auto":
            return self.layout == "channels_last"
        if not torch.is_grad_enabled():
            return True
        _, h, w, d = f.shape
        return f.device.type == "cpu" and 4 * h * w * d <= CHANNELS_LAST_MAX_ELEMENTS

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, H, W, d) -> (B, 2H, 2W, d) contiguous
        if self.impl == "factored":
            return self.factored(f)
        x = f.permute(0, 3, 1, 2)  # (B, d, H, W) in channels-last memory when f is contiguous
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last(f) else torch.contiguous_format)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(x).permute(0, 2, 3, 1).contiguous()

    def factored(self, f: torch.Tensor) -> torch.Tensor:
        b, h, w, d = f.shape
        weight = self.conv.weight  # (out, in, ky, kx)
        o = weight.shape[0]
        z = f.reshape(-1, d) @ weight.permute(1, 2, 3, 0).reshape(d, 9 * o)  # (B*H*W, ky*kx*out): W_k x
        z = z.view(b, h, w, 3, 3, o).permute(0, 3, 1, 4, 2, 5).reshape(b * 3 * h, 3 * w, o)  # (B ky H, kx W, o)
        t = torch.matmul(upsample_conv_taps(w, f.device).to(z.dtype), z)  # along x: (B ky H, 2W, o)
        t = t.view(b, 3 * h, 2 * w * o)  # (B, ky H, 2W o)
        y = torch.matmul(upsample_conv_taps(h, f.device).to(t.dtype), t)  # along y: (B, 2H, 2W o)
        return y.view(b, 2 * h, 2 * w, o) + self.conv.bias.to(y.dtype)


class PerceiverStage(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int, pixel_ffn: bool,
                 conv_layout: str = "auto", adapter_impl: str = "factored") -> None:
        super().__init__()
        self.adapter = ConvAdapter(dim, conv_layout, adapter_impl)
        self.query_update = QueryUpdate(dim, heads, head_dim, ff_mult)
        self.pixel_update = PixelUpdate(dim, heads, head_dim, ff_mult, pixel_ffn)


class RegionPerceiver(nn.Module):
    """MedSIGHT's Region Perceiver. See the module docstring for inputs and outputs."""

    def __init__(self, in_dim: int, dim: int = 1024, num_queries: int = 20, num_stages: int = 3, heads: int = 8,
                 head_dim: int = 64, ff_mult: int = 4, num_classes: int = 17, pixel_ffn: bool = True,
                 mask_threshold: float = 0.5, conv_layout: str = "auto",
                 adapter_impl: str = "factored") -> None:
        super().__init__()
        self.dim, self.num_queries, self.num_classes = dim, num_queries, num_classes
        self.mask_threshold = mask_threshold
        self.in_proj = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.query_embed = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.init_block = QueryUpdate(dim, heads, head_dim, ff_mult)
        self.stages = nn.ModuleList(PerceiverStage(dim, heads, head_dim, ff_mult, pixel_ffn, conv_layout, adapter_impl)
                                    for _ in range(num_stages))
        self.mask_embed = nn.Linear(dim, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        # mask logits are a d-term dot product of layer-normed vectors: with the default init their std is
        # ~sqrt(d/3) (BCE ~8 at step 0). Init the mask embedding at std 1/d so they start near unit scale;
        # measured on the tiny default: val Dice 0.68 vs 0.56 after 100 steps.
        nn.init.normal_(self.mask_embed.weight, std=dim ** -1)
        nn.init.zeros_(self.mask_embed.bias)

    def _add_pos(self, f: torch.Tensor) -> torch.Tensor:
        _, h, w, d = f.shape
        return f + sine_position_encoding(h, w, d, f.device, f.dtype)

    def head(self, q: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits[b,n,h,w] = <Linear(Q_n), F[b,h,w]> (B, M, h, w) and class logits (B, M, C+1)."""
        masks = torch.einsum("bnd,bhwd->bnhw", self.mask_embed(q), f)
        return masks, self.class_head(q)

    def attention_mask(self, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, M, h, w) logits -> (B, M, H*W) bool "may attend" at the next resolution. Rows that would block
        every pixel are fully un-masked (Mask2Former)."""
        m = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
        allow = (m.sigmoid() >= self.mask_threshold).flatten(2)  # (B, M, H*W)
        return allow | ~allow.any(dim=-1, keepdim=True)

    def forward(self, feats: torch.Tensor, queries: torch.Tensor | None = None) -> dict:
        # contiguous (B, H, W, D): an encoder may hand over a permuted NCHW view (the tiny conv encoder did before
        # it made its own output contiguous), and every op after it (LayerNorm, the pixel attention, the mask
        # head) ran ~4x slower on that layout (measured, no_grad, d=128); a no-op on contiguous input
        f = self._add_pos(self.in_proj(feats.contiguous()))  # (B, H, W, d)
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
            # both directions normalise the same pixels: one affine-free LayerNorm serves them
            flat_hat = F.layer_norm(flat, flat.shape[-1:])
            q = stage.query_update(q, flat, self.attention_mask(masks, (hh, ww)), f_hat=flat_hat)
            f = stage.pixel_update(flat, q, f_hat=flat_hat).view(b, hh, ww, -1)
            masks, logits = self.head(q, f)
        return {"pred_masks": masks, "pred_logits": logits, "queries": q, "aux": aux}


PERCEIVER_VARIANTS = ("ours", "reference")


def build_perceiver(cfg: DictConfig, in_dim: int) -> nn.Module:
    """The Region Perceiver of `perceiver.variant`: `ours` (this module) or `reference` (the released
    model's forward, medsight.models.perceiver_reference); both take the same arguments."""
    p = cfg.perceiver
    variant = p.get("variant", "ours")
    if variant not in PERCEIVER_VARIANTS:
        raise ValueError(f"unknown perceiver.variant '{variant}'; choose from {list(PERCEIVER_VARIANTS)}")
    kwargs = dict(in_dim=in_dim, dim=p.dim, num_queries=p.num_queries, num_stages=p.num_stages, heads=p.heads,
                  head_dim=p.head_dim, ff_mult=p.ff_mult, num_classes=p.num_classes, pixel_ffn=p.pixel_ffn,
                  mask_threshold=p.mask_threshold)
    if variant == "reference":
        from medsight.models.perceiver_reference import ReferenceRegionPerceiver

        return ReferenceRegionPerceiver(**kwargs)
    return RegionPerceiver(**kwargs, conv_layout=p.conv_layout, adapter_impl=p.adapter_impl)


__all__ = ["ADAPTER_IMPLS", "CONV_LAYOUTS", "CrossAttention", "PERCEIVER_VARIANTS", "RegionPerceiver", "build_perceiver",
           "sine_position_encoding", "upsample_conv_taps"]
