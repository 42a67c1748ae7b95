"""Stage-1 set-prediction loss (SPEC section 3): Hungarian matching per image, then BCE + Dice + class CE on
matched pairs and a down-weighted "no object" CE on the unmatched queries (Mask2Former).

Masks are compared at the prediction's resolution (GT area-downsampled to it) or, with `loss.num_points`
> 0, on random points sampled from the full-resolution GT; query logits are never upsampled to image size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

#: `loss.preset` -> weights that replace the configured ones ("paper" keeps the configured values, whose
#: defaults are the paper's 2 / 5 / 5 with no-object 0.1).
LOSS_PRESETS: dict[str, dict[str, float]] = {
    "official_code": {"class": 1.0, "bce": 1.0, "dice": 1.0, "no_object": 0.0},
}


def loss_weights(loss_cfg: Any) -> dict[str, float]:
    """{"class", "bce", "dice", "no_object"} from a LossConfig (applying `preset`)."""
    w = {"class": float(loss_cfg.class_weight), "bce": float(loss_cfg.bce_weight),
         "dice": float(loss_cfg.dice_weight), "no_object": float(loss_cfg.no_object_weight)}
    w.update(LOSS_PRESETS.get(loss_cfg.preset, {}))
    return w


# --------------------------------------------------------------------------------------------- pairs
def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pair mean BCE: logits, targets (K, P) -> (K,), in float32 (fp16/bf16 sums over many pixels lose
    precision or overflow)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pair soft Dice loss 1 - (2|p.t| + 1) / (|p| + |t| + 1): logits, targets (K, P) -> (K,), in float32
    (an fp16 mask sum over > 65504 pixels would overflow to inf and give NaN). An empty target scores
    1 - 1 / (|p| + 1): 0 for an empty prediction."""
    p = logits.float().sigmoid()
    targets = targets.float()
    return 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)


def pairwise_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) x (M, P) -> (N, M) mean BCE of every prediction against every target."""
    # BCE(x, t) = softplus(x) - x t
    return (F.softplus(logits).sum(-1, keepdim=True) - logits @ targets.T) / logits.shape[-1]


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid()
    return 1 - (2 * p @ targets.T + 1) / (p.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)


def batched_pair_costs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, P) logits and (B, M, P) targets -> mean BCE and soft Dice loss of every (prediction, target)
    pair, (B, N, M) each, differentiable: `pairwise_bce` / `pairwise_dice` batched.

    A matched pair's loss is one entry of these matrices (what `sigmoid_bce_loss` / `dice_loss` give for it),
    so the set loss reads the matched entries instead of gathering and re-scoring the pairs: one pass of
    sigmoid and softplus over the pixels serves both the matching and the loss."""
    x, t = logits.float(), targets.float()
    tt = t.transpose(1, 2)  # (B, P, M)
    p = x.sigmoid()
    bce = (F.softplus(x).sum(-1, keepdim=True) - torch.bmm(x, tt)) / x.shape[-1]  # softplus(x) - x t, mean
    dice = 1 - (2 * torch.bmm(p, tt) + 1) / (p.sum(-1, keepdim=True) + t.sum(-1)[:, None, :] + 1)
    return bce, dice


def _weights(weights: Mapping[str, float] | Any) -> dict[str, float]:
    return dict(weights) if isinstance(weights, Mapping) else loss_weights(weights)


# ----------------------------------------------------------------------------------------- sampling
def resize_targets(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, M, S, S) {0,1} -> (B, M, h, w) soft targets (area average), kept exact when sizes agree."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.float()
    return F.interpolate(masks.float(), size=size, mode="area")


