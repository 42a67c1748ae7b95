"""`perceiver.variant: reference` computes what the released Region Perceiver computes.

The oracle below is a plain-torch forward over a state dict in the released key layout
(`region_perceiver.*` of `0079280.pt`), written from reading Aofei-Chang/MedSIGHT
`source/regtok/region_perceiver.py` (PerceiverCrossAttention, FeedForward, BiDirectionalBlock,
SegmentationHead, ConvAdapter, PositionEmbeddingSine, RegionPerceiver.forward with upsample_mode conv,
num_stacks 1, no self-attention). It does not use medsight's modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from medsight.config import load_config
from medsight.data import DataError
from medsight.interop.reference_perceiver import map_reference_perceiver
from medsight.models.perceiver import RegionPerceiver, build_perceiver
from medsight.models.perceiver_reference import ReferenceRegionPerceiver

DIM, HEADS, DH, MULT, N, C = 32, 2, 8, 2, 5, 3


# ------------------------------------------------------------------------------------------ oracle
def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def _ff(x, sd, p):  # Sequential(LayerNorm, Linear no bias, GELU, Linear no bias)
    h = _ln(x, sd, p + ".0") @ sd[p + ".1.weight"].T
    return F.gelu(h) @ sd[p + ".3.weight"].T


def _cross(media, latents, sd, p, blocked=None, heads=HEADS, dh=DH):
    """PerceiverCrossAttention(x=media, region_latents=latents, attn_mask=blocked (True = blocked))."""
    x, lat = _ln(media, sd, p + ".norm_media"), _ln(latents, sd, p + ".norm_latents")
    q = lat @ sd[p + ".to_q.weight"].T
    k, v = (x @ sd[p + ".to_kv.weight"].T).chunk(2, dim=-1)
    b = q.shape[0]
    q, k, v = (t.reshape(b, t.shape[1], heads, dh).transpose(1, 2) for t in (q, k, v))  # b n (h d) -> b h n d
    sim = (q * dh ** -0.5) @ k.transpose(-1, -2)
    if blocked is not None:
        sim = sim.masked_fill(blocked[:, None], -1e9)
    sim = sim - sim.amax(dim=-1, keepdim=True)
    out = sim.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(b, -1, heads * dh) @ sd[p + ".to_out.weight"].T


def _pos(b, h, w, d):
    """PositionEmbeddingSine(d // 2, normalize=True) on an all-valid mask: cumsum positions."""
    npf = d // 2
    ones = torch.ones(b, h, w)
    y, x = ones.cumsum(1), ones.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(npf, dtype=torch.float32) // 2) / npf)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3)


def _head(q, f, sd, stats):
    b, n, _ = q.shape
    _, h, w, d = f.shape
    logits = torch.einsum("bnd,bmd->bnm", q @ sd["segmentation_cls_head.proj.weight"].T
                          + sd["segmentation_cls_head.proj.bias"], f.reshape(b, h * w, d)).view(b, n, h, w)
    cls = q @ sd["segmentation_cls_head.class_embed.weight"].T + sd["segmentation_cls_head.class_embed.bias"]
    nxt = F.interpolate(logits, size=(2 * h, 2 * w), mode="bilinear", align_corners=False).view(b, n, 4 * h * w)
    blocked = nxt.sigmoid() < 0.5
    stats["fully_blocked"] += int(blocked.all(-1).sum())
    stats["partly_blocked"] += int((blocked.any(-1) & ~blocked.all(-1)).sum())
    return logits, cls, blocked


def oracle(sd: dict, feats: torch.Tensor, queries=None, num_stages=2, heads=HEADS, dh=DH):
    """(masks, class logits, region tokens, stats) of the released forward; sd keys without the prefix."""
    b, h, w, d = feats.shape
    hd = {"heads": heads, "dh": dh}
    stats = {"fully_blocked": 0, "partly_blocked": 0}
    f = feats + _pos(b, h, w, d)
    q = sd["region_queries"].expand(b, -1, -1) if queries is None else queries
    q = _ln(_cross(f.reshape(b, h * w, d), q, sd, "init_cross_attn", **hd) + q, sd, "init_cross_norm")
    q = _ln(_ff(q, sd, "init_ff") + q, sd, "init_ff_norm")
    logits, cls, blocked = _head(q, f, sd, stats)
    for s in range(num_stages):
        up = F.interpolate(f.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)
        f = F.conv2d(up, sd[f"conv_adapters.{s}.conv.weight"], sd[f"conv_adapters.{s}.conv.bias"], padding=1)
        f = f.permute(0, 2, 3, 1)
        _, h, w, _ = f.shape
        f = f + _pos(b, h, w, d)
        p = f"bi_blocks.{s}"
        flat = f.reshape(b, h * w, d)
        q = _ln(_cross(flat, q, sd, p + ".region_to_image", blocked, **hd) + q, sd, p + ".region_to_image_norm")
        q = _ln(_ff(q, sd, p + ".ff_region") + q, sd, p + ".ff_region_norm")
        flat = _ln(_cross(q, flat, sd, p + ".image_to_region", **hd) + flat, sd, p + ".image_to_region_norm")
        flat = _ln(_ff(flat, sd, p + ".ff_image") + flat, sd, p + ".ff_image_norm")
        f = flat.view(b, h, w, d)
        logits, cls, blocked = _head(q, f, sd, stats)
    return logits, cls, q, stats


# ------------------------------------------------------------------------------- released layout
def released_state(num_stages=2, seed=0, proj_bias=0.0, dim=DIM, heads=HEADS, dh=DH, n=N, c=C,
                   mult=MULT) -> dict[str, torch.Tensor]:
    """A random state dict with the released key names (LayerNorm weights random too, to catch swaps)."""
    g = torch.Generator().manual_seed(seed)
    DIM, HEADS, DH, N, C, MULT = dim, heads, dh, n, c, mult  # noqa: N806 - the shapes below

    def r(*shape, s=0.3):
        return torch.randn(*shape, generator=g) * s

    def ln(p):
        return {p + ".weight": 1 + r(DIM, s=0.2), p + ".bias": r(DIM, s=0.1)}

    def attn(p):
        return {**ln(p + ".norm_media"), **ln(p + ".norm_latents"), p + ".to_q.weight": r(HEADS * DH, DIM),
                p + ".to_kv.weight": r(2 * HEADS * DH, DIM), p + ".to_out.weight": r(DIM, HEADS * DH)}

    def ff(p):
        return {**ln(p + ".0"), p + ".1.weight": r(DIM * MULT, DIM), p + ".3.weight": r(DIM, DIM * MULT)}

    sd = {"region_queries": r(1, N, DIM, s=1.0), "region_position_embed.weight": r(N, DIM),
          **attn("init_cross_attn"), **ln("init_cross_norm"), **ff("init_ff"), **ln("init_ff_norm"),
          "segmentation_cls_head.proj.weight": r(DIM, DIM, s=0.1),
          "segmentation_cls_head.proj.bias": r(DIM, s=0.1) + proj_bias,
          "segmentation_cls_head.class_embed.weight": r(C + 1, DIM), "segmentation_cls_head.class_embed.bias": r(C + 1)}
    for s in range(num_stages):
        p = f"bi_blocks.{s}"
        sd.update({f"conv_adapters.{s}.conv.weight": r(DIM, DIM, 3, 3, s=0.05), f"conv_adapters.{s}.conv.bias": r(DIM),
                   **attn(p + ".region_to_image"), **ln(p + ".region_to_image_norm"), **ff(p + ".ff_region"),
                   **ln(p + ".ff_region_norm"), **attn(p + ".image_to_region"), **ln(p + ".image_to_region_norm"),
                   **ff(p + ".ff_image"), **ln(p + ".ff_image_norm")})
    return sd


def imported(sd: dict, num_stages=2) -> ReferenceRegionPerceiver:
    model = ReferenceRegionPerceiver(in_dim=DIM, dim=DIM, num_queries=N, num_stages=num_stages, heads=HEADS,
                                     head_dim=DH, ff_mult=MULT, num_classes=C, pixel_ffn=True).eval()
    full = {f"region_perceiver.{k}": v for k, v in sd.items()}
    full["region_perceiver.to_code.0.weight"] = torch.zeros(4, DIM)  # a stage-2 part: listed, not loaded
    full["modality_predictor.weight"] = torch.zeros(3, DIM)  # outside the perceiver
    state, unused = map_reference_perceiver(full, model.state_dict(), "0079280.pt")
    assert set(unused) == {"region_perceiver.region_position_embed.weight", "region_perceiver.to_code.0.weight",
                           "modality_predictor.weight"}
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("proj_bias, decode", [(0.0, None), (0.0, 3), (-0.6, None), (-0.6, 7)])
def test_reference_variant_matches_released_forward(proj_bias, decode):
    torch.manual_seed(1)
    sd = released_state(proj_bias=proj_bias)
    model = imported(sd)
    feats = torch.randn(2, 3, 3, DIM)
    queries = None if decode is None else torch.randn(2, decode, DIM)
    with torch.no_grad():
        out = model(feats, queries)
        masks, cls, tokens, stats = oracle(sd, feats, queries)
    assert out["pred_masks"].shape == masks.shape == (2, decode or N, 12, 12)
    for ours, ref in ((out["pred_masks"], masks), (out["pred_logits"], cls), (out["queries"], tokens)):
        assert (ours - ref).abs().max().item() <= 1e-3
    # some queries see every pixel blocked (the uniform-attention rule is exercised), others only some
    assert stats["partly_blocked"] > 0 and stats["fully_blocked"] > 0


def test_reference_variant_differs_from_ours_on_blocked_rows():
    """Fully blocked rows: ours un-masks (softmax over the scores), the reference averages uniformly."""
    torch.manual_seed(0)
    model = imported(released_state(proj_bias=-0.6))
    attn = model.stages[0].query_update.attn
    x, ctx = torch.randn(1, 2, DIM), torch.randn(1, 6, DIM)
    mask = torch.tensor([[[False] * 6, [True, False, True, False, False, False]]])
    out = attn(x, ctx, mask)
    v = attn.to_kv(attn.norm_kv(ctx))[..., HEADS * DH:]  # (1, 6, inner)
    torch.testing.assert_close(out[0, 0], attn.to_out(v.mean(1))[0], atol=1e-5, rtol=1e-5)


def test_build_perceiver_variant_and_errors():
    cfg = load_config("stage1", overrides=["perceiver.variant=reference", "perceiver.pixel_ffn=true"])
    assert isinstance(build_perceiver(cfg, cfg.perceiver.dim), ReferenceRegionPerceiver)
    assert isinstance(build_perceiver(load_config("stage1"), 64), RegionPerceiver)
    with pytest.raises(ValueError, match="input projection"):
        build_perceiver(cfg, cfg.perceiver.dim + 8)
    with pytest.raises(ValueError, match="pixel_ffn"):
        build_perceiver(OmegaConf.merge(cfg, {"perceiver": {"pixel_ffn": False}}), cfg.perceiver.dim)
    from medsight.config import ConfigError
    with pytest.raises(ConfigError, match="perceiver.variant"):
        load_config("stage1", overrides=["perceiver.variant=mine"])


def test_mapping_errors_name_the_key():
    sd = {f"region_perceiver.{k}": v for k, v in released_state().items()}
    model = ReferenceRegionPerceiver(in_dim=DIM, dim=DIM, num_queries=N, num_stages=2, heads=HEADS, head_dim=DH,
                                     ff_mult=MULT, num_classes=C)
    bad = dict(sd, **{"region_perceiver.bi_blocks.0.region_self_attn.to_qkv.weight": torch.zeros(1)})
    with pytest.raises(DataError, match="region_self_attn"):
        map_reference_perceiver(bad, model.state_dict(), "x.pt")
    short = {k: v for k, v in sd.items() if "ff_image_norm" not in k}
    with pytest.raises(DataError, match="ff|norm2"):
        map_reference_perceiver(short, model.state_dict(), "x.pt")
