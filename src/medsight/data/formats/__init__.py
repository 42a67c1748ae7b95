"""Readers of the datasets as they are distributed, one module per layout, and THE table of them.

`FORMATS[name]` is shared by `python -m medsight.data.check`, the DataModule (`data.formats`) and the
benchmark suite (`medsight.benchmarks`). Each entry's `read(path, split, groups=, policy=, path_map=, **opts)`
returns a `FormatRead` (samples, rows skipped by rule, files read); it parses and validates only, and never
opens images.

    name          PATH                                                   splits (default first)
    vqa-rad       folder with `VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/` (or test.json + images/)
                                                                         test, train
    slake         SLAKE root: {train,validation,test}.json + imgs/ (English rows by default)   test, train, val
    pathvqa       PathVQA `pvqa` root: qas/<split>/<split>_qa.pkl + images/<split>/        test, train, val
    omnimedvqa    root holding QA_information/ and Images/ (open-access)                   test
    diagseg       the DiagSeg JSON file                                                    test
    pubmedvision  a PubMedVision JSON file (images relative to its folder)                 all, train, val
    instruct      the authors' grounded instruction JSON                                   all, train, val
    biomedparse   a BiomedParse meta file (ours or the reference's BiomedParse_meta.json)  test, train, val
    synthetic     the embedded synthetic dataset root                                      test, train, val
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsight.data import DataError
from medsight.data.formats.biomedparse import read_biomedparse
from medsight.data.formats.common import ErrorPolicy, FormatRead, PathMap, Sample, as_path_map
from medsight.data.formats.diagseg import read_diagseg_file
from medsight.data.formats.instruct import read_instruct
from medsight.data.formats.omnimedvqa import read_omnimedvqa_root
from medsight.data.formats.pathvqa import read_pathvqa
from medsight.data.formats.pubmedvision import read_pubmedvision
from medsight.data.formats.slake import read_slake
from medsight.data.formats.vqa_rad import read_vqa_rad


def _read_biomedparse(path: Any, split: str = "test", groups: Sequence[str] = (), policy: ErrorPolicy | None = None,
                      path_map: PathMap | None = None, val_fraction: float = 0.15, **_: Any) -> FormatRead:
    return FormatRead(read_biomedparse(path, split, groups, val_fraction, policy, path_map), files=[str(path)])


def _read_synthetic(path: Any, split: str = "test", groups: Sequence[str] = (), policy: ErrorPolicy | None = None,
                    path_map: PathMap | None = None, val_fraction: float = 0.25, **_: Any) -> FormatRead:
    """The synthetic dataset's BiomedParse part (the checker also reads its other record sets)."""
    meta = Path(path) / "biomedparse" / "meta.json"
    return _read_biomedparse(meta, split, groups, policy, path_map, val_fraction)


@dataclass(frozen=True)
class Format:
    """One distributed layout: how to read it and what its items are."""

    name: str
    kind: str  # vqa | mcq | diagseg | conversation | segmentation
    read: Callable[..., FormatRead]
    splits: tuple[str, ...]  # the first is the default
    path_help: str

    @property
    def default_split(self) -> str:
        return self.splits[0]


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("vqa-rad", "vqa", read_vqa_rad, ("test", "train"),
           "folder holding 'VQA_RAD Dataset Public.json' and 'VQA_RAD Image Folder/' (or test.json + images/)"),
    Format("slake", "vqa", read_slake, ("test", "train", "val"), "SLAKE root with {train,validation,test}.json, imgs/"),
    Format("pathvqa", "vqa", read_pathvqa, ("test", "train", "val"), "PathVQA pvqa root with qas/ and images/"),
    Format("omnimedvqa", "mcq", read_omnimedvqa_root, ("test",), "root holding QA_information/ and Images/"),
    Format("diagseg", "diagseg", read_diagseg_file, ("test",), "the DiagSeg JSON file"),
    Format("pubmedvision", "conversation", read_pubmedvision, ("all", "train", "val"), "a PubMedVision JSON file"),
    Format("instruct", "conversation", read_instruct, ("all", "train", "val"), "the authors' instruction JSON"),
    Format("biomedparse", "segmentation", _read_biomedparse, ("test", "train", "val"), "a BiomedParse meta file"),
    Format("synthetic", "segmentation", _read_synthetic, ("test", "train", "val"), "the synthetic dataset root"),
)}


def get_format(name: str) -> Format:
    """FORMATS[name]; a DataError listing the names for an unknown one."""
    if name not in FORMATS:
        raise DataError(f"unknown data format '{name}'; choose from {', '.join(FORMATS)}", field="format")
    return FORMATS[name]


def read_format(name: str, path: Any, split: str | None = None, groups: Sequence[str] | None = None,
                policy: ErrorPolicy | None = None, path_map: Any = None, **opts: Any) -> FormatRead:
    """Read `split` (default: the format's) of `path` in layout `name`."""
    from medsight.vocab import PAPER_MODALITY_GROUPS

    fmt = get_format(name)
    split = split or fmt.default_split
    if split not in fmt.splits:
        raise DataError(f"{path}: format '{name}' has splits {list(fmt.splits)}, not '{split}'", path=str(path),
                        field="split")
    return fmt.read(path, split, groups=list(groups or PAPER_MODALITY_GROUPS), policy=policy or ErrorPolicy(),
                    path_map=as_path_map(path_map), **opts)


__all__ = ["FORMATS", "Format", "FormatRead", "PathMap", "Sample", "get_format", "read_format"]
