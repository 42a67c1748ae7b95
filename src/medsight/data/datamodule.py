"""One LightningDataModule for every stage: segmentation (stage 1/2), VQA and grounded dialogues (stage 3).

    dm = MedicalDataModule(cfg, "segmentation"); dm.setup("fit"); batch = next(iter(dm.train_dataloader()))

Samples go through MONAI dictionary transforms: a deterministic part (load with MONAI readers, resize
images bilinearly and masks nearest to data.image_size) whose output is cached in memory as uint8
(data.cache; decoded once, shared by every record of the same file), then a per-split part (train +
data.augment + segmentation: RandFlipd / RandScaleIntensityd / RandShiftIntensityd) and the CLIP
normalisation (NormalizeIntensityd). `collate` pads a variable number of masks per image (batch contract in
medsight.data). Bad records raise DataError, or with data.on_error=skip are logged, dropped and counted in
`skipped`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
)
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medsight.data import DataError
from medsight.data.formats import get_format, read_format
from medsight.data.formats.common import as_path_map
from medsight.data.io import read_image, read_mask, set_max_pixels
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

log = logging.getLogger(__name__)

TASKS = ("segmentation", "vqa", "instruct")
SOURCES = {
    "segmentation": ("biomedparse",),
    "vqa": ("vqa", "omnimedvqa"),
    "instruct": ("instruct", "diagseg", "vqa"),
}
DEFAULT_SOURCES = {"segmentation": ("biomedparse",), "vqa": ("vqa",), "instruct": ("instruct",)}


def _run(transform: Compose, data: dict) -> dict:
    """Apply a MONAI Compose, re-raising a DataError that MONAI wrapped in RuntimeError."""
    try:
        return transform(data)
    except RuntimeError as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


@contextlib.contextmanager
def _single_thread():
    """Run per-sample torch ops (MONAI random transforms) on one intra-op thread, as DataLoader workers do:
    on a busy CPU, waking the thread pool for a (3, 128, 128) tensor costs milliseconds."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _plain(x: Any) -> torch.Tensor:
    """MetaTensor -> plain tensor (cheap collate, no metadata tracking)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


# ------------------------------------------------------------------------------------- transforms
# Per-sample arithmetic is numpy (single-threaded): on a shared 2-core CPU, torch's intra-op threads make
# every small elementwise op cost milliseconds, which would make loading the bottleneck.
class LoadMedicalImaged(MapTransform):
    """`key` holds a path -> (3, H, W) float32 in [0, 255] via `medsight.data.io.read_image` (MONAI readers:
    PNG/JPEG, NIfTI middle slice, DICOM with rescale); the original (H, W) goes to `<key>_hw`."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            arr, _ = read_image(d[key])  # (H, W, 3) uint8
            d[f"{key}_hw"] = arr.shape[:2]
            d[key] = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)  # (3, H, W)
        return d


