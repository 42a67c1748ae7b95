"""MONAI dictionary transforms of the data layer (used by medsight.data.dataset and .datamodule).

load_transform is the deterministic part, whose output the dataset caches as uint8: load with MONAI readers
(LoadMedicalImaged, LoadMasksd), resize images bilinearly and masks nearest to data.image_size (ResizeIfNeededd).
split_transform is the per-split part: augmentation (train + data.augment + segmentation: FlipJitterd, MONAI's
RandFlipd / RandScaleIntensityd / RandShiftIntensityd in one numpy pass), then the CLIP normalisation
(NormalizeUint8d).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    Randomizable,
    Resized,
    Transform,
)

from medsight.data.io import read_image, read_mask


def plain_tensor(x: Any) -> torch.Tensor:
    """MetaTensor -> plain tensor (cheap collate, no metadata tracking)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


# Per-sample arithmetic is numpy (single-threaded): on a shared 2-core CPU, torch's intra-op threads make
# every small elementwise op cost milliseconds, which would make loading the bottleneck.
class LoadMedicalImaged(MapTransform):
    """`key` holds a path -> (3, H, W) float32 in [0, 255] via `medsight.data.io.read_image` (MONAI readers:
    PNG/JPEG, NIfTI middle slice, DICOM with rescale); the original (H, W) goes to `<key>_hw`."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            arr, _ = read_image(d[key])  # (H, W, 3) uint8
            d[f"{key}_hw"] = arr.shape[:2]
            d[key] = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)  # (3, H, W)
        return d


class LoadMasksd(MapTransform):
    """`key` holds a list of tuples of mask paths -> (M, H, W) float32 {0, 1}; a tuple is the union of its
    files. Each mask must have the image's size (`image_hw`); `source` names the record for errors."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            hw = tuple(d["image_hw"])
            out = []
            for group in d[key]:
                m = np.zeros(hw, bool)
                for f in group:
                    m |= read_mask(f, hw, source=d.get("source"))
                out.append(m)
            d[key] = np.stack(out).astype(np.float32) if out else np.zeros((0, *hw), np.float32)  # (M, H, W)
        return d


class ResizeIfNeededd(MapTransform):
    """MONAI `Resized` (bilinear + anti-aliasing for images, nearest for masks), skipped when the array
    already has the target size; returns numpy."""

    def __init__(self, keys: Any, spatial_size: tuple[int, int], mode: str, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.size = tuple(spatial_size)
        self.resize = Resized(keys=keys, spatial_size=spatial_size, mode=mode, anti_aliasing=mode != "nearest",
                              allow_missing_keys=allow_missing_keys)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        todo = [k for k in self.key_iterator(d) if tuple(d[k].shape[1:]) != self.size and d[k].shape[0] > 0]
        if todo:
            r = self.resize({k: d[k] for k in todo})
            for k in todo:
                d[k] = np.asarray(plain_tensor(r[k]))
        return d


def load_transform(image_size: int) -> tuple[Compose, Compose]:
    """Deterministic part (cached): (image path -> (3, S, S) float, mask paths -> (M, S, S) float)."""
    s = (image_size, image_size)
    return (Compose([LoadMedicalImaged(keys="image"), ResizeIfNeededd(keys="image", spatial_size=s, mode="bilinear")]),
            Compose([LoadMasksd(keys="masks"), ResizeIfNeededd(keys="masks", spatial_size=s, mode="nearest")]))


class NormalizeUint8d(MapTransform):
    """uint8 (3, S, S) -> float32 (x / 255 - mean) / std per channel through a lookup table (the same as
    ScaleIntensityRanged(0, 255 -> 0, 1) + NormalizeIntensityd(mean, std, channel_wise), ~20x faster);
    float input is taken as already in [0, 1]."""

    def __init__(self, keys: Any, mean: Sequence[float], std: Sequence[float]):
        super().__init__(keys)
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]
        self.lut = ((np.arange(256, dtype=np.float32)[None, :] / 255.0 - self.mean[:, :, 0]) / self.std[:, :, 0])
        self.chan = np.arange(3)[:, None, None]

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if isinstance(x, np.ndarray) and x.dtype == np.uint8:
                d[key] = self.lut[self.chan, x]  # (3, S, S) float32
            else:
                d[key] = ((np.asarray(plain_tensor(x), np.float32) - self.mean) / self.std).astype(np.float32)
        return d


class FlipJitterd(Randomizable, Transform):
    """Segmentation augmentation on {"image": (3, S, S) uint8, "masks": (M, S, S)}: a left-right flip of image
    and masks (prob. `flip_prob`), then image x (1 + f), f ~ U(-scale, scale) (prob. `scale_prob`), then
    image + o, o ~ U(-shift, shift) (prob. `shift_prob`), on the image in [0, 1]. The same function as MONAI's
    RandFlipd(spatial_axis=1) -> RandScaleIntensityd(factors) -> RandShiftIntensityd(offsets) (tests compare
    them), in one numpy pass: a 128 px training sample is read in 0.2-0.3 ms with it, 2.0 ms with MONAI's three
    (stage 1 reads 8,000). The flip is side-blind: a class set with left/right classes needs data.augment=false.
    Output: image float32 in (about) [0, 1], masks in their dtype, both contiguous."""

    def __init__(self, flip_prob: float = 0.5, scale: float = 0.1, scale_prob: float = 0.5, shift: float = 0.05,
                 shift_prob: float = 0.5) -> None:
        self.flip_prob, self.scale, self.scale_prob = flip_prob, scale, scale_prob
        self.shift, self.shift_prob = shift, shift_prob
        self.params: tuple[bool, float, float] = (False, 0.0, 0.0)

    def randomize(self, data: Any = None) -> None:
        flip = bool(self.R.rand() < self.flip_prob)
        factor = float(self.R.uniform(-self.scale, self.scale)) if self.R.rand() < self.scale_prob else 0.0
        offset = float(self.R.uniform(-self.shift, self.shift)) if self.R.rand() < self.shift_prob else 0.0
        self.params = (flip, factor, offset)

    @staticmethod
    def apply(data: dict, flip: bool, factor: float, offset: float) -> dict:
        d = dict(data)
        img = np.asarray(d["image"], np.float32) / (255.0 if d["image"].dtype == np.uint8 else 1.0)
        masks = np.asarray(d["masks"])
        if flip:
            img, masks = img[..., ::-1], masks[..., ::-1]
        if factor:
            img = img * np.float32(1.0 + factor)
        if offset:
            img = img + np.float32(offset)
        d["image"], d["masks"] = np.ascontiguousarray(img, np.float32), np.ascontiguousarray(masks)
        return d

    def __call__(self, data: dict) -> dict:
        self.randomize()
        return self.apply(data, *self.params)


def split_transform(cfg: Any, task: str, split: str) -> Compose:
    """Per-split part on {"image": (3, S, S) uint8, "masks": (M, S, S) uint8}: augmentation (train,
    segmentation, data.augment: FlipJitterd) then CLIP normalisation."""
    ts: list = []
    if split == "train" and task == "segmentation" and cfg.data.augment:
        ts.append(FlipJitterd())
    ts.append(NormalizeUint8d(keys="image", mean=list(cfg.data.mean), std=list(cfg.data.std)))
    return Compose(ts)


__all__ = [
    "FlipJitterd",
    "LoadMasksd",
    "LoadMedicalImaged",
    "NormalizeUint8d",
    "ResizeIfNeededd",
    "load_transform",
    "plain_tensor",
    "split_transform",
]
