"""The config system: merge order, typo errors naming the key, wrong types, every YAML loads."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medsight.config import CONFIG_DIR, ConfigError, load_config, parse_cli, save_config

OVERLAYS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith(("base", "stage")))


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
@pytest.mark.parametrize("overlay", [None, *OVERLAYS], ids=lambda p: p.stem if p else "default")
def test_every_config_loads(stage, overlay):
    cfg = load_config(stage, [str(overlay)] if overlay else [])
    assert cfg.stage == stage
    assert cfg.codebook.num_groups == len(cfg.data.modality_groups)


def test_merge_order_command_line_wins(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("perceiver:\n  dim: 96\noptim:\n  lr: 0.5\n")
    cfg = load_config("stage1", [str(overlay)], ["optim.lr=0.25"])
    assert cfg.perceiver.dim == 96  # overlay beats base/stage yaml
    assert cfg.optim.lr == 0.25  # command line beats overlay


def test_paper_overlay_values():
    cfg = load_config("stage1", [str(CONFIG_DIR / "paper.yaml")])
    assert (cfg.perceiver.dim, cfg.perceiver.num_queries, cfg.codebook.num_groups) == (1024, 20, 18)
    assert cfg.data.image_size == 336


@pytest.mark.parametrize(
    "override, words",
    [
        ("perceiver.dimm=3", ["perceiver.dimm", "perceiver.dim"]),
        ("optim.learning_rate=3", ["optim.learning_rate"]),
        ("trainer.max_step=3", ["trainer.max_steps"]),
        ("perceiver.dim=abc", ["perceiver.dim"]),
        ("data.on_error=ignore", ["data.on_error", "raise"]),
        ("stage3.phases=[align,typo]", ["stage3.phases", "typo"]),
        ("codebook.num_groups=5", ["codebook.num_groups", "modality_groups"]),
        ("optim.impl=fast", ["optim.impl", "fused"]),
    ],
)
def test_bad_config_names_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("stage1", [], [override])
    for w in words:
        assert w in str(err.value)


def test_typo_in_overlay_names_file(tmp_path):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text("data:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"data\.batchsize.*bad\.yaml.*data\.batch_size|data\.batchsize"):
        load_config("stage1", [str(overlay)])


def test_cli_parsing_and_missing_file():
    assert parse_cli(["a.yaml", "x.y=1"]) == (["a.yaml"], ["x.y=1"])
    with pytest.raises(ConfigError, match="neither"):
        parse_cli(["oops"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("stage1", ["nope.yaml"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config("stage9")


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config("stage2", [], ["seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = OmegaConf.load(tmp_path / "config.yaml")
    assert again.seed == 7 and again.stage == "stage2"
    assert Path(tmp_path / "config.yaml").read_text().startswith("stage: stage2")
