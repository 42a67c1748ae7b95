"""Validate a dataset: open every image and mask, count, and report problems as ONE JSON object on stdout.

Run: python -m medsight.data.check FORMAT PATH [--split S] [--workers N] [--sample N] [--path-map OLD=NEW ...]
     FORMAT: one of medsight.data.formats.FORMATS (vqa-rad, slake, pathvqa, omnimedvqa, diagseg, pubmedvision,
     instruct, biomedparse, synthetic); PATH as each format describes (`--help`).
Output for the distributed layouts: {"format", "path", "split", "records" (items of the split), "images"
(distinct image files of those items), "opened" (images opened: all, or --sample N of them), for VQA sets
"closed" and "open", for OmniMedVQA "modalities" {group: items}, for DiagSeg and the instruction JSON "masks"
(distinct mask files referenced), for PubMedVision and the instruction JSON "skipped" (rows with more than 4
images, dropped as the reference does), "problems": [{"file", "field", "message"}]}.
biomedparse <meta.json> / synthetic <root> (no --split: every split): {"images", "annotations", "classes":
{class id: masks}, "modality_groups": {group id: images}, "splits": {split: {"images", "cases"}}, "sets": {...},
"problems"}. Exit status 0 when there is no problem, 1 otherwise (each problem names its file; the first few
are also logged to stderr), 2: bad arguments. Progress goes to stderr.
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
from medsight.data.formats import FORMATS, read_format
from medsight.data.formats.common import PathMap, as_path_map
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
                      opener: _Opener, path_map: PathMap | None = None) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """Counts for a BiomedParse meta file; returns (report, cases per split)."""
    report: dict[str, Any] = {"images": 0, "annotations": 0, "classes": Counter(), "modality_groups": Counter(),
                              "splits": {}}
    cases: dict[str, set[str]] = {}
    for split in SPLITS:
        try:
            recs = read_biomedparse(meta, split, groups, val_fraction, policy, path_map)
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


def _open_all(paths: list[str], open_one: Any, workers: int, desc: str) -> list[Any]:
    """open_one(path) for every path, in order, on `workers` threads (image decoding releases the GIL)."""
    if workers <= 1:
        return [open_one(p) for p in tqdm(paths, desc=desc, disable=None, file=sys.stderr, leave=False)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(open_one, paths), total=len(paths), desc=desc, disable=None, file=sys.stderr,
                         leave=False))


def check_format(fmt: str, path: Path, split: str | None, groups: Sequence[str], policy: ErrorPolicy,
                 path_map: PathMap, workers: int = 1, sample: int | None = None,
                 **opts: Any) -> dict[str, Any]:
    """Counts for one split of a distributed layout; opens its images (and masks), all or `sample` of them."""
    import random

    spec = FORMATS[fmt]
    split = split or spec.default_split
    got = read_format(fmt, path, split, groups, policy, path_map, **opts)
    recs = got.samples
    report: dict[str, Any] = {"format": fmt, "path": str(path), "split": split, "records": len(recs)}
    first_user: dict[str, Sample] = {}
    for s in recs:
        for im in s.all_images:
            first_user.setdefault(im, s)
    images = list(first_user)
    report["images"] = len(images)
    mask_files: dict[str, Sample] = {}
    for s in recs:
        for group in s.masks:
            for f in group:
                mask_files.setdefault(f, s)
    to_open = images if sample is None or sample >= len(images) else random.Random(0).sample(images, sample)
    sizes: dict[str, tuple[int, int] | None] = {}

    def open_image(p: str) -> tuple[int, int] | DataError:
        try:
            return tuple(read_image(p)[0].shape[:2])
        except DataError as e:
            return e

    for p, res in zip(to_open, _open_all(to_open, open_image, workers, f"check {fmt}/{split} images")):
        if isinstance(res, DataError):
            s = first_user[p]
            policy(DataError(f"{p}: cannot read image ({str(res).removeprefix(p + ': ')}){path_map.explain(p)} "
                             f"[record {s.id} of {s.source}]", path=p, field="image"))
            sizes[p] = None
        else:
            sizes[p] = res
    report["opened"] = len(to_open)
    if spec.kind == "vqa":
        report["closed"] = sum(s.answer_type == "CLOSED" for s in recs)
        report["open"] = sum(s.answer_type == "OPEN" for s in recs)
    if spec.kind == "mcq":
        report["modalities"] = dict(Counter(s.extra["modality_group"] for s in recs))
    if spec.kind == "diagseg":
        report["modalities"] = dict(Counter(str(s.extra.get("modality_name")) for s in recs))
    if spec.kind in ("diagseg", "conversation", "segmentation"):
        report["masks"] = len(mask_files)
        masks = list(mask_files)
        sampled = set(to_open)
        if sample is not None:
            masks = [m for m in masks if mask_files[m].image in sampled]

        def open_mask(m: str) -> DataError | None:
            try:
                read_mask(m, sizes.get(mask_files[m].image), source=mask_files[m].source, field="masks")
                return None
            except DataError as e:
                return e

        for m, err in zip(masks, _open_all(masks, open_mask, workers, f"check {fmt}/{split} masks")):
            if err is not None:
                policy(DataError(f"{err}{path_map.explain(m) if 'not found' in str(err) else ''} "
                                 f"[record {mask_files[m].id}]", path=m, field="masks"))
    if spec.kind == "conversation":
        report["skipped"] = got.skipped
    return report


def run_check(fmt: str, path: str | Path, groups: Sequence[str] | None = None,
              val_fraction: float | None = None, split: str | None = None, workers: int = 1,
              sample: int | None = None, path_map: Any = None, **opts: Any) -> dict[str, Any]:
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
                                      _Opener(policy), as_path_map(path_map))
    elif fmt in FORMATS:
        report = check_format(fmt, path, split, list(groups or PAPER_MODALITY_GROUPS), policy,
                              as_path_map(path_map), workers, sample, **opts)
    else:
        raise ValueError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    report["problems"] = [{"file": e.path, "field": e.field, "message": str(e)} for e in policy.problems]
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Validate a dataset; prints one JSON object.",
        epilog="PATH per format: " + "; ".join(f"{n}: {f.path_help}" for n, f in FORMATS.items()))
    ap.add_argument("format", choices=list(FORMATS))
    ap.add_argument("path", help="the dataset file or folder (see below)")
    ap.add_argument("--split", default=None, help="split to check (default: test; pubmedvision/instruct: all)")
    ap.add_argument("--workers", type=int, default=1, help="threads opening images (default 1)")
    ap.add_argument("--sample", type=int, default=None,
                    help="open only N of the images (a seeded random choice); counts still cover every record")
    ap.add_argument("--path-map", action="append", default=[], metavar="OLD=NEW",
                    help="rewrite an absolute path prefix of the authors' disk (repeatable)")
    ap.add_argument("--lang", default="en", help="slake: en (default), zh or all")
    ap.add_argument("--groups", default=None, help="comma-separated modality groups (default: synthetic 4 / paper 18)")
    ap.add_argument("--val-fraction", type=float, default=None,
                    help="validation share of training cases (default: generator.json's for synthetic, else 0.15)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    groups = args.groups.split(",") if args.groups else None
    with contextlib.redirect_stdout(sys.stderr):  # third-party chatter must not corrupt the JSON
        try:
            opts = {"lang": args.lang} if args.format == "slake" else {}
            report = run_check(args.format, args.path, groups, args.val_fraction, args.split, args.workers,
                               args.sample, PathMap.parse(args.path_map), **opts)
        except DataError as e:
            report = {"format": args.format, "path": args.path, "records": 0, "images": 0,
                      "problems": [{"file": e.path, "field": e.field, "message": str(e)}]}
    sys.stdout.write(json.dumps(report) + "\n")
    for prob in report["problems"][:5]:
        log.error("%s", prob["message"])
    if len(report["problems"]) > 5:
        log.error("... %d problems in all (see the JSON)", len(report["problems"]))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