class LoadMasksd(MapTransform):
    """`key` holds a list of tuples of mask paths -> (M, H, W) float32 {0, 1}; a tuple is the union of its
    files. Each mask must have the image's size (`image_hw`); `source` names the record for errors."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            hw = tuple(d["image_hw"])
            out = []
            for group in d[key]:
                m = np.zeros(hw, bool)
                for f in group:
                    m |= read_mask(f, hw, source=d.get("source"))
                out.append(m)
            d[key] = np.stack(out).astype(np.float32) if out else np.zeros((0, *hw), np.float32)  # (M, H, W)
        return d


class ResizeIfNeededd(MapTransform):
    """MONAI `Resized` (bilinear + anti-aliasing for images, nearest for masks), skipped when the array
    already has the target size; returns numpy."""

    def __init__(self, keys: Any, spatial_size: tuple[int, int], mode: str, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.size = tuple(spatial_size)
        self.resize = Resized(keys=keys, spatial_size=spatial_size, mode=mode, anti_aliasing=mode != "nearest",
                              allow_missing_keys=allow_missing_keys)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        todo = [k for k in self.key_iterator(d) if tuple(d[k].shape[1:]) != self.size and d[k].shape[0] > 0]
        if todo:
            r = self.resize({k: d[k] for k in todo})
            for k in todo:
                d[k] = np.asarray(_plain(r[k]))
        return d


def load_transform(image_size: int) -> tuple[Compose, Compose]:
    """Deterministic part (cached): (image path -> (3, S, S) float, mask paths -> (M, S, S) float)."""
    s = (image_size, image_size)
    return (Compose([LoadMedicalImaged(keys="image"), ResizeIfNeededd(keys="image", spatial_size=s, mode="bilinear")]),
            Compose([LoadMasksd(keys="masks"), ResizeIfNeededd(keys="masks", spatial_size=s, mode="nearest")]))


class NormalizeUint8d(MapTransform):
    """uint8 (3, S, S) -> float32 (x / 255 - mean) / std per channel through a lookup table (the same as
    ScaleIntensityRanged(0, 255 -> 0, 1) + NormalizeIntensityd(mean, std, channel_wise), ~20x faster);
    float input is taken as already in [0, 1]."""

    def __init__(self, keys: Any, mean: Sequence[float], std: Sequence[float]):
        super().__init__(keys)
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]
        self.lut = ((np.arange(256, dtype=np.float32)[None, :] / 255.0 - self.mean[:, :, 0]) / self.std[:, :, 0])
        self.chan = np.arange(3)[:, None, None]

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if isinstance(x, np.ndarray) and x.dtype == np.uint8:
                d[key] = self.lut[self.chan, x]  # (3, S, S) float32
            else:
                d[key] = ((np.asarray(_plain(x), np.float32) - self.mean) / self.std).astype(np.float32)
        return d


class _ToUnitFloatd(MapTransform):
    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.from_numpy(d[key].astype(np.float32) / (255.0 if d[key].dtype == np.uint8 else 1.0))
        return d


def split_transform(cfg: Any, task: str, split: str) -> Compose:
    """Per-split part on {"image": (3, S, S) uint8, "masks": (M, S, S) uint8}: augmentation (train,
    segmentation, data.augment: RandFlipd, RandScaleIntensityd, RandShiftIntensityd) then CLIP normalisation."""
    ts: list = []
    if split == "train" and task == "segmentation" and cfg.data.augment:
        ts += [_ToUnitFloatd(keys=["image", "masks"]),
               RandFlipd(keys=["image", "masks"], prob=0.5, spatial_axis=1),
               RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
               RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5)]
    ts.append(NormalizeUint8d(keys="image", mean=list(cfg.data.mean), std=list(cfg.data.std)))
    return Compose(ts)


class _Store:
    """In-memory cache of decoded, resized uint8 arrays keyed by file path(s); shared across splits.

    Bounded by `max_mb` (data.cache_max_mb; least recently used out first): at real scale what does not fit
    is decoded again when next needed."""

    def __init__(self, image_size: int, enabled: bool, max_mb: float = 8192.0):
        self.image_size, self.enabled = image_size, enabled
        self.load_image, self.load_masks = load_transform(image_size)
        self.images: OrderedDict[str, tuple[np.ndarray, tuple[int, int]]] = OrderedDict()
        self.masks: OrderedDict[tuple[str, ...], np.ndarray] = OrderedDict()
        self.max_bytes, self.bytes, self.evicted = int(max_mb * 2**20), 0, 0

    @property
    def full(self) -> bool:
        """True once something was evicted or the next image would not fit (preloading further is wasted)."""
        return self.evicted > 0 or self.bytes + 3 * self.image_size ** 2 > self.max_bytes

    def _keep(self, table: OrderedDict, key: Any, value: Any, nbytes: int) -> None:
        if not self.enabled or nbytes > self.max_bytes:
            return
        table[key] = value
        self.bytes += nbytes
        while self.bytes > self.max_bytes:  # evict the least recently used, images and masks alike
            t = self.images if self.images and (not self.masks or len(self.images) >= len(self.masks)) else self.masks
            _, old = t.popitem(last=False)
            self.bytes -= (old[0] if isinstance(old, tuple) else old).nbytes
            self.evicted += 1

    def get(self, s: Sample, with_masks: bool) -> tuple[np.ndarray, np.ndarray]:
        """(3, S, S) uint8 image and (M, S, S) uint8 masks of a record (M = 0 without masks)."""
        if s.image in self.images:
            img, hw = self.images[s.image]
            self.images.move_to_end(s.image)
        else:
            try:
                d = _run(self.load_image, {"image": s.image})
            except DataError as e:
                raise DataError(f"{s.source}: record {s.id} field 'image': {e}", path=s.source, field="image") from None
            img = np.clip(np.rint(d["image"]), 0, 255).astype(np.uint8)
            hw = tuple(d["image_hw"])
            self._keep(self.images, s.image, (img, hw), img.nbytes)
        S = self.image_size
        if not with_masks or not s.masks:
            return img, np.zeros((0, S, S), np.uint8)
        out = []
        for group in s.masks:
            m = self.masks.get(group)
            if m is None:
                d = _run(self.load_masks, {"masks": [group], "image_hw": hw, "source": s.source})
                m = (d["masks"][0] > 0.5).astype(np.uint8)  # (S, S)
                self._keep(self.masks, group, m, m.nbytes)
            else:
                self.masks.move_to_end(group)
            out.append(m)
        return img, np.stack(out)


class MedicalDataset(Dataset):
    """Records of one split + the transforms. Items: image (3, S, S) float32 normalised, masks (M, S, S)
    uint8, labels (M,) int64, modality, id, case, kind, and the task's text fields."""

    def __init__(self, samples: list[Sample], task: str, split: str, store: _Store, transform: Compose,
                 policy: ErrorPolicy, max_masks: int | None = None):
        self.samples, self.task, self.split = samples, task, split
        self.store, self.transform, self.policy, self.max_masks = store, transform, policy, max_masks
        self.with_masks = task in ("segmentation", "instruct")

    def __len__(self) -> int:
        return len(self.samples)

    def preload(self) -> None:
        """Decode every record once (fills the cache); bad ones raise or are dropped and counted. Stops when
        the cache is full (data.cache_max_mb): the rest is decoded, and checked, when first used."""
        keep = []
        for k, s in enumerate(tqdm(self.samples, desc=f"cache {self.task}/{self.split}", disable=None,
                                   file=sys.stderr, leave=False)):
            if self.store.full:
                log.info("%s/%s: image cache full (data.cache_max_mb) after %d of %d records; the rest are "
                         "decoded when used", self.task, self.split, k, len(self.samples))
                keep += self.samples[k:]
                break
            try:
                self.store.get(s, self.with_masks)
                keep.append(s)
            except DataError as e:
                self.policy(e)
        self.samples = keep

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, Any] | None:
        sample_seed = None
        if isinstance(i, tuple):  # (index, seed) from medsight.resume.SeededShuffle: reproducible augmentation
            i, sample_seed = i
        s = self.samples[i]
        try:
            img, masks = self.store.get(s, self.with_masks)
        except DataError as e:  # only without the cache (preload drops bad records)
            self.policy(e)
            return None
        labels = list(s.labels)
        if self.task == "segmentation" and self.max_masks is not None and masks.shape[0] > self.max_masks:
            masks, labels = masks[: self.max_masks], labels[: self.max_masks]
        if sample_seed is not None:
            self.transform.set_random_state(seed=int(sample_seed))
        with _single_thread():
            d = self.transform({"image": img, "masks": masks})
        masks = np.asarray(_plain(d["masks"])) if not isinstance(d["masks"], np.ndarray) else d["masks"]
        out: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(d["image"])), "modality": s.modality,
                               "id": s.id, "case": s.case, "kind": s.extra.get("kind", self.task)}
        if len(s.all_images) > 1:  # several images per sample (PubMedVision): the others, in <image> order
            extra = []
            for p in s.all_images[1:]:
                try:
                    im, _ = self.store.get(dataclasses.replace(s, image=p, images=[], masks=[]), False)
                except DataError as e:
                    self.policy(e)
                    return None
                with _single_thread():
                    extra.append(np.ascontiguousarray(self.transform({"image": im, "masks": masks[:0]})["image"]))
            out["extra_images"] = torch.from_numpy(np.stack(extra))  # (k - 1, 3, S, S)
        if self.with_masks:
            out.update(masks=torch.from_numpy(np.ascontiguousarray(masks.astype(np.uint8))),
                       labels=torch.tensor(labels, dtype=torch.long), ann_ids=list(s.ann_ids[: masks.shape[0]]))
        if self.task == "vqa":
            out.update(question=s.question, answer=s.answer, answer_type=s.answer_type, options=s.options)
            if len(s.all_images) > 1:  # the dialogue holds one <image> per image (None for other samples)
                out["conversations"] = s.conversations
        if self.task == "instruct":
            out["conversations"] = s.conversations
        return out


