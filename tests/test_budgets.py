"""Step budgets: the default configs carry no time caps, a stage cut by an explicit cap says so in
metrics.json, and the configured batch is the global batch whatever the device count."""

from __future__ import annotations

import json
import logging

import pytest

from medsight.config import ConfigError, load_config
from medsight.train import per_device_batch


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_default_budgets_are_steps_only(stage):
    cfg = load_config(stage)
    assert cfg.trainer.max_time_s is None
    assert cfg.trainer.max_steps > 0
    if stage == "stage3":
        for phase in cfg.stage3.phases:
            assert cfg.stage3[phase].max_time_s is None and cfg.stage3[phase].max_steps > 0


def test_per_device_batch_divides_the_global_batch():
    assert per_device_batch(32, 1) == 32 and per_device_batch(32, 2) == 16 and per_device_batch(32, 4) == 8
    with pytest.raises(ConfigError, match="data.batch_size.*not divisible by the 3"):
        per_device_batch(32, 3)


def _stage1_args(root, tmp_path, *extra):
    return [f"data.root={root}", "data.image_size=64", "data.batch_size=4", "data.eval_batch_size=8",
            f"out_root={tmp_path}", "run_name=t", "vision.width=32", "vision.depth=1", "perceiver.dim=32",
            "perceiver.heads=2", "perceiver.head_dim=16", "trainer.limit_val_batches=1", *extra]


def test_time_cap_is_reported(tiny_cfg, tmp_path, caplog):
    from stages.stage1 import main

    with caplog.at_level(logging.WARNING, logger="medsight"):
        metrics = main(_stage1_args(tiny_cfg.data.root, tmp_path, "trainer.max_steps=50", "trainer.max_time_s=1e-6"))
    saved = json.loads((tmp_path / "t" / "stage1" / "metrics.json").read_text())
    assert saved["stopped_by_time_cap"] is True and metrics["global_step"] < 50
    assert saved["seed"] == 0
    assert any("time cap" in r.getMessage() and "stopping early" in r.getMessage() for r in caplog.records)
    # the per-class Dice comes with the number of val masks it averages over
    classes = {k.removeprefix("val/dice_class/") for k in saved if k.startswith("val/dice_class/")}
    assert classes and classes == {k.removeprefix("val/masks_class/") for k in saved if k.startswith("val/masks_class/")}
    assert all(saved[f"val/masks_class/{c}"] >= 1 for c in classes)


def test_step_budget_is_not_a_time_cap(tiny_cfg, tmp_path):
    from stages.stage1 import main

    metrics = main(_stage1_args(tiny_cfg.data.root, tmp_path, "trainer.max_steps=2"))
    assert metrics["global_step"] == 2 and metrics["stopped_by_time_cap"] is False
