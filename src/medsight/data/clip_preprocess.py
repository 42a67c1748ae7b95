"""The reference's image preprocessing (`data.preprocess: clip`, open_clip's validation transform as
MedSIGHT uses it; REAL_FORMATS section 5a): resize the shorter side to `size` (bicubic, PIL), centre crop
`size` x `size`, RGB, /255, CLIP mean/std. The crop drops the borders of non-square images, so a mask
predicted on the crop is mapped back into the input frame (`crop_to_input`), False outside the crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Crop:
    """Where the model's square input lies in the input image, in input pixels (fractional)."""

    top: float
    left: float
    height: float
    width: float


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side `size` and the longer one truncated (torchvision's rule)."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def clip_preprocess(images: Sequence[np.ndarray], size: int, mean: Sequence[float],
                    std: Sequence[float]) -> tuple[torch.Tensor, list[Crop]]:
    """(H, W, 3) uint8 images -> ((B, 3, size, size) normalised, the crop of each in input pixels)."""
    from PIL import Image

    out, crops = [], []
    for img in images:
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {img.shape}")
        h, w = img.shape[:2]
        nh, nw = resized_size(h, w, size)
        pil = Image.fromarray(img.astype(np.uint8)).resize((nw, nh), Image.BICUBIC)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        pil = pil.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32).transpose(2, 0, 1).copy()) / 255.0  # (3, S, S)
        x = (x - torch.tensor(list(mean)).view(3, 1, 1)) / torch.tensor(list(std)).view(3, 1, 1)
        out.append(x)
        sy, sx = h / nh, w / nw  # input pixels per resized pixel
        crops.append(Crop(top * sy, left * sx, size * sy, size * sx))
    return torch.stack(out), crops


def crop_to_input(logits: torch.Tensor, crop: Crop, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits (M, h, w) over the crop -> (M, H, W) over the input image: each input pixel centre inside
    the crop samples the logits bilinearly; pixels outside get -inf (never in a mask)."""
    m = logits.shape[0]
    hh, ww = size
    if m == 0:
        return logits.new_zeros(0, hh, ww)
    ys = (torch.arange(hh, dtype=torch.float32) + 0.5 - crop.top) / crop.height * 2 - 1  # grid_sample coords
    xs = (torch.arange(ww, dtype=torch.float32) + 0.5 - crop.left) / crop.width * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].to(logits.device)  # (1, H, W, 2)
    out = F.grid_sample(logits[None].float(), grid, mode="bilinear", align_corners=False, padding_mode="border")[0]
    inside = (gx.abs() <= 1) & (gy.abs() <= 1)
    return out.masked_fill(~inside.to(out.device)[None], float("-inf"))  # (M, H, W)


__all__ = ["Crop", "clip_preprocess", "crop_to_input", "resized_size"]