def collate(samples: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack samples into the batch contract (medsight.data): pads masks to the batch's largest count M,
    mask_valid marks real masks, labels -1 on padding. None items (skipped records) are dropped."""
    samples = [s for s in samples if s is not None]
    if not samples:
        raise DataError("every sample of this batch was skipped (data.on_error=skip); see the warnings above")
    B = len(samples)
    batch: dict[str, Any] = {
        "image": torch.from_numpy(np.stack([s["image"].numpy() for s in samples])),  # (B, 3, S, S)
        "modality": torch.tensor([s["modality"] for s in samples], dtype=torch.long)}
    if "masks" in samples[0]:
        S = samples[0]["image"].shape[-1]
        M = max(s["masks"].shape[0] for s in samples)
        masks = np.zeros((B, M, S, S), np.float32)  # (B, M, S, S)
        valid = np.zeros((B, M), bool)
        labels = np.full((B, M), -1, np.int64)
        for b, s in enumerate(samples):
            m = s["masks"].shape[0]
            masks[b, :m] = s["masks"].numpy()
            valid[b, :m] = True
            labels[b, :m] = s["labels"].numpy()
        batch.update(masks=torch.from_numpy(masks), mask_valid=torch.from_numpy(valid), labels=torch.from_numpy(labels))
    if any("extra_images" in s for s in samples):  # several images per sample: flat images + counts
        per = [[s["image"][None], *([s["extra_images"]] if "extra_images" in s else [])] for s in samples]
        batch["images"] = torch.cat([torch.cat(p) for p in per])  # (N, 3, S, S), sample by sample
        batch["image_counts"] = torch.tensor([1 + len(s.get("extra_images", ())) for s in samples], dtype=torch.long)
    keys = list(dict.fromkeys(k for s in samples for k in s))
    for k in keys:
        if k not in batch and k != "extra_images":
            batch[k] = [s.get(k) for s in samples]
    return batch


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
    "LoadMasksd",
    "LoadMedicalImaged",
    "MedicalDataModule",
    "MedicalDataset",
    "NormalizeUint8d",
    "ResizeIfNeededd",
    "collate",
    "load_transform",
    "split_transform",
]
