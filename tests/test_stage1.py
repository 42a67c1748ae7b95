"""Stage 1: the exact trainable set, fast_dev_run on the tiny synthetic data (export + metrics files),
strict reload through load_stage1, and the mask-Dice metric and overlay grid on hand-made cases."""

from __future__ import annotations

import json

import pytest
import torch

from medsight.config import to_dict
from medsight.metrics.seg import MaskDice
from medsight.train import trainable_names
from medsight.viz import mask_grid


def _small(cfg):
    cfg.vision.width, cfg.vision.depth, cfg.perceiver.dim, cfg.perceiver.heads, cfg.perceiver.head_dim = 32, 1, 32, 2, 16
    return cfg


def test_trainable_set(tiny_cfg):
    from stages.stage1 import PerceiverModule

    m = PerceiverModule(to_dict(_small(tiny_cfg)))
    all_names = {n for n, _ in m.named_parameters()}
    assert trainable_names(m) == all_names  # tiny encoder trains with the perceiver
    assert {n.split(".")[0] for n in all_names} == {"vision", "perceiver"}
    tiny_cfg.vision.trainable = False
    m = PerceiverModule(to_dict(tiny_cfg))
    assert trainable_names(m) == {n for n, _ in m.named_parameters() if n.startswith("perceiver.")}
    assert m.param_counts["frozen"] == sum(p.numel() for p in m.vision.parameters())


def test_fast_dev_run_writes_export(tiny_cfg, tmp_path):
    from medsight.export import read_meta
    from medsight.models import load_stage1
    from stages.stage1 import main

    args = [f"data.root={tiny_cfg.data.root}", "data.image_size=64", "data.batch_size=4", "data.eval_batch_size=8",
            f"out_root={tmp_path}", "run_name=t", "trainer.fast_dev_run=true", "vision.width=32", "vision.depth=1",
            "perceiver.dim=32", "perceiver.heads=2", "perceiver.head_dim=16"]
    metrics = main(args)
    out = tmp_path / "t" / "stage1"
    assert {p.name for p in (out / "export").iterdir()} == {"vision.safetensors", "perceiver.safetensors",
                                                             "config.yaml", "meta.json", "manifest.json"}
    saved = json.loads((out / "metrics.json").read_text())
    assert {"val/dice", "val/dice_oracle", "wall_time_s"} <= set(saved)
    assert any(k.startswith("val/dice_class/") for k in saved) and any(k.startswith("val/dice_group/") for k in saved)
    assert 0.0 <= saved["val/dice"] <= saved["val/dice_oracle"] + 1e-6 and saved["val/dice"] == pytest.approx(
        metrics["val/dice"], abs=1e-5)
    meta = read_meta(out / "export")
    assert meta["components"] == ["perceiver", "vision"] and meta["select_layer"] == -1
    # strict reload gives the exported weights, frozen
    from medsight.config import load_config
    from medsight.export import load_component

    cfg = load_config("stage1", overrides=args)
    vision, perceiver = load_stage1(out / "export", cfg)
    ref = load_component(out / "export", "perceiver")
    assert all(torch.equal(v, ref[k]) for k, v in perceiver.state_dict().items())
    assert not any(p.requires_grad for p in [*vision.parameters(), *perceiver.parameters()])


def test_mask_dice_metric():
    m = MaskDice(["CT", "MRI"])
    gt = torch.zeros(2, 2, 8, 8)
    gt[0, 0, :4] = 1  # top half
    gt[0, 1, 4:] = 1  # bottom half
    gt[1, 0, :, :2] = 1
    valid = torch.tensor([[True, True], [True, False]])
    labels = torch.tensor([[1, 10], [6, -1]])
    pred = torch.full((2, 3, 4, 4), -10.0)  # predictions at half resolution are upsampled for the metric
    pred[0, 2, :2] = 10.0  # query 2 = GT 0 exactly
    pred[0, 0, 2:, :2] = 10.0  # query 0 = left half of GT 1: Dice 2*16/(16+32) = 2/3
    pred[0, 1, 2:] = 10.0  # query 1 = GT 1 exactly, but not matched (oracle sees it)
    pred[1, 1, :, :1] = 10.0  # image 1: exact
    matches = [(torch.tensor([2, 0]), torch.tensor([0, 1])), (torch.tensor([1]), torch.tensor([0]))]
    m.update(pred, matches, gt, valid, labels, torch.tensor([0, 1]))
    r = m.compute()
    assert r["dice"].item() == pytest.approx((1 + 2 / 3 + 1) / 3, abs=1e-4)
    assert r["dice_oracle"].item() == pytest.approx(1.0)
    assert r["dice_class/liver"].item() == pytest.approx(1.0) and r["dice_class/tumor"].item() == pytest.approx(2 / 3)
    assert r["dice_group/CT"].item() == pytest.approx(5 / 6) and r["dice_group/MRI"].item() == pytest.approx(1.0)
    assert "dice_class/lung" not in r


def test_mask_grid():
    imgs = torch.zeros(3, 3, 16, 16)
    gts = [torch.ones(2, 16, 16), torch.zeros(0, 16, 16), torch.ones(1, 16, 16)]
    grid = mask_grid(imgs, gts, gts, mean=[0.5] * 3, std=[0.5] * 3, max_rows=2, pad=1)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 * 18, 3 * 18)
