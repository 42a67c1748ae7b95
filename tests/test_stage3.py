"""Stage 3 end to end on tiny random exports: the phase chain, exports, metrics.json, medsight.load; DDP smoke."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ddp_smoke import SMALL, make_exports, small_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # spinning OpenMP threads stall on shared cores
FAST = ["stage3.align.max_steps=2", "stage3.ground.max_steps=2", "stage3.instruct.max_steps=3",
        "stage3.val_batches=1", "stage3.test_batches=1", "stage3.max_new_tokens=6"]


def _argv(cfg, *extra: str) -> list[str]:
    return [f"data.root={cfg.data.root}", f"out_root={cfg.out_root}", f"run_name={cfg.run_name}",
            *SMALL, *FAST, *extra]


def test_needs_stage1_and_stage2_exports(synthetic_root, tmp_path):
    from medsight.export import ExportError
    from medsight.models import stage1_components
    from stages.stage3 import main

    cfg = small_config(synthetic_root, tmp_path)
    with pytest.raises(ExportError, match="run make stage1 first"):
        main(_argv(cfg))
    from medsight.export import save_export

    save_export(tmp_path / "t" / "stage1" / "export", cfg, stage1_components(cfg))
    with pytest.raises(ExportError, match="run make stage2 first"):
        main(_argv(cfg))


def test_stage_cli_user_errors_are_one_line(tmp_path):
    """`python -m stages.stage3` without exports, and with a config typo: exit 2, one line, no traceback."""
    for extra, expected in ((["run_name=none"], "run make stage1 first"), (["stage3.instruct.max_step=1"], "max_steps")):
        proc = subprocess.run([sys.executable, "-m", "stages.stage3", f"out_root={tmp_path}", *extra], cwd=REPO,
                              check=False, capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_phase_chain_exports_and_metrics(synthetic_root, tmp_path):
    """align -> ground -> instruct, each from the previous phase's export; the final export loads strictly
    with medsight.load and holds exactly the instruct phase's weights (and stage 1's encoder/perceiver)."""
    import medsight
    from medsight.export import load_component
    from stages.stage3 import main

    cfg = small_config(synthetic_root, tmp_path)
    make_exports(cfg)
    metrics = main(_argv(cfg))
    out = tmp_path / "t" / "stage3"
    for phase in ("align", "ground", "instruct"):
        assert (out / phase / "export" / "meta.json").is_file() and (out / phase / "ckpt" / "last.ckpt").is_file()
        assert json.loads((out / phase / "export" / "meta.json").read_text())["phase"] == phase
    files = {p.name for p in (out / "export").iterdir()}
    assert files == {"vision.safetensors", "perceiver.safetensors", "projector_v2t.safetensors",
                     "projector_t2v.safetensors", "llm.safetensors", "llm", "tokenizer", "config.yaml", "meta.json",
                     "manifest.json"}
    saved = json.loads((out / "metrics.json").read_text())
    for k in ("test/closed_accuracy", "test/open_recall", "test/grounded_dice", "test/code_accuracy",
              "test/diagseg_recall", "test/diagseg_dice"):
        assert 0.0 <= saved[k] <= 1.0, k
    assert saved["wall_time_s"] > 0 and {"time/align_s", "time/ground_s", "time/instruct_s"} <= set(saved)
    assert metrics["test/closed_accuracy"] == pytest.approx(saved["test/closed_accuracy"], abs=1e-6)
    meta = json.loads((out / "export" / "meta.json").read_text())  # the export says where it came from
    run = tmp_path / "t"  # (the fake stage-1/2 exports were written with a stage-3 config: their "stage" says so)
    assert [e["path"] for e in meta["lineage"]] == [str(run / "stage1" / "export"), str(run / "stage2" / "export")]
    assert meta["phases"] == ["align", "ground", "instruct"] and all(e["git_sha"] for e in meta["lineage"])
    assert meta["lineage"][1]["data"]["root"] == str(synthetic_root)
    assert 0 < len(meta["example_questions"]) <= 6 and not any("<image>" in q for q in meta["example_questions"])
    assert meta["test_metrics"] == {k: pytest.approx(v, abs=1e-6) for k, v in saved.items() if k.startswith("test/")}
    # stage-1 weights really loaded; align trained only v->t, ground then the code rows (init from stage 2)
    s1 = load_component(tmp_path / "t" / "stage1" / "export", "perceiver")
    final = load_component(out / "export", "perceiver")
    assert all(torch.equal(s1[k], final[k]) for k in s1)
    a_t2v = load_component(out / "align" / "export", "projector_t2v")
    g_t2v = load_component(out / "ground" / "export", "projector_t2v")
    assert not all(torch.equal(a_t2v[k], g_t2v[k]) for k in a_t2v)
    model = medsight.load(out / "export")
    state = load_component(out / "export", "llm")
    own = model.model.llm.state_dict()
    assert all(torch.equal(state[k], own[k]) for k in state)
    res = model.answer(np.zeros((64, 64, 3), np.uint8), "Segment the liver.")
    assert isinstance(res["text"], str)
    # resume=auto: finished phases are not trained again; the final export and metrics are rebuilt from them
    again = main(_argv(cfg, "resume=auto"))
    assert set(metrics) - set(again) == {"time/align_s", "time/ground_s", "time/instruct_s"}
    assert all(torch.equal(state[k], v) for k, v in load_component(out / "export", "llm").items())


def test_phase_by_epochs(synthetic_root, tmp_path):
    """stage3.<phase>.max_epochs (the paper overlay's recipe) trains one pass = every batch of the phase's loader."""
    from medsight.config import load_config
    from medsight.joint_data import phase_loader
    from stages.stage3 import main

    cfg = small_config(synthetic_root, tmp_path)
    make_exports(cfg)
    argv = _argv(cfg, "stage3.phases=[ground]", "stage3.ground.max_epochs=1", "stage3.ground.max_steps=1")
    main(argv)
    meta = json.loads((tmp_path / "t" / "stage3" / "ground" / "export" / "meta.json").read_text())
    batches = len(phase_loader(load_config("stage3", overrides=argv), "ground"))
    assert batches > 1 and meta["global_step"] == batches


def test_ddp_two_processes_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_smoke.py"), str(tmp_path)], cwd=REPO,
                          check=False, capture_output=True, text=True, timeout=180, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert "world=2 steps=3" in r0 and r0 == r1  # same steps, identical weights on both ranks


@pytest.mark.slow
def test_fsdp2_two_processes_cpu(tmp_path):
    """trainer.strategy=model_parallel (FSDP2 through Lightning's ModelParallelStrategy) on two CPU processes."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_smoke.py"), str(tmp_path), "model_parallel"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert "world=2 steps=3" in r0 and r0 == r1  # the gathered full weights agree


def test_repeat_sets_the_mix_of_a_phase(synthetic_root, tmp_path):
    """stage3.repeat={diagseg: 2}: every DiagSeg training record twice per epoch (the default), the other sources
    once; a count below 1 or an unknown source fails naming the key."""
    from collections import Counter

    from medsight.config import load_config
    from medsight.joint_data import phase_loader

    cfg = small_config(synthetic_root, tmp_path)
    kinds = lambda argv: Counter(s.extra["kind"] for s in phase_loader(load_config("stage3", overrides=argv),
                                                                        "instruct").dataset.samples)
    plain, mixed = kinds(_argv(cfg, "stage3.repeat={diagseg: 1}")), kinds(_argv(cfg, "stage3.repeat={diagseg: 2}"))
    assert plain["diagseg"] > 0 and mixed["diagseg"] == 2 * plain["diagseg"]
    assert mixed["vqa"] == plain["vqa"] and mixed["instruct"] == plain["instruct"]
    with pytest.raises(ValueError, match="stage3.repeat"):
        kinds(_argv(cfg, "stage3.repeat={vqa: 0}"))
    with pytest.raises(ValueError, match="stage3.repeat"):
        kinds(_argv(cfg, "stage3.repeat={diagsge: 2}"))
