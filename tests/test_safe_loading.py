"""No code from data: a walk over the source tree fails on any new unguarded unpickling call, and
Lightning checkpoints (resume) are read with weights_only=True through medsight.safeload."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: The one module allowed to unpickle (with an allowlist / restricted unpickler).
ALLOWED = {"src/medsight/safeload.py"}
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("torch", "load"),
              ("serialization", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("dill", "load"),
              ("dill", "loads"), ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
              ("cloud_io", "_load")}
LOADERS = {"load_from_checkpoint", "pl_load"}  # Lightning's own checkpoint readers (full unpickling)


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = (f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else
                f.value.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute) else None,
                f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None)
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if name in UNPICKLERS or name[1] in LOADERS:
            out.append(f"{where} calls {'.'.join(n for n in name if n)}")
        for kw in node.keywords:
            value = kw.value.value if isinstance(kw.value, ast.Constant) else None
            if kw.arg == "weights_only" and value is False:
                out.append(f"{where} passes weights_only=False")
            if kw.arg in ("allow_pickle", "trust_remote_code") and value is True:
                out.append(f"{where} passes {kw.arg}=True")
    return out


def test_no_unguarded_unpickling_in_the_source():
    files = [p for d in ("src", "stages", "tests") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 30
    offences = [o for p in files if p.relative_to(REPO).as_posix() not in ALLOWED
                and p.name != "test_safe_loading.py" for o in _offences(p)]
    assert not offences, "unpickle only through medsight.safeload:\n" + "\n".join(offences)


def test_the_walk_catches_each_form(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, torch\nimport numpy as np\npickle.loads(b'')\ntorch.load('x', weights_only=False)\n"
                   "torch.load('y')\nnp.load('z', allow_pickle=True)\nM.load_from_checkpoint('c')\n"
                   "AutoModel.from_pretrained('p', trust_remote_code=True)\n")
    global REPO
    old, REPO = REPO, tmp_path
    try:
        found = _offences(bad)
    finally:
        REPO = old
    assert len(found) == 7, found


def test_lightning_checkpoint_with_a_code_global_is_refused(tmp_path):
    """A `.ckpt` that would run code when unpickled is refused by the loader `resume=` uses."""
    from medsight.resume import atomic_checkpoint_io, load_lightning_checkpoint
    from medsight.safeload import UnsafePickleError

    good = tmp_path / "good.ckpt"
    atomic_checkpoint_io().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, good)
    assert load_lightning_checkpoint(good)["global_step"] == 3

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, evil)
    with pytest.raises(UnsafePickleError, match="evil.ckpt: refused to unpickle global"):
        atomic_checkpoint_io().load_checkpoint(evil)


def test_trainer_resumes_through_the_safe_loader(tmp_path, monkeypatch):
    """Every stage's Trainer reads `ckpt_path=` through medsight's CheckpointIO, i.e. torch.load with
    weights_only=True and the allowlist (Lightning's own loader is never reached)."""
    from medsight.config import load_config
    from medsight.train import build_trainer

    trainer = build_trainer(load_config("stage1", overrides=["trainer.accelerator=cpu"]), tmp_path)
    io = trainer.strategy.checkpoint_io
    assert type(io).__name__ == "AtomicCheckpointIO"
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real(*a, **k))
    path = tmp_path / "c.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    assert io.load_checkpoint(path)["global_step"] == 1 and seen == [True]
