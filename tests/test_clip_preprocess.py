"""The reference's preprocessing (`data.preprocess: clip`) and mapping masks back through its crop."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from medsight.data.clip_preprocess import Crop, clip_preprocess, crop_to_input, resized_size


def test_shorter_side_resize_and_centre_crop_geometry():
    assert resized_size(20, 30, 16) == (16, 24) and resized_size(30, 20, 16) == (24, 16)
    assert resized_size(100, 333, 336) == (336, 1118)  # the longer side is truncated, as torchvision does
    img = np.zeros((20, 30, 3), np.uint8)
    img[:, 15:] = 255  # right half white
    x, crops = clip_preprocess([img], 16, [0.0] * 3, [1.0] * 3)
    assert x.shape == (1, 3, 16, 16)
    assert crops[0] == Crop(top=0.0, left=5.0, height=20.0, width=20.0)  # 24 px wide resized, 4 px cut each side
    assert x[0, :, :, :6].max() < 0.05 and x[0, :, :, 10:].min() > 0.95  # the white half stays on the right


def test_masks_map_back_through_the_crop():
    logits = torch.randn(2, 8, 8)
    full = Crop(0.0, 0.0, 16.0, 16.0)  # a square image: the crop is the whole image
    torch.testing.assert_close(crop_to_input(logits, full, (16, 16)),
                               F.interpolate(logits[None], size=(16, 16), mode="bilinear", align_corners=False)[0])
    ones = torch.ones(1, 4, 4)
    out = crop_to_input(ones, Crop(0.0, 5.0, 20.0, 20.0), (20, 30))
    inside = out[0] > 0
    assert inside[:, 5:25].all() and not inside[:, :5].any() and not inside[:, 25:].any()
