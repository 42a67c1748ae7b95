"""Exact resume: stage 1 and a stage-3 phase killed mid-epoch (MEDSIGHT_FAULT, medsight.faults) and resumed
with resume=auto end with the weights (max |diff| <= 1e-5) and metrics of an uninterrupted run; a kill while
last.ckpt is written leaves the previous checkpoint; samplers continue an epoch where they stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medsight import faults
from medsight.faults import SimulatedKill
from tests.ddp_smoke import SMALL, make_exports, small_config

STAGE1 = ["data.image_size=64", "data.batch_size=4", "data.eval_batch_size=8", "vision.width=32", "vision.depth=1",
          "perceiver.dim=32", "perceiver.heads=2", "perceiver.head_dim=16", "trainer.max_steps=9",
          "trainer.val_check_interval=3", "trainer.max_time_s=null", "trainer.limit_val_batches=2"]
TIME_KEYS = ("wall_time_s", "test_time_s")


def _weights(export: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.stem}/{k}": v for f in sorted(export.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k not in TIME_KEYS and not k.startswith("time/")}


def _ckpt_step(path: Path) -> int:
    from medsight.resume import load_lightning_checkpoint

    return int(load_lightning_checkpoint(path)["global_step"])


def test_stage1_kill_mid_epoch_and_during_last_ckpt(synthetic_root, tmp_path, monkeypatch):
    """24 training images in batches of 4: 6 steps per epoch, so the step-3 and step-6 checkpoints are mid-
    epoch and at an epoch end, and the run (9 steps) crosses into the second epoch."""
    from stages.stage1 import main

    base = [f"data.root={synthetic_root}", f"out_root={tmp_path}", *STAGE1]
    main([*base, "run_name=full"])
    ref = _weights(tmp_path / "full" / "stage1" / "export")

    # killed at the start of step 8, mid-epoch 2 (last.ckpt holds step 6, the end of epoch 1), then resume=auto
    monkeypatch.setenv(faults.ENV, "step:8")
    with pytest.raises(SimulatedKill):
        main([*base, "run_name=kill"])
    run = tmp_path / "kill" / "stage1"
    assert _ckpt_step(run / "ckpt" / "last.ckpt") == 6 and not (run / "export").exists()
    monkeypatch.delenv(faults.ENV)
    main([*base, "run_name=kill", "resume=auto"])
    diff = _max_diff(ref, _weights(run / "export"))
    assert diff <= 1e-5, diff
    assert _metrics(run) == _metrics(tmp_path / "full" / "stage1")

    # killed while writing the second last.ckpt (step 6): the step-3 (mid-epoch) checkpoint survives and resumes
    # exactly
    faults.reset()
    monkeypatch.setenv(faults.ENV, "write:last.ckpt:2")
    with pytest.raises(SimulatedKill):
        main([*base, "run_name=write"])
    run = tmp_path / "write" / "stage1"
    assert _ckpt_step(run / "ckpt" / "last.ckpt") == 3
    assert list((run / "ckpt").glob(".last.ckpt.tmp-*"))  # the half-written temporary file, never read
    monkeypatch.delenv(faults.ENV)
    main([*base, "run_name=write", "resume=auto"])
    assert _max_diff(ref, _weights(run / "export")) <= 1e-5


def test_resume_auto_with_nothing_says_so(synthetic_root, tmp_path, caplog):
    from medsight.config import load_config
    from medsight.train import resume_checkpoint

    cfg = load_config("stage1", overrides=["resume=auto"])
    with caplog.at_level("WARNING", logger="medsight"):
        assert resume_checkpoint(cfg, tmp_path) is None
    assert "nothing to resume" in caplog.text and str(tmp_path / "ckpt" / "last.ckpt") in caplog.text
    from medsight.config import ConfigError

    with pytest.raises(ConfigError, match="config key 'resume': checkpoint .*nope.ckpt not found"):
        resume_checkpoint(load_config("stage1", overrides=[f"resume={tmp_path / 'nope.ckpt'}"]), tmp_path)


def test_stage3_phase_kill_mid_epoch(synthetic_root, tmp_path, monkeypatch):
    """The instruct phase (4 batches per epoch here) killed at step 3, after its step-2 checkpoint: the
    resumed run skips the finished align/ground phases, continues instruct mid-epoch and ends with the same
    weights and test metrics."""
    from stages.stage3 import FEATURES, main

    cfg = small_config(synthetic_root, tmp_path)
    make_exports(cfg)
    argv = [f"data.root={cfg.data.root}", f"out_root={cfg.out_root}", *SMALL, "stage3.align.max_steps=1",
            "stage3.ground.max_steps=1", "stage3.instruct.max_steps=6", "stage3.val_batches=1",
            "stage3.test_batches=1", "stage3.max_new_tokens=4", "trainer.checkpoint_every_n_steps=2",
            "trainer.max_time_s=null", "stage3.align.max_time_s=null", "stage3.ground.max_time_s=null",
            "stage3.instruct.max_time_s=null", "llm.attention_dropout=0.1", "llm.image_dropout=0.1"]

    for name in ("full", "kill"):  # both runs start from the same stage-1/2 exports
        shutil.copytree(tmp_path / "t", tmp_path / name)
    main([*argv, "run_name=full"])
    ref = _weights(tmp_path / "full" / "stage3" / "export")
    monkeypatch.setenv(faults.ENV, "step:3")
    with pytest.raises(SimulatedKill):
        main([*argv, "run_name=kill"])
    run = tmp_path / "kill" / "stage3"
    assert _ckpt_step(run / "instruct" / "ckpt" / "last.ckpt") == 2
    monkeypatch.delenv(faults.ENV)
    FEATURES.store.clear()
    main([*argv, "run_name=kill", "resume=auto"])
    diff = _max_diff(ref, _weights(run / "export"))
    assert diff <= 1e-5, diff
    assert _metrics(run) == _metrics(tmp_path / "full" / "stage3")


def test_samplers_continue_an_epoch():
    """Each training sampler, resumed at (epoch, k), yields exactly the rest of that epoch, then the same
    next epoch as an uninterrupted one; a finished epoch resumes at the next."""
    from medsight.joint_data import LengthGroupedBatches
    from medsight.regions import BucketBatches
    from medsight.resume import SeededShuffle

    def batches_of(s):
        items = list(s)
        return [items[i:i + 3] for i in range(0, len(items) - len(items) % 3, 3)] if isinstance(s, SeededShuffle) else items

    makers = [lambda: SeededShuffle(20, 3, True, seed=1),
              lambda: BucketBatches([1, 2, 1, 1, 2, 3, 1, 2, 1, 1, 2, 2], 2, True, seed=1),
              lambda: LengthGroupedBatches([5, 70, 9, 130, 40, 8, 200, 64, 11, 90, 3, 33], 2, seed=1, pool=2)]
    for make in makers:
        s = make()
        e0, e1 = batches_of(s), batches_of(s)
        assert e0 != e1  # a new order each epoch
        assert len(e0) == s.num_batches()
        for k in (0, 2, len(e0)):
            r = make()
            r.resume_at(0, k)
            rest = batches_of(r)
            assert rest == (e0[k:] if k < len(e0) else e1)
            if k < len(e0):
                assert batches_of(r) == e1


@pytest.mark.slow  # ~11 s; stage 1 and the stage-3 phase (the fast suite) cover the shared mechanism
def test_stage2_kill_mid_epoch(synthetic_root, tmp_path, monkeypatch):
    """Stage 2 (bucketed batches, random query draws, dead-code re-seeding every 2 steps) killed at step 5
    after its step-3 checkpoint: the resumed run ends with the same codebook and metrics."""
    from medsight.config import load_config, run_dir
    from medsight.export import save_export
    from medsight.models import stage1_components
    from stages.stage2 import main
    from tests.test_stage2 import TINY

    def argv(name: str) -> list[str]:
        return [f"data.root={synthetic_root}", f"out_root={tmp_path}", f"run_name={name}", *TINY,
                "trainer.max_steps=8", "trainer.val_check_interval=3", "trainer.max_time_s=null",
                "codebook.warmup_steps=2", "codebook.reseed_every=2", "codebook.mask_every=1"]

    for name in ("full", "kill"):
        torch.manual_seed(0)
        cfg = load_config("stage1", overrides=argv(name))
        save_export(run_dir(cfg) / "export", cfg, stage1_components(cfg))
    main(argv("full"))
    monkeypatch.setenv(faults.ENV, "step:5")
    with pytest.raises(SimulatedKill):
        main(argv("kill"))
    run = tmp_path / "kill" / "stage2"
    assert _ckpt_step(run / "ckpt" / "last.ckpt") == 3
    monkeypatch.delenv(faults.ENV)
    main([*argv("kill"), "resume=auto"])
    diff = _max_diff(_weights(tmp_path / "full" / "stage2" / "export"), _weights(run / "export"))
    assert diff <= 1e-5, diff
    assert _metrics(run) == _metrics(tmp_path / "full" / "stage2")
