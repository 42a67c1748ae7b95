"""Validate a dataset: open every image and mask, count, and report problems as ONE JSON object on stdout.

Run: python -m medsight.data.check biomedparse <meta.json> [--groups CT,MRI,...] [--val-fraction 0.15]
     python -m medsight.data.check synthetic <dataset root>        (a few seconds for the default dataset)
Output: {"images", "annotations", "classes": {class id: masks}, "modality_groups": {group id: images},
"splits": {split: {"images", "cases"}}, "sets": {...}, "problems": [{"file", "field", "message"}]}.
Exit status 0 when there is no problem, 1 otherwise (2: bad arguments). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medsight.data import DataError
from medsight.data.io import read_image, read_mask
from medsight.data.readers import (
    SPLITS,
    ErrorPolicy,
    Sample,
    read_biomedparse,
    read_conversations,
    read_diagseg,
    read_omnimedvqa,
    read_vqa,
)
from medsight.vocab import PAPER_MODALITY_GROUPS, SYNTHETIC_MODALITY_GROUPS

log = logging.getLogger(__name__)


class _Opener:
    """Opens each image/mask file once; remembers image sizes and failures."""

    def __init__(self, policy: ErrorPolicy):
        self.policy = policy
        self.sizes: dict[str, tuple[int, int] | None] = {}
        self.masks_ok: dict[str, bool] = {}

    def image(self, s: Sample, field: str) -> bool:
        if s.image not in self.sizes:
            try:
                self.sizes[s.image] = read_image(s.image)[0].shape[:2]
            except DataError as e:
                self.sizes[s.image] = None
                self.policy(DataError(f"{s.source}: record {s.id} field '{field}': image {s.image}: {e}",
                                      path=s.image, field=field))
        return self.sizes[s.image] is not None

    def masks(self, s: Sample, field: str) -> int:
        """Opens the record's masks; returns how many opened fine (with the image's size)."""
        hw = self.sizes.get(s.image)
        ok = 0
        for group in s.masks:
            good = True
            for f in group:
                if f not in self.masks_ok:
                    try:
                        read_mask(f, hw, source=s.source, field=field)
                        self.masks_ok[f] = True
                    except DataError as e:
                        self.masks_ok[f] = False
                        self.policy(DataError(f"{e} [record {s.id}]", path=f, field=field))
                good &= self.masks_ok[f]
            ok += good
        return ok


def check_biomedparse(meta: Path, groups: Sequence[str], val_fraction: float, policy: ErrorPolicy,
                      opener: _Opener) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """Counts for a BiomedParse meta file; returns (report, cases per split)."""
    report: dict[str, Any] = {"images": 0, "annotations": 0, "classes": Counter(), "modality_groups": Counter(),
                              "splits": {}}
    cases: dict[str, set[str]] = {}
    for split in SPLITS:
        try:
            recs = read_biomedparse(meta, split, groups, val_fraction, policy)
        except DataError as e:
            policy(e)
            recs = []
        n_img = 0
        for s in tqdm(recs, desc=f"check biomedparse/{split}", disable=None, file=sys.stderr, leave=False):
            if not opener.image(s, "file_name"):
                continue
            n_img += 1
            report["modality_groups"][str(s.modality)] += 1
            before = len(policy.problems)
            n_ok = opener.masks(s, "mask_file")
            if len(policy.problems) == before:
                for lab in s.labels:
                    report["classes"][str(lab)] += 1
            report["annotations"] += n_ok
        report["images"] += n_img
        cases[split] = {s.case for s in recs}
        report["splits"][split] = {"images": n_img, "cases": len(cases[split])}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        for c in sorted(cases[a] & cases[b]):
            policy(DataError(f"{meta}: case {c} is in both the {a} and the {b} split", path=meta, field="file_name"))
    report["classes"] = dict(sorted(report["classes"].items(), key=lambda kv: int(kv[0])))
    report["modality_groups"] = dict(sorted(report["modality_groups"].items(), key=lambda kv: int(kv[0])))
    return report, cases


def check_synthetic(root: Path, groups: Sequence[str], val_fraction: float, policy: ErrorPolicy) -> dict[str, Any]:
    """The BiomedParse part plus vqa/instruct/diagseg/omnimedvqa JSON; no case may appear in two splits."""
    opener = _Opener(policy)
    report, cases = check_biomedparse(root / "biomedparse" / "meta.json", groups, val_fraction, policy, opener)
    sets: dict[str, Any] = {}
    readers = {"vqa": (read_vqa, "image"), "instruct": (read_conversations, "mask_files"),
               "diagseg": (read_diagseg, "masks")}
    for name, (reader, mfield) in readers.items():
        sets[name] = {}
        for split in SPLITS:
            f = root / name / f"{split}.json"
            try:
                recs = reader(f, groups, root, policy)
            except DataError as e:
                policy(e)
                continue
            sets[name][split] = len(recs)
            for s in tqdm(recs, desc=f"check {name}/{split}", disable=None, file=sys.stderr, leave=False):
                if opener.image(s, "image_file" if name == "diagseg" else "image"):
                    opener.masks(s, mfield)
            _overlap(f, split, {s.case for s in recs}, cases, policy)
    sets["omnimedvqa"] = {}
    files = sorted((root / "omnimedvqa").glob("*.json"))
    if not files:
        policy(DataError(f"{root / 'omnimedvqa'}: no <modality>.json files", path=root / "omnimedvqa"))
    for f in files:
        try:
            recs = read_omnimedvqa(f, groups, root, policy)
        except DataError as e:
            policy(e)
            continue
        sets["omnimedvqa"][f.stem] = len(recs)
        for s in recs:
            opener.image(s, "image_path")
        _overlap(f, "test", {s.case for s in recs}, cases, policy)
    corpus = root / "corpus.txt"
    if not corpus.is_file() or not corpus.read_text().strip():
        policy(DataError(f"{corpus}: missing or empty", path=corpus))
    report["sets"] = sets
    return report


def _overlap(f: Path, split: str, got: set[str], cases: dict[str, set[str]], policy: ErrorPolicy) -> None:
    for other, cs in cases.items():
        if other != split:
            for c in sorted(got & cs):
                policy(DataError(f"{f}: case {c} of this {split} file is in the BiomedParse {other} split",
                                 path=f, field="image"))


def run_check(fmt: str, path: str | Path, groups: Sequence[str] | None = None,
              val_fraction: float | None = None) -> dict[str, Any]:
    """The checker's report as a dict (see module docstring)."""
    path = Path(path)
    if val_fraction is None:
        val_fraction = 0.15
        gen = path / "generator.json"
        if fmt == "synthetic" and gen.is_file():
            val_fraction = float(json.loads(gen.read_text())["params"]["val_fraction"])
    policy = ErrorPolicy("collect")
    if fmt == "synthetic":
        report = check_synthetic(path, list(groups or SYNTHETIC_MODALITY_GROUPS), val_fraction, policy)
    elif fmt == "biomedparse":
        report, _ = check_biomedparse(path, list(groups or PAPER_MODALITY_GROUPS), val_fraction, policy,
                                      _Opener(policy))
    else:
        raise ValueError(f"unknown format '{fmt}'; choose from biomedparse, synthetic")
    report["problems"] = [{"file": e.path, "field": e.field, "message": str(e)} for e in policy.problems]
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Validate a dataset; prints one JSON object.")
    ap.add_argument("format", choices=["biomedparse", "synthetic"])
    ap.add_argument("path", help="biomedparse: the meta file; synthetic: the dataset root")
    ap.add_argument("--groups", default=None, help="comma-separated modality groups (default: synthetic 4 / paper 18)")
    ap.add_argument("--val-fraction", type=float, default=None,
                    help="validation share of training cases (default: generator.json's for synthetic, else 0.15)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    groups = args.groups.split(",") if args.groups else None
    with contextlib.redirect_stdout(sys.stderr):  # third-party chatter must not corrupt the JSON
        try:
            report = run_check(args.format, args.path, groups, args.val_fraction)
        except DataError as e:
            report = {"images": 0, "annotations": 0, "classes": {}, "modality_groups": {}, "splits": {},
                      "problems": [{"file": e.path, "field": e.field, "message": str(e)}]}
    sys.stdout.write(json.dumps(report) + "\n")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
