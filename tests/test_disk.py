"""Disk and permissions: a full disk (simulated ENOSPC) or an output folder that cannot be written, during a
stage or `medsight predict`, ends with one line naming the path (exit 2) and leaves nothing half-written
where the next step would read it."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from medsight import manifest
from medsight.atomic import OutputError, atomic_file

STAGE1 = ["data.image_size=64", "data.batch_size=4", "data.eval_batch_size=8", "trainer.fast_dev_run=true",
          "vision.width=32", "vision.depth=1", "perceiver.dim=32", "perceiver.heads=2", "perceiver.head_dim=16"]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _stage1(argv, capsys, monkeypatch) -> str:
    """Run stage 1 as `python -m stages.stage1` does (run_stage): exit 2, the error is the last stderr line,
    one line, no traceback (the other lines are the run's INFO log)."""
    import logging

    from medsight.train import run_stage
    from stages.stage1 import main

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # log to this test's stderr
    with pytest.raises(SystemExit) as ex:
        run_stage(lambda: main(argv))
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # (earlier tests' closed log streams can add logging-module noise here; a traceback of the error itself
    # would name OutputError / OSError)
    assert [e for e in err if e.startswith("error:")] == err[-1:], err[-5:]
    assert not any("OutputError" in e or "OSError" in e for e in err), err[-5:]
    return err[-1]


def test_stage_with_unwritable_output_folder(synthetic_root, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = _stage1([f"data.root={synthetic_root}", f"out_root={blocker}", "run_name=t", *STAGE1], capsys, monkeypatch)
    assert line.startswith("error: cannot write ") and str(blocker) in line


def test_stage_with_full_disk_during_export(synthetic_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(manifest._HashingFile, "write", lambda self, data: _enospc())
    line = _stage1([f"data.root={synthetic_root}", f"out_root={tmp_path}", "run_name=t", *STAGE1], capsys, monkeypatch)
    assert "no space left on the device" in line and ".safetensors" in line
    run = tmp_path / "t" / "stage1"
    assert not (run / "export").exists() and not manifest._leftovers(run / "export")


def test_atomic_file_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OutputError, match=f"cannot write {path}: no space left"):
        with atomic_file(path) as f:
            f.write(b"new and longer")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from medsight.model import MedSight
    from tests.test_joint import small_joint

    model, cfg = small_joint(tmp_path_factory.mktemp("joint"), "stage3.max_new_tokens=4")
    return MedSight(model.eval(), cfg, {})


def test_predict_full_disk_leaves_no_answer(tiny_model, tmp_path, monkeypatch):
    from PIL import Image

    from medsight.predict import predict

    image = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(image)
    out = tmp_path / "answer"
    predict("unused", image, "Segment the liver.", out, model=tiny_model)
    assert (out / "answer.json").is_file()
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OutputError, match=f"cannot write {out}/.*: no space left on the device"):
        predict("unused", image, "Segment the liver.", out, model=tiny_model)
    monkeypatch.undo()
    left = sorted(p.name for p in out.iterdir())
    assert "answer.json" not in left and not [n for n in left if ".tmp-" in n], left  # no stale or half answer


def test_predict_cli_unwritable_out_is_one_line(tiny_model, tmp_path, capsys, monkeypatch):
    from PIL import Image

    import medsight
    from medsight.cli import main

    image = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(image)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(medsight, "load", lambda *a, **k: tiny_model)
    rc = main(["predict", "--export", str(tmp_path), "--image", str(image), "--question", "Segment the liver.",
               "--out", str(blocker / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot write" in err[0] and str(blocker) in err[0], err
