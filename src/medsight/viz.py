"""Pictures of masks: image | ground truth overlay | prediction overlay, one row per image, as a uint8
(3, H, W) tensor for TensorBoard's `add_image` (or PNG via `save_png`). Used by stage 1 and predict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

#: distinct colours (RGB in [0, 1]) for the masks of one image, by mask index
PALETTE = torch.tensor([
    [0.90, 0.10, 0.10], [0.10, 0.75, 0.20], [0.15, 0.35, 0.95], [0.95, 0.80, 0.10], [0.80, 0.20, 0.85],
    [0.10, 0.85, 0.85], [1.00, 0.50, 0.00], [0.55, 0.35, 0.15], [0.60, 0.90, 0.40], [0.95, 0.55, 0.70],
])


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """CLIP-normalised (B, 3, S, S) -> [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * s + m).clamp(0, 1)


def overlay(image: torch.Tensor, masks: torch.Tensor, alpha: float = 0.45, outline: bool = True) -> torch.Tensor:
    """image (3, S, S) in [0, 1], masks (K, S, S) binary -> (3, S, S) with each mask tinted and outlined."""
    out = image.clone().float()
    for k in range(masks.shape[0]):
        m = masks[k].float()
        if m.sum() == 0:
            continue
        c = PALETTE[k % len(PALETTE)].view(3, 1, 1).to(out.device)
        out = out * (1 - alpha * m) + c * alpha * m
        if outline:
            eroded = -F.max_pool2d(-m[None, None], 3, stride=1, padding=1)[0, 0]
            edge = (m - eroded).clamp(0, 1)
            out = out * (1 - edge) + c * edge
    return out


def mask_grid(images: torch.Tensor, gt_masks: Sequence[torch.Tensor], pred_masks: Sequence[torch.Tensor],
              mean: Sequence[float], std: Sequence[float], max_rows: int = 8, pad: int = 2) -> torch.Tensor:
    """Rows of [image | GT overlay | prediction overlay]. images (B, 3, S, S) normalised; gt_masks[b] and
    pred_masks[b] (K_b, S, S) binary (the b-th prediction list ordered like its GT, e.g. matched queries).
    Returns uint8 (3, H, W)."""
    imgs = denormalize(images[:max_rows].detach().float().cpu(), mean, std)
    rows = []
    for b in range(imgs.shape[0]):
        tiles = [imgs[b], overlay(imgs[b], gt_masks[b].cpu()), overlay(imgs[b], pred_masks[b].cpu())]
        rows.append(torch.cat([F.pad(t, (pad, pad, pad, pad), value=1.0) for t in tiles], dim=2))
    grid = torch.cat(rows, dim=1) if rows else torch.zeros(3, 1, 1)
    return (grid * 255).round().to(torch.uint8)


def save_png(grid: torch.Tensor, path: Path | str) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def matched_predictions(pred_masks: torch.Tensor, matches: list, size: tuple[int, int] | None = None,
                        threshold: float = 0.5) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image: GT indices of the matches and the binary masks (K, h, w) of their matched queries, from
    mask logits pred_masks (B, N, h, w), resized to `size` (only the matched queries are upsampled)."""
    gts, preds = [], []
    for b, (pi, gi) in enumerate(matches):
        logits = pred_masks[b, pi.to(pred_masks.device)].float()[None]  # (1, K, h, w)
        if size is not None and logits.shape[1]:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        gts.append(gi)
        preds.append(logits[0].sigmoid() > threshold)
    return gts, preds


__all__ = ["PALETTE", "denormalize", "mask_grid", "matched_predictions", "overlay", "save_png"]
