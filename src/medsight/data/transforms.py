"""MONAI dictionary transforms of the data layer (used by medsight.data.dataset and .datamodule).

load_transform is the deterministic part, whose output the dataset caches as uint8: load with MONAI readers
(LoadMedicalImaged, LoadMasksd), resize images bilinearly and masks nearest to data.image_size (ResizeIfNeededd).
split_transform is the per-split part: augmentation (train + data.augment + segmentation: RandFlipd /
RandScaleIntensityd / RandShiftIntensityd), then the CLIP normalisation (NormalizeUint8d).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
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


class _ToUnitFloatd(MapTransform):
    """uint8 image -> float32 in [0, 1]; masks ({0, 1}, any dtype) -> float32 {0, 1} (never divided by 255)."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            scale = 255.0 if key == "image" and d[key].dtype == np.uint8 else 1.0
            d[key] = torch.from_numpy(d[key].astype(np.float32) / scale)
        return d


def split_transform(cfg: Any, task: str, split: str) -> Compose:
    """Per-split part on {"image": (3, S, S) uint8, "masks": (M, S, S) uint8}: augmentation (train,
    segmentation, data.augment: RandFlipd, RandScaleIntensityd, RandShiftIntensityd) then CLIP normalisation."""
    ts: list = []
    if split == "train" and task == "segmentation" and cfg.data.augment:
        ts += [_ToUnitFloatd(keys=["image", "masks"]),
               RandFlipd(keys=["image", "masks"], prob=0.5, spatial_axis=1),
               RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
               RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5)]
    ts.append(NormalizeUint8d(keys="image", mean=list(cfg.data.mean), std=list(cfg.data.std)))
    return Compose(ts)


__all__ = [
    "LoadMasksd",
    "LoadMedicalImaged",
    "NormalizeUint8d",
    "ResizeIfNeededd",
    "load_transform",
    "plain_tensor",
    "split_transform",
]
