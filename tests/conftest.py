"""Shared test fixtures: a small synthetic dataset generated once per session, and a tiny config on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_flush_denormal(True)

#: Generator overrides of the session dataset: 4 groups x 4 cases x 3 slices = 48 images of 64 x 64.
SYNTHETIC_TEST_OVERRIDES = [
    "data.synthetic.image_size=64",
    "data.synthetic.cases_per_group=4",
    "data.synthetic.slices_per_case=3",
    "data.synthetic.test_fraction=0.25",
]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (all formats; train/val/test each hold >= 1 case per group), < 1 s."""
    from medsight.config import load_config
    from medsight.data.synthetic import generate, generator_params

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, generator_params(load_config("stage1", overrides=SYNTHETIC_TEST_OVERRIDES)))
    return root


@pytest.fixture
def tiny_cfg(synthetic_root: Path):
    """stage1 config on `synthetic_root`, images at 64 px, batch 4 (a fresh copy per test)."""
    from medsight.config import load_config

    return load_config("stage1", overrides=[f"data.root={synthetic_root}", "data.image_size=64",
                                            "data.batch_size=4", "data.eval_batch_size=4",
                                            *SYNTHETIC_TEST_OVERRIDES])
