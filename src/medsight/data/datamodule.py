"""One LightningDataModule for every stage: segmentation (stage 1/2), VQA and grounded dialogues (stage 3).

    dm = MedicalDataModule(cfg, "segmentation"); dm.setup("fit"); batch = next(iter(dm.train_dataloader()))

Samples go through MONAI dictionary transforms: a deterministic part (load with MONAI readers, resize
images bilinearly and masks nearest to data.image_size) whose output is cached in memory as uint8
(data.cache; decoded once, shared by every record of the same file), then a per-split part (train +
data.augment + segmentation: RandFlipd / RandScaleIntensityd / RandShiftIntensityd) and the CLIP
normalisation (NormalizeIntensityd). `collate` pads a variable number of masks per image (batch contract in
medsight.data). Bad records raise DataError, or with data.on_error=skip are logged, dropped and counted in
`skipped`.
The transforms live in medsight.data.transforms, the dataset, its cache and `collate` in medsight.data.dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from medsight.data import DataError
from medsight.data.dataset import MedicalDataset, _Store, collate
from medsight.data.formats import get_format, read_format
from medsight.data.formats.common import as_path_map
from medsight.data.io import set_max_pixels
from medsight.data.readers import (
    ErrorPolicy,
    Sample,
    read_biomedparse,
    read_conversations,
    read_diagseg,
    read_omnimedvqa,
    read_vqa,
    vqa_as_conversation,
)
from medsight.data.transforms import split_transform

log = logging.getLogger(__name__)

TASKS = ("segmentation", "vqa", "instruct")
SOURCES = {
    "segmentation": ("biomedparse",),
    "vqa": ("vqa", "omnimedvqa"),
    "instruct": ("instruct", "diagseg", "vqa"),
}
DEFAULT_SOURCES = {"segmentation": ("biomedparse",), "vqa": ("vqa",), "instruct": ("instruct",)}


# ------------------------------------------------------------------------------------- datamodule
class MedicalDataModule(L.LightningDataModule):
    """All stages' data. task: segmentation | vqa | instruct (batch keys: see medsight.data).

    sources: which record sets feed the task (default: segmentation ("biomedparse",), vqa ("vqa",), instruct
    ("instruct",)); instruct may add "diagseg" (DiagSeg as one-turn grounded dialogues) and "vqa" (VQA as
    non-grounded dialogues); vqa may add "omnimedvqa" (test split only, with `options`).
    """

    def __init__(self, cfg: Any, task: str, collate_fn: Callable | None = None,
                 sources: Sequence[str] | None = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task '{task}'; choose from {list(TASKS)}")
        self.cfg, self.task = cfg, task
        self.sources = tuple(sources or DEFAULT_SOURCES[task])
        bad = [s for s in self.sources if s not in SOURCES[task]]
        if bad:
            raise ValueError(f"sources {bad} not valid for task '{task}'; choose from {list(SOURCES[task])}")
        self.collate_fn = collate_fn or collate
        self.groups = list(cfg.data.modality_groups)
        self.policy = ErrorPolicy(cfg.data.on_error)
        set_max_pixels(int(cfg.data.max_pixels))
        self.store = _Store(int(cfg.data.image_size), bool(cfg.data.cache), float(cfg.data.get("cache_max_mb", 8192.0)))
        self._datasets: dict[str, MedicalDataset] = {}

    # paths ------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.cfg.data.root)

    def path_of(self, source: str) -> Path:
        """Meta file (biomedparse) or folder of a record set."""
        d = self.cfg.data
        if source == "biomedparse":
            if d.meta:
                return Path(d.meta)
            return self.root / ("biomedparse/meta.json" if d.format == "synthetic" else "meta.json")
        custom = {"vqa": d.vqa, "instruct": d.instruct, "diagseg": d.diagseg, "omnimedvqa": d.omnimedvqa}[source]
        return Path(custom) if custom else self.root / source

    def _check_root(self) -> None:
        if self.cfg.data.format == "synthetic" and not (self.root / "generator.json").is_file():
            raise DataError(f"{self.root}: no synthetic dataset here (generator.json missing); run `make data` or "
                            f"`python -m medsight.data.synthetic --root {self.root}`", path=self.root, field="data.root")

    # records ----------------------------------------------------------------------------------
    def records(self, split: str) -> list[Sample]:
        """Parsed and validated records of `split` (train | val | test) from every source."""
        self._check_root()
        out: list[Sample] = []
        for src in self.sources:
            p = self.path_of(src)
            fmt = dict(self.cfg.data.get("formats") or {}).get(src)
            if fmt:
                recs = self._read_format(fmt, src, p, split)
            elif src == "biomedparse":
                recs = read_biomedparse(p, split, self.groups, float(self.cfg.data.val_fraction), self.policy,
                                        as_path_map(dict(self.cfg.data.get("path_map") or {})))
            elif src == "omnimedvqa":
                if split != "test":
                    continue
                files = sorted(p.glob("*.json"))
                if not files:
                    raise DataError(f"{p}: no OmniMedVQA <modality>.json files", path=p)
                recs = [r for f in files for r in read_omnimedvqa(f, self.groups, self.root, self.policy)]
            else:
                f = p / f"{split}.json"
                reader = {"vqa": read_vqa, "instruct": read_conversations, "diagseg": read_diagseg}[src]
                recs = reader(f, self.groups, None, self.policy)
                if self.task == "instruct" and src == "vqa":
                    recs = [vqa_as_conversation(r) for r in recs]
            for r in recs:
                r.extra["kind"] = src
            out += recs
        if self.task == "segmentation":
            n_over = sum(len(r.masks) > self.cfg.data.max_masks for r in out)
            if n_over:
                log.warning("%s/%s: %d images have more than data.max_masks=%d masks; the first %d are used",
                            self.task, split, n_over, self.cfg.data.max_masks, self.cfg.data.max_masks)
        return out

    def _read_format(self, fmt: str, src: str, path: Path, split: str) -> list[Sample]:
        """Records of `split` of a distributed layout (data.formats[src] = fmt); [] where it has no such split
        (the eval sets are test only; a single PubMedVision/instruction file is split train/val by id)."""
        spec = get_format(fmt)
        if split not in spec.splits:
            return []
        got = read_format(fmt, path, split, self.groups, self.policy, dict(self.cfg.data.get("path_map") or {}),
                          val_fraction=float(self.cfg.data.val_fraction))
        if got.skipped:
            log.info("%s: %d rows with more than 4 images dropped (as the reference does)", path, got.skipped)
        recs = got.samples
        if self.task == "instruct" and spec.kind == "vqa":
            recs = [vqa_as_conversation(r) for r in recs]
        return recs

    def dataset(self, split: str) -> MedicalDataset:
        """The (cached) dataset of `split`; built and preloaded on first use."""
        if split not in self._datasets:
            before = self.policy.skipped
            ds = MedicalDataset(self.records(split), self.task, split, self.store,
                                split_transform(self.cfg, self.task, split), self.policy, int(self.cfg.data.max_masks))
            if self.cfg.data.cache:
                ds.preload()
            n_skip = self.policy.skipped - before
            if n_skip:
                log.warning("%s/%s: skipped %d bad records (data.on_error=skip); %d remain", self.task, split,
                            n_skip, len(ds))
            self._datasets[split] = ds
        return self._datasets[split]

    @property
    def skipped(self) -> int:
        """Records dropped so far under data.on_error=skip (each was logged)."""
        return self.policy.skipped

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test"):
            self.dataset(split)
        if self.skipped:
            log.warning("data: %d records skipped in total (data.on_error=skip)", self.skipped)

    # loaders ----------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.dataset(split)
        bs = int(self.cfg.data.batch_size if train else self.cfg.data.eval_batch_size)
        if train:  # data.batch_size is the global batch: each of N training processes takes 1/N of it
            from medsight.train import per_device_batch

            trainer = getattr(self, "trainer", None)
            bs = per_device_batch(bs, trainer.world_size if trainer is not None else 1)
        nw = int(self.cfg.data.num_workers)
        if train:  # the order of epoch e depends only on (seed, e); resumable mid-epoch (medsight.resume)
            from medsight.resume import ResumableLoader, SeededShuffle

            drop = len(ds) > bs
            return ResumableLoader(ds, batch_size=bs, sampler=SeededShuffle(len(ds), bs, drop, int(self.cfg.seed)),
                                   drop_last=drop, num_workers=nw, collate_fn=self.collate_fn,
                                   persistent_workers=nw > 0)
        return DataLoader(ds, batch_size=bs, shuffle=False, drop_last=False, num_workers=nw,
                          collate_fn=self.collate_fn, persistent_workers=nw > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


__all__ = [
    "SOURCES",
    "TASKS",
    "MedicalDataModule",
]