def _points_in_boxes(present: torch.Tensor, k: int, box: float) -> torch.Tensor:
    """k points per mask uniform in its bounding box scaled by `box` about its centre, clipped to the image:
    present (B, M, h, w) bool -> (B, M*k, 2) grid_sample coords (x, y)."""
    b, m, h, w = present.shape
    dev = present.device
    lo, hi = [], []
    for axis, n in ((2, w), (3, h)):  # x: any over rows; y: any over columns
        hit = present.any(axis)  # (B, M, n)
        ar = torch.arange(n, device=dev, dtype=torch.float32)
        lo.append(torch.where(hit, ar, float(n)).amin(-1))
        hi.append(torch.where(hit, ar + 1, 0.0).amax(-1))
    lo_t, hi_t = torch.stack(lo, -1), torch.stack(hi, -1)  # (B, M, 2) as (x, y), pixel units
    size = torch.tensor([w, h], device=dev, dtype=torch.float32)
    centre, half = (lo_t + hi_t) / 2, (hi_t - lo_t).clamp_min(1) * box / 2
    lo_t, hi_t = (centre - half).clamp_min(0), torch.minimum(centre + half, size)
    u = torch.rand(b, m, k, 2, device=dev)
    return (lo_t[:, :, None] + u * (hi_t - lo_t)[:, :, None]).view(b, m * k, 2) / size * 2 - 1


