"""Segmentation metrics for region masks: Dice of each GT mask against its Hungarian-matched query
(threshold 0.5, at the GT's resolution), averaged over GT masks, per class and per modality group, plus
the oracle best-of-N Dice (the best query for each GT mask, an upper bound on what matching can reach)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from medsight.vocab import CLASSES


def binary_dice(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dice of binary masks (..., P) x (..., P) -> (...); two empty masks score 1."""
    inter = (pred * target).sum(-1)
    total = pred.sum(-1) + target.sum(-1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(eps), torch.ones_like(total))


def pairwise_binary_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, P) x (M, P) binary -> (N, M) Dice."""
    inter = pred @ target.T
    total = pred.sum(-1)[:, None] + target.sum(-1)[None, :]
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-6), torch.ones_like(total))


class MaskDice(Metric):
    """Mean Dice over GT masks of (matched query > threshold) vs GT; per class, per group and oracle.

    update(pred_masks (B, N, h, w) logits, matches [(pred_idx, gt_idx)] per image, masks (B, M, S, S),
    mask_valid (B, M), labels (B, M), modality (B,)). compute() -> {"dice", "dice_oracle",
    "dice_class/<name>", "masks_class/<name>" (how many GT masks that class's Dice averages over),
    "dice_group/<name>"} (classes/groups without GT masks are left out).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, group_names: Sequence[str], num_classes: int = len(CLASSES), threshold: float = 0.5,
                 class_names: dict[int, str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.group_names, self.threshold = list(group_names), threshold
        self.class_names = class_names or CLASSES
        self.add_state("dice_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("oracle_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("class_sum", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("class_count", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("group_sum", torch.zeros(len(self.group_names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("group_count", torch.zeros(len(self.group_names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred_masks: torch.Tensor, matches: list, masks: torch.Tensor, mask_valid: torch.Tensor,
               labels: torch.Tensor, modality: torch.Tensor) -> None:
        size = masks.shape[-2:]
        for b, (pi, gi) in enumerate(matches):
            valid = mask_valid[b].nonzero().squeeze(1)
            if valid.numel() == 0:
                continue
            # only this image's N query maps are upsampled to the GT size, in evaluation only
            # float32 and clamped first: fp16 logits that overflowed to +-inf would interpolate to inf - inf = NaN
            logits = F.interpolate(pred_masks[b:b + 1].float().clamp(-1e4, 1e4), size=size, mode="bilinear",
                                   align_corners=False)[0]
            pred = (logits.sigmoid() > self.threshold).flatten(1).float()  # (N, S*S)
            gt = (masks[b, valid] > 0.5).flatten(1).float()  # (G, S*S)
            all_dice = pairwise_binary_dice(pred, gt)  # (N, G)
            col = {int(g): j for j, g in enumerate(valid.tolist())}
            matched = torch.zeros(len(valid), dtype=torch.float64, device=all_dice.device)
            for p, g in zip(pi.tolist(), gi.tolist()):
                matched[col[g]] = all_dice[p, col[g]]
            oracle = all_dice.max(0).values.double()
            self.dice_sum += matched.sum()
            self.oracle_sum += oracle.sum()
            self.count += len(valid)
            lab = labels[b, valid].long().to(self.class_sum.device)
            self.class_sum.index_add_(0, lab, matched)
            self.class_count.index_add_(0, lab, torch.ones_like(matched))
            g = int(modality[b])
            self.group_sum[g] += matched.sum()
            self.group_count[g] += len(valid)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp_min(1)
        out = {"dice": (self.dice_sum / n).float(), "dice_oracle": (self.oracle_sum / n).float()}
        for c in range(len(self.class_sum)):
            if self.class_count[c] > 0:
                name = self.class_names.get(c, str(c)).replace(" ", "_")
                out[f"dice_class/{name}"] = (self.class_sum[c] / self.class_count[c]).float()
                out[f"masks_class/{name}"] = self.class_count[c].float()
        for g, name in enumerate(self.group_names):
            if self.group_count[g] > 0:
                out[f"dice_group/{name}"] = (self.group_sum[g] / self.group_count[g]).float()
        return out


__all__ = ["MaskDice", "binary_dice", "pairwise_binary_dice"]
