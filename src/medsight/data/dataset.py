"""The records of one split as a torch Dataset (MedicalDataset) and the batch `collate`.

MedicalDataset reads images and masks through _Store, an in-memory cache of the decoded, resized uint8 arrays
(data.cache; shared by every record of the same file and across splits, bounded by data.cache_max_mb), then
applies the per-split transform (medsight.data.transforms). Bad records raise DataError, or with
data.on_error=skip are logged, dropped and counted. `collate` pads a variable number of masks per image
(batch contract in medsight.data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose
from torch.utils.data import Dataset
from tqdm import tqdm

from medsight.data import DataError
from medsight.data.readers import ErrorPolicy, Sample
from medsight.data.transforms import load_transform, plain_tensor

log = logging.getLogger(__name__)


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
        masks = np.asarray(plain_tensor(d["masks"])) if not isinstance(d["masks"], np.ndarray) else d["masks"]
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


__all__ = ["MedicalDataset", "collate"]
