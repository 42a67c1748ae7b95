"""Atomic, verified exports (medsight.manifest): the streamed safetensors writer against the safetensors
reader, every file listed, a flipped byte / truncation / missing file refused naming the file, a kill while
an export is written leaves the previous export loadable, an interrupted swap is completed, exports without a
manifest load with a warning, a full disk is one error naming the file and leaves nothing half-written."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medsight import faults, manifest
from medsight.atomic import OutputError
from medsight.export import ExportError, load_component, read_meta, save_export
from medsight.faults import SimulatedKill


def _comps(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"perceiver": {"w": torch.randn(300, 70, generator=g), "b": torch.randn(70, generator=g)},
            "vision": {"w": torch.randn(8, 3, 3, 3, generator=g).to(torch.bfloat16)}}


def _export(cfg, path: Path, seed: int = 0) -> Path:
    manifest._verified.clear()
    return save_export(path, cfg, _comps(seed), extra_meta={"seed": seed})


def test_streamed_safetensors_read_by_the_library(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(4, 7).to(torch.bfloat16), "f16": torch.randn(9).half(),
               "i64": torch.arange(6).view(2, 3), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "strided": torch.randn(6, 4).t(), "u8": torch.arange(255, dtype=torch.uint8)}
    with open(tmp_path / "x.safetensors", "wb") as f:
        manifest.write_safetensors(f, tensors)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def test_manifest_lists_every_file_and_hashes_match(tiny_cfg, tmp_path):
    d = _export(tiny_cfg, tmp_path / "export")
    m = json.loads((d / "manifest.json").read_text())
    on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk == {"perceiver.safetensors", "vision.safetensors", "config.yaml", "meta.json"}
    for rel, e in m["files"].items():  # written-while-hashed entries equal a fresh read of the file
        assert manifest.hash_file(d / rel) == e, rel
    assert not manifest._leftovers(d)
    assert torch.equal(load_component(d, "perceiver")["w"], _comps(0)["perceiver"]["w"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing_meta"])
def test_damaged_export_is_refused_naming_the_file(tiny_cfg, tmp_path, damage):
    d = _export(tiny_cfg, tmp_path / "export")
    target = d / "perceiver.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        match = "perceiver.safetensors: content differs from the manifest"
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
        match = r"perceiver.safetensors: \d+ bytes, the manifest says \d+ \(truncated"
    else:
        (d / "meta.json").unlink()
        with pytest.raises(ExportError, match="missing meta.json"):
            read_meta(d)
        return
    with pytest.raises(ExportError, match=match):
        load_component(d, "perceiver")
    assert load_component(d, "vision")  # the intact file still loads


def test_missing_file_listed_in_manifest(tiny_cfg, tmp_path):
    d = _export(tiny_cfg, tmp_path / "export")
    (d / "config.yaml").unlink()
    with pytest.raises(ExportError, match="config.yaml: missing .listed in"):
        manifest.verify_folder(d)


def test_kill_during_export_keeps_the_old_one(tiny_cfg, tmp_path, monkeypatch):
    d = _export(tiny_cfg, tmp_path / "export", seed=0)
    faults.reset()
    monkeypatch.setenv(faults.ENV, "write:perceiver.safetensors")
    with pytest.raises(SimulatedKill):
        _export(tiny_cfg, d, seed=1)
    monkeypatch.delenv(faults.ENV)
    assert manifest._leftovers(d)  # the half-written staging folder, never read
    assert read_meta(d)["seed"] == 0
    assert torch.equal(load_component(d, "perceiver")["w"], _comps(0)["perceiver"]["w"])
    _export(tiny_cfg, d, seed=1)  # the next write clears what the kill left
    assert read_meta(d)["seed"] == 1 and not manifest._leftovers(d)


def test_kill_between_the_two_renames_is_recovered(tiny_cfg, tmp_path, monkeypatch):
    """Without renameat2 the swap is two renames; a kill between them is rolled forward by the next reader."""
    d = _export(tiny_cfg, tmp_path / "export", seed=0)
    monkeypatch.setattr(manifest, "_renameat2_exchange", lambda a, b: False)
    faults.reset()
    monkeypatch.setenv(faults.ENV, "write:export/swap")
    with pytest.raises(SimulatedKill):
        _export(tiny_cfg, d, seed=1)
    monkeypatch.delenv(faults.ENV)
    assert not d.exists()
    assert read_meta(d)["seed"] == 1  # completed from the (complete) staging folder
    assert torch.equal(load_component(d, "perceiver")["w"], _comps(1)["perceiver"]["w"])


def test_export_without_manifest_loads_with_a_warning(tiny_cfg, tmp_path, caplog):
    d = _export(tiny_cfg, tmp_path / "old")
    (d / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="medsight"):
        assert torch.equal(load_component(d, "perceiver")["w"], _comps(0)["perceiver"]["w"])
    assert "has no manifest.json" in caplog.text


def test_full_disk_during_export_one_error_nothing_left(tiny_cfg, tmp_path, monkeypatch):
    d = _export(tiny_cfg, tmp_path / "export", seed=0)

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest._HashingFile, "write", full)
    with pytest.raises(OutputError, match=r"cannot write .*perceiver.safetensors: no space left on the device"):
        _export(tiny_cfg, d, seed=1)
    monkeypatch.undo()
    assert not manifest._leftovers(d) and read_meta(d)["seed"] == 0