def _points_in_masks(present: torch.Tensor, usable: torch.Tensor, k: int) -> torch.Tensor:
    """k points per mask inside it (a pixel of the mask, then a point in that pixel, off its edges); rows that
    are not `usable` draw any pixel: present (B, M, h, w) bool -> (B, M*k, 2) grid_sample coords (x, y)."""
    b, m, h, w = present.shape
    size = torch.tensor([w, h], device=present.device, dtype=torch.float32)
    weights = torch.where(usable[..., None], present.flatten(2).float(), 1.0)
    pix = torch.multinomial(weights.view(b * m, -1), k, replacement=True).view(b, m * k)
    jitter = torch.rand(b, m * k, 2, device=present.device) * 0.98 + 0.01
    xy = torch.stack(((pix % w).float(), (pix // w).float()), dim=-1)  # (B, M*k, 2) as (x, y)
    return (xy + jitter) / size * 2 - 1


def sample_points(pred: torch.Tensor, masks: torch.Tensor, num_points: int, foreground: float = 0.0,
                  mask_valid: torch.Tensor | None = None, box: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random points, shared by every query and mask of an image: pred (B, N, h, w) and masks (B, M, S, S)
    -> (B, N, P), (B, M, P). Predictions are bilinearly read at the points.

    Uniform over the image, except a `foreground` fraction of them: those are split evenly over the image's
    GT masks and drawn uniformly inside each mask, so that a lesion of a few pixels still gets its share of
    positive points (with uniform points a 50-pixel cyst at 128 px gets ~12 of 4,096, and its Dice term is
    mostly sampling noise). With `box` > 0 those points are drawn instead uniformly in the mask's bounding box
    scaled by `box` about its centre (clipped to the image): positives and the negatives around them, so a
    lesion's boundary is sampled on both sides. Slots of padded (`mask_valid` False) or empty masks fall back
    to uniform points."""
    b, m = masks.shape[:2]
    coords = torch.rand(b, 1, num_points, 2, device=pred.device) * 2 - 1  # grid_sample coords in [-1, 1]
    k = int(num_points * foreground) // m if m and foreground > 0 else 0
    if k:
        present = masks > 0  # (B, M, S, S)
        usable = present.flatten(2).any(-1)
        if mask_valid is not None:
            usable &= mask_valid.bool()
        inside = _points_in_boxes(present, k, box) if box > 0 else _points_in_masks(present, usable, k)
        keep = usable.repeat_interleave(k, dim=1)[..., None]  # (B, M*k, 1)
        coords[:, 0, : m * k] = torch.where(keep, inside, coords[:, 0, : m * k])
    p = F.grid_sample(pred, coords.to(pred.dtype), mode="bilinear", align_corners=False).squeeze(2)
    return p, nearest_targets(masks, coords.to(torch.float32))


def nearest_targets(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """`grid_sample(masks.float(), coords, mode="nearest", align_corners=False)` as (B, M, P) without
    converting the whole GT to float: the pixel each point reads is found by sampling an image of (1-based)
    pixel indices with the same rule (0 = outside the grid), then the GT is gathered as it is (bool at
    1024 px: 1/4 of the float copy). masks (B, M, S, S'), coords (B, 1, P, 2)."""
    b, m, h, w = masks.shape
    n = coords.shape[2]
    if h * w >= 2**24:  # pixel indices would not be exact in float32
        return F.grid_sample(masks.float(), coords, mode="nearest", align_corners=False).squeeze(2)
    index = torch.arange(1, h * w + 1, device=masks.device, dtype=torch.float32).view(1, 1, h, w)
    idx = F.grid_sample(index.expand(b, 1, h, w), coords, mode="nearest",
                        align_corners=False).view(b, 1, n).long() - 1  # (B, 1, P), -1 outside
    picked = masks.flatten(2).gather(2, idx.clamp_min(0).expand(-1, m, -1))  # (B, M, P)
    return picked.float() * (idx >= 0)


def flatten_for_loss(pred_masks: torch.Tensor, masks: torch.Tensor, num_points: int = 0, foreground: float = 0.0,
                     mask_valid: torch.Tensor | None = None, box: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and GT in a common flat form: (B, N, P) logits and (B, M, P) targets.

    num_points > 0: that many uniform random points (Mask2Former); 0: the GT area-averaged to the
    prediction's resolution; < 0: the prediction bilinearly upsampled to the GT's resolution, the way the
    Dice metric reads it (the binary GT as it is). `foreground`, `box`: see `sample_points`."""
    if num_points > 0:
        return sample_points(pred_masks, masks, num_points, foreground, mask_valid, box)
    if num_points < 0 and tuple(pred_masks.shape[-2:]) != tuple(masks.shape[-2:]):
        up = F.interpolate(pred_masks, size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)
        return up.flatten(2), masks.flatten(2).to(up.dtype)
    t = resize_targets(masks, tuple(pred_masks.shape[-2:]))
    return pred_masks.flatten(2), t.flatten(2)


# ----------------------------------------------------------------------------------------- matching
def _assign(probs: torch.Tensor, bce: torch.Tensor, dice: torch.Tensor, labels: torch.Tensor,
            mask_valid: torch.Tensor, w: Mapping[str, float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, the optimal assignment on cost = w_class * (-p(class)) + w_bce * BCE + w_dice * Dice over
    the valid GT masks: probs (B, N, C+1), bce / dice (B, N, M) (detached)."""
    out = []
    for b in range(probs.shape[0]):
        valid = mask_valid[b].nonzero().squeeze(1)
        if valid.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            out.append((empty, empty.clone()))
            continue
        cost = (w["class"] * -probs[b][:, labels[b, valid]] + w["bce"] * bce[b][:, valid]
                + w["dice"] * dice[b][:, valid])  # (N, G)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        pred_idx, gt_idx = torch.as_tensor(rows, dtype=torch.long), valid.cpu()[torch.as_tensor(cols)]
        order = gt_idx.argsort()
        out.append((pred_idx[order], gt_idx[order]))
    return out


@torch.no_grad()
def hungarian_match(pred_logits: torch.Tensor, pred_masks: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                    mask_valid: torch.Tensor, weights: Mapping[str, float] | Any
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Optimal one-to-one assignment of predictions to GT masks per image.

    pred_logits (B, N, C+1), pred_masks (B, N, P) or (B, N, h, w) logits, labels (B, M), masks (B, M, P) or
    (B, M, S, S) (resized to the prediction when 2-D), mask_valid (B, M). Cost = w_class * (-p(class)) +
    w_bce * BCE + w_dice * Dice. Returns per image (pred_idx, gt_idx) LongTensors sorted by gt_idx.
    """
    if pred_masks.dim() == 4:
        pred_masks, masks = flatten_for_loss(pred_masks, masks)
    bce, dice = batched_pair_costs(pred_masks, masks)
    return _assign(pred_logits.float().softmax(-1), bce, dice, labels, mask_valid, _weights(weights))


class SetCriterion(nn.Module):
    """Matching + loss on one prediction (and optionally its `aux` intermediate predictions).

    Returns (losses, matches): losses has `loss` (weighted total) and the unweighted parts `loss_class`,
    `loss_bce`, `loss_dice`; matches are the final prediction's (pred_idx, gt_idx) per image.
    """

    def __init__(self, num_classes: int, weights: Mapping[str, float], num_points: int = 0,
                 deep_supervision: bool = False, foreground_points: float = 0.0, foreground_box: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= foreground_points < 1.0:
            raise ValueError(f"loss.foreground_points={foreground_points}: a fraction in [0, 1)")
        if foreground_box < 0:
            raise ValueError(f"loss.foreground_box={foreground_box}: 0 (inside the masks) or a box scale > 0")
        self.num_classes, self.w = num_classes, dict(weights)
        self.num_points, self.deep_supervision = num_points, deep_supervision
        self.foreground_points, self.foreground_box = foreground_points, foreground_box
        empty = torch.ones(num_classes + 1)
        empty[-1] = self.w["no_object"]
        self.register_buffer("class_weight", empty, persistent=False)

    def single(self, pred: dict, labels: torch.Tensor, masks: torch.Tensor, mask_valid: torch.Tensor
               ) -> tuple[dict[str, torch.Tensor], list]:
        x, t = flatten_for_loss(pred["pred_masks"], masks, self.num_points, self.foreground_points,
                                mask_valid, self.foreground_box)  # (B, N, P), (B, M, P)
        bce, dice = batched_pair_costs(x, t)  # (B, N, M) each, with gradients: matching and loss share them
        probs = pred["pred_logits"].detach().float().softmax(-1)
        matches = _assign(probs, bce.detach(), dice.detach(), labels, mask_valid, self.w)
        bi = torch.cat([torch.full_like(p, i) for i, (p, _) in enumerate(matches)]).to(x.device)
        pi = torch.cat([p for p, _ in matches]).to(x.device)
        gi = torch.cat([g for _, g in matches]).to(x.device)
        num = max(1, gi.numel())
        target_cls = torch.full(pred["pred_logits"].shape[:2], self.num_classes, dtype=torch.long, device=x.device)
        target_cls[bi, pi] = labels[bi, gi]
        logits = pred["pred_logits"].float().transpose(1, 2)  # (B, C+1, N)
        if self.w["no_object"] == 0 and len(bi) == 0:
            # all-background batch with no "no object" term: every target weighs 0 (weighted mean 0/0 = NaN);
            # defined as 0 (nothing to classify), keeping the graph
            loss_class = logits.sum() * 0.0
        else:
            loss_class = F.cross_entropy(logits, target_cls, weight=self.class_weight)
        parts = {"loss_class": loss_class, "loss_bce": bce[bi, pi, gi].sum() / num,
                 "loss_dice": dice[bi, pi, gi].sum() / num}
        parts["loss"] = (self.w["class"] * parts["loss_class"] + self.w["bce"] * parts["loss_bce"]
                         + self.w["dice"] * parts["loss_dice"])
        return parts, matches

    def forward(self, outputs: dict, labels: torch.Tensor, masks: torch.Tensor, mask_valid: torch.Tensor,
                ) -> tuple[dict[str, torch.Tensor], list]:
        losses, matches = self.single(outputs, labels, masks, mask_valid)
        if self.deep_supervision:
            for aux in outputs.get("aux", []):
                losses["loss"] = losses["loss"] + self.single(aux, labels, masks, mask_valid)[0]["loss"]
        return losses, matches


def build_criterion(cfg: Any, num_classes: int | None = None) -> SetCriterion:
    return SetCriterion(num_classes or cfg.perceiver.num_classes, loss_weights(cfg.loss), cfg.loss.num_points,
                        cfg.loss.deep_supervision, cfg.loss.foreground_points, cfg.loss.foreground_box)


__all__ = [
    "LOSS_PRESETS",
    "SetCriterion",
    "batched_pair_costs",
    "build_criterion",
    "dice_loss",
    "flatten_for_loss",
    "hungarian_match",
    "loss_weights",
    "nearest_targets",
    "pairwise_bce",
    "pairwise_dice",
    "sigmoid_bce_loss",
]
