"""The fast RegionPerceiver (folded attention, one shared LayerNorm, contiguous conv layout) computes the same
function as the textbook one: same weights -> same masks, class logits, region tokens and gradients.

The oracle below is a frozen copy of the implementation before the performance work (commit 5366e55), kept
here on purpose: it is the reference the fast path is checked against, so it must not import the code under
test. It loads the fast module's state_dict, which also checks that the parameter names did not change.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsight.models.perceiver import RegionPerceiver


# ------------------------------------------------------------------------------- frozen oracle (5366e55)
def _pos(h: int, w: int, dim: int, temperature: float = 1e4) -> torch.Tensor:
    npf, eps, scale = dim // 2, 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32) / (h + eps) * scale
    x = torch.arange(1, w + 1, dtype=torch.float32) / (w + eps) * scale
    dim_t = torch.arange(npf, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)
    py, px = y[:, None] / dim_t, x[:, None] / dim_t
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)
    return torch.cat([py[:, None, :].expand(h, w, npf), px[None, :, :].expand(h, w, npf)], dim=-1)


class _Attn(nn.Module):
    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x, ctx, mask=None):
        b, nq, _ = x.shape
        q = self.to_q(self.norm_q(x)).view(b, nq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(self.norm_kv(ctx)).view(b, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.to_out(out.transpose(1, 2).reshape(b, nq, -1))


def _ff(dim, mult):
    return nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class _QueryUpdate(nn.Module):
    def __init__(self, dim, heads, head_dim, mult):
        super().__init__()
        self.attn, self.norm1 = _Attn(dim, heads, head_dim), nn.LayerNorm(dim)
        self.ff, self.norm2 = _ff(dim, mult), nn.LayerNorm(dim)

    def forward(self, q, f, mask=None):
        q = self.norm1(q + self.attn(q, f, mask))
        return self.norm2(q + self.ff(q))


class _PixelUpdate(nn.Module):
    def __init__(self, dim, heads, head_dim, mult, pixel_ffn):
        super().__init__()
        self.attn, self.norm1 = _Attn(dim, heads, head_dim), nn.LayerNorm(dim)
        self.ff = _ff(dim, mult) if pixel_ffn else None
        self.norm2 = nn.LayerNorm(dim) if pixel_ffn else None

    def forward(self, f, q):
        f = self.norm1(f + self.attn(f, q))
        return f if self.ff is None else self.norm2(f + self.ff(f))


class _Adapter(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, f):
        x = F.interpolate(f.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(x).permute(0, 2, 3, 1)


class _Stage(nn.Module):
    def __init__(self, dim, heads, head_dim, mult, pixel_ffn):
        super().__init__()
        self.adapter = _Adapter(dim)
        self.query_update = _QueryUpdate(dim, heads, head_dim, mult)
        self.pixel_update = _PixelUpdate(dim, heads, head_dim, mult, pixel_ffn)


class OraclePerceiver(nn.Module):
    def __init__(self, in_dim, dim, num_queries, num_stages, heads, head_dim, ff_mult, num_classes, pixel_ffn,
                 mask_threshold=0.5):
        super().__init__()
        self.mask_threshold = mask_threshold
        self.in_proj = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.query_embed = nn.Parameter(torch.zeros(num_queries, dim))
        self.init_block = _QueryUpdate(dim, heads, head_dim, ff_mult)
        self.stages = nn.ModuleList(_Stage(dim, heads, head_dim, ff_mult, pixel_ffn) for _ in range(num_stages))
        self.mask_embed = nn.Linear(dim, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)

    def _add_pos(self, f):
        return f + _pos(*f.shape[1:])

    def head(self, q, f):
        return torch.einsum("bnd,bhwd->bnhw", self.mask_embed(q), f), self.class_head(q)

    def attention_mask(self, mask_logits, size):
        m = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
        allow = (m.sigmoid() >= self.mask_threshold).flatten(2)
        return allow | ~allow.any(dim=-1, keepdim=True)

    def forward(self, feats, queries=None):
        f = self._add_pos(self.in_proj(feats))
        b = f.shape[0]
        q = self.query_embed.unsqueeze(0).expand(b, -1, -1) if queries is None else queries
        q = self.init_block(q, f.flatten(1, 2))
        masks, logits = self.head(q, f)
        aux = []
        for stage in self.stages:
            aux.append({"pred_masks": masks, "pred_logits": logits})
            f = self._add_pos(stage.adapter(f))
            hh, ww = f.shape[1:3]
            flat = f.flatten(1, 2)
            q = stage.query_update(q, flat, self.attention_mask(masks, (hh, ww)))
            f = stage.pixel_update(flat, q).view(b, hh, ww, -1)
            masks, logits = self.head(q, f)
        return {"pred_masks": masks, "pred_logits": logits, "queries": q, "aux": aux}


# ------------------------------------------------------------------------------------------- tests
CASES = [
    # dim, heads, head_dim, in_dim, stages, grid, external queries, pixel_ffn
    (64, 8, 16, 48, 3, 3, None, True),     # folded paths (heads * N < inner + ...), 3 stages
    (32, 4, 8, 32, 2, 4, None, False),     # in_dim == dim, no pixel FF
    (32, 2, 16, 24, 2, 3, 3, True),        # decode mode with 3 external queries
    (16, 8, 4, 24, 1, 4, 40, True),        # 40 external queries: projecting costs less, textbook path
]


def _pair(dim, heads, head_dim, in_dim, stages, pixel_ffn, seed=0):
    torch.manual_seed(seed)
    fast = RegionPerceiver(in_dim=in_dim, dim=dim, num_queries=20, num_stages=stages, heads=heads,
                           head_dim=head_dim, ff_mult=2, num_classes=17, pixel_ffn=pixel_ffn)
    with torch.no_grad():  # move LayerNorm affines and biases off their init so every folded term matters
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    oracle = OraclePerceiver(in_dim, dim, 20, stages, heads, head_dim, 2, 17, pixel_ffn)
    oracle.load_state_dict(fast.state_dict(), strict=True)
    return fast, oracle


@pytest.mark.parametrize("dim, heads, head_dim, in_dim, stages, grid, external, pixel_ffn", CASES)
def test_fast_perceiver_matches_oracle(dim, heads, head_dim, in_dim, stages, grid, external, pixel_ffn):
    fast, oracle = _pair(dim, heads, head_dim, in_dim, stages, pixel_ffn)
    feats = torch.randn(2, grid, grid, in_dim)
    queries = None if external is None else torch.randn(2, external, dim)
    a, b = fast(feats, queries), oracle(feats, queries)
    for key in ("pred_masks", "pred_logits", "queries"):
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
    for x, y in zip(a["aux"], b["aux"]):
        torch.testing.assert_close(x["pred_masks"], y["pred_masks"], atol=1e-4, rtol=1e-4)
    # the same gradients for every parameter
    for out in (a, b):
        (out["pred_masks"].square().mean() + out["queries"].sum() + out["pred_logits"].sum()).backward()
    for (name, p), q in zip(fast.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_fast_perceiver_matches_oracle_in_eval_no_grad():
    """Inference takes the channels-last conv path; same numbers."""
    fast, oracle = _pair(64, 8, 16, 48, 2, True, seed=1)
    feats = torch.randn(3, 4, 4, 48)
    with torch.no_grad():
        a, b = fast.eval()(feats), oracle.eval()(feats)
    for key in ("pred_masks", "pred_logits", "queries"):
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------- set loss: frozen oracle (5366e55)
def _oracle_set_loss(pred, labels, masks, mask_valid, w, num_classes=17, num_points=0):
    """The previous SetCriterion.single (resolution mode): per-image pairwise costs, assignment, then the
    matched pairs gathered and re-scored with BCE-with-logits and soft Dice."""
    from scipy.optimize import linear_sum_assignment

    x = pred["pred_masks"].flatten(2)
    t = (masks.float() if masks.shape[-2:] == pred["pred_masks"].shape[-2:] else
         F.interpolate(masks.float(), size=pred["pred_masks"].shape[-2:], mode="area")).flatten(2)
    probs = pred["pred_logits"].detach().float().softmax(-1)
    matches = []
    for b in range(x.shape[0]):
        valid = mask_valid[b].nonzero().squeeze(1)
        xb, tb = x[b].detach(), t[b, valid]
        bce = (F.softplus(xb).sum(-1, keepdim=True) - xb @ tb.T) / xb.shape[-1]
        p = xb.sigmoid()
        dice = 1 - (2 * p @ tb.T + 1) / (p.sum(-1)[:, None] + tb.sum(-1)[None, :] + 1)
        cost = w["class"] * -probs[b][:, labels[b, valid]] + w["bce"] * bce + w["dice"] * dice
        rows, cols = linear_sum_assignment(cost.numpy())
        gi = valid[torch.as_tensor(cols)]
        order = gi.argsort()
        matches.append((torch.as_tensor(rows)[order], gi[order]))
    bi = torch.cat([torch.full_like(p, i) for i, (p, _) in enumerate(matches)])
    pi, gi = torch.cat([p for p, _ in matches]), torch.cat([g for _, g in matches])
    xm, tm = x[bi, pi], t[bi, gi]
    num = max(1, gi.numel())
    cls_w = torch.ones(num_classes + 1)
    cls_w[-1] = w["no_object"]
    target = torch.full(pred["pred_logits"].shape[:2], num_classes, dtype=torch.long)
    target[bi, pi] = labels[bi, gi]
    loss_class = F.cross_entropy(pred["pred_logits"].transpose(1, 2), target, weight=cls_w)
    loss_bce = F.binary_cross_entropy_with_logits(xm, tm, reduction="none").mean(-1).sum() / num
    pm = xm.sigmoid()
    loss_dice = (1 - (2 * (pm * tm).sum(-1) + 1) / (pm.sum(-1) + tm.sum(-1) + 1)).sum() / num
    total = w["class"] * loss_class + w["bce"] * loss_bce + w["dice"] * loss_dice
    return {"loss": total, "loss_class": loss_class, "loss_bce": loss_bce, "loss_dice": loss_dice}, matches


@pytest.mark.parametrize("size, gt_size", [(16, 16), (8, 32)])
def test_set_loss_matches_oracle(size, gt_size):
    from medsight.models.matching import SetCriterion

    w = {"class": 2.0, "bce": 5.0, "dice": 5.0, "no_object": 0.1}
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(3, 16, gt_size, gt_size, generator=g) > 0.6).float()
    valid = torch.rand(3, 16, generator=g) > 0.3
    valid[2] = False  # an image without masks
    labels = torch.randint(1, 17, (3, 16), generator=g)
    outs = []
    for _ in range(2):
        pm = (torch.randn(3, 20, size, size, generator=torch.Generator().manual_seed(4)) * 3).requires_grad_()
        pl = torch.randn(3, 20, 18, generator=torch.Generator().manual_seed(5)).requires_grad_()
        outs.append((pm, pl))
    (pm_a, pl_a), (pm_b, pl_b) = outs
    a, ma = SetCriterion(17, w)({"pred_masks": pm_a, "pred_logits": pl_a}, labels, masks, valid)
    b, mb = _oracle_set_loss({"pred_masks": pm_b, "pred_logits": pl_b}, labels, masks, valid, w)
    for (p1, g1), (p2, g2) in zip(ma, mb):
        assert p1.tolist() == p2.tolist() and g1.tolist() == g2.tolist()
    for key in ("loss", "loss_class", "loss_bce", "loss_dice"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    a["loss"].backward()
    b["loss"].backward()
    torch.testing.assert_close(pm_a.grad, pm_b.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(pl_a.grad, pl_b.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_sampled_targets_match_grid_sample(dtype):
    """sample_points gathers the GT at the pixel grid_sample's nearest rule reads (the previous code ran
    grid_sample on the whole GT converted to float): the same targets, also for points outside the grid."""
    from medsight.models.matching import sample_points

    masks = (torch.rand(2, 5, 37, 23) > 0.5).to(dtype)
    pred = torch.randn(2, 4, 9, 9)
    torch.manual_seed(7)
    p, t = sample_points(pred, masks, 3000)
    torch.manual_seed(7)
    coords = torch.rand(2, 1, 3000, 2) * 2 - 1
    want = F.grid_sample(masks.float(), coords, mode="nearest", align_corners=False).squeeze(2)
    torch.testing.assert_close(t, want, atol=0, rtol=0)
    torch.testing.assert_close(p, F.grid_sample(pred, coords, mode="bilinear", align_corners=False).squeeze(2))
    # points on and beyond the border: the same values, zeros outside
    from medsight.models.matching import nearest_targets

    edge = torch.tensor([[[[-1.0, -1.0], [0.9999999, 0.9999999], [1.0, 1.0], [-1.02, 0.0], [1.05, 0.3],
                           [-0.75, 0.25], [0.125, -0.125]]]]).expand(2, 1, 7, 2)
    want = F.grid_sample(masks.float(), edge, mode="nearest", align_corners=False).squeeze(2)
    torch.testing.assert_close(nearest_targets(masks, edge.contiguous()), want, atol=0, rtol=0)
