"""Stage-3 inputs: the frozen-feature cache, stage 2's code-assigned text and length-grouped text batches.

Used by `stages/stage3.py` (training and its per-phase evaluation) and `medsight.joint_eval`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import torch

from medsight.resume import EpochBatches, ResumableLoader


class FeatureCache:
    """Frozen stage-1 outputs per image (keyed by the image tensor's bytes): (patch feats, region tokens).

    Bounded: at most `max_mb` megabytes are kept (least recently used out first; `stage3.feature_cache_mb`),
    so a corpus of 211k images recomputes what does not fit instead of filling the memory."""

    def __init__(self, max_mb: float = 4096.0) -> None:
        self.store: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0

    def __call__(self, model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # sha256 of the pixels, read in place: 4.9 ms per batch of 32 128-px images here, blake2b of a copy 9.7 ms
        keys = [hashlib.sha256(img.detach().cpu().contiguous().numpy()).hexdigest() for img in images]
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {k: self.store[k] for k in keys if k in self.store}
        for k in got:
            self.store.move_to_end(k)
        if todo:
            feats, regions = model.encode_images(images[todo])
            for j, i in enumerate(todo):
                pair = (feats[j].clone(), regions[j].clone())  # own storage: a view would pin the whole batch
                got[keys[i]] = pair
                self._put(keys[i], pair)
        return (torch.stack([got[k][0] for k in keys]), torch.stack([got[k][1] for k in keys]))

    def _put(self, key: str, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in pair)
        if key in self.store or size > self.max_bytes:
            return
        self.store[key] = pair
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.store.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)


FEATURES = FeatureCache()  # shared by every phase of this process


def select_rows(batch: dict, idx: list[int]) -> dict:
    """The batch restricted to samples `idx` (tensors indexed on dim 0; lists picked), keeping the flat
    `images` (N, 3, S, S) of several-image batches in step with `image_counts`."""
    counts = batch.get("image_counts")
    out = {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in batch.items()
           if k not in ("images", "image_counts")}
    if counts is not None:
        first = (counts.cumsum(0) - counts).tolist()
        sel = [first[i] + k for i in idx for k in range(int(counts[i]))]
        out["images"], out["image_counts"] = batch["images"][sel], counts[idx]
    return out



class CodedText:
    """Stage 2's code-assigned text (`stage2/coded/{instruct,diagseg}/<split>.json`, every <mask> replaced by
    its code token), looked up by record id; masks and images still come from the DataModule, in the same
    order (the i-th code <-> the i-th mask)."""

    def __init__(self, coded_dir: Path | str) -> None:
        from medsight.manifest import verify_file

        self.by_id: dict[str, list[dict]] = {}
        for kind in ("instruct", "diagseg"):
            for f in sorted((Path(coded_dir) / kind).glob("*.json")):
                verify_file(coded_dir, f"{kind}/{f.name}")  # against coded/manifest.json (stage 2 writes it)
                for r in json.loads(f.read_text()):
                    if "conversations" in r:
                        self.by_id[str(r["id"])] = r["conversations"]
                    else:  # DiagSeg record
                        self.by_id[str(r["qa_id"])] = [{"from": "human", "value": "<image>\n" + r["question"]},
                                                       {"from": "gpt", "value": r["answer"]}]
        self.missing = 0

    def conversations(self, batch: dict) -> tuple[list[list[dict]], list[bool]]:
        """Conversations of a batch with code tokens in place of <mask>; keep[i] False where stage 2 has no
        coded version of a grounded record (counted in `missing`)."""
        convs, keep = [], []
        n = len(batch["id"])
        for i in range(n):
            conv = batch["conversations"][i] if "conversations" in batch else None
            if conv is None:  # a VQA sample (a batch may mix them with several-image dialogues)
                conv = [{"from": "human", "value": "<image>\n" + batch["question"][i]},
                        {"from": "gpt", "value": batch["answer"][i]}]
            if any("<mask>" in t["value"] for t in conv):
                coded = self.by_id.get(str(batch["id"][i]))
                if coded is None:
                    self.missing += 1
                    keep.append(False)
                    convs.append(conv)
                    continue
                conv = coded
            convs.append(conv)
            keep.append(True)
        return convs, keep


def phase_data(cfg, phase: str):
    """align: VQA; ground: grounded dialogues + DiagSeg; instruct: those + VQA (as one-turn dialogues)."""
    from medsight.data.datamodule import MedicalDataModule

    if phase == "align":
        return MedicalDataModule(cfg, "vqa")
    sources = ("instruct", "diagseg") + (("vqa",) if phase == "instruct" else ())
    return MedicalDataModule(cfg, "instruct", sources=sources)


class LengthGroupedBatches(EpochBatches, torch.utils.data.Sampler):
    """Training batches of similar text length: a batch costs as much as its longest sequence, and mixing
    one-line VQA with three-turn dialogues would pad most of every batch. Shuffle, order pools of `pool`
    batches by length bucket (`bucket` characters; random inside a bucket), cut, shuffle the batches; each
    process takes every world-th batch (the same count on each)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, pool: int = 50, bucket: int = 64) -> None:
        self.lengths, self.batch_size, self.seed, self.pool, self.epoch = lengths, batch_size, seed, pool, 0
        self.bucket = bucket  # characters per length bucket

    def _batches(self, epoch: int | None = None) -> list[list[int]]:
        from medsight.train import per_device_batch

        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        g = torch.Generator().manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        perm, bs = torch.randperm(len(self.lengths), generator=g).tolist(), per_device_batch(self.batch_size, world)
        batches = []
        for i in range(0, len(perm), self.pool * bs):
            # coarse buckets, random order inside (sorting by exact length would batch identical questions)
            chunk = sorted(perm[i:i + self.pool * bs], key=lambda k: self.lengths[k] // self.bucket)
            batches += [chunk[j:j + bs] for j in range(0, len(chunk), bs) if len(chunk[j:j + bs]) == bs]
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        return batches[: len(batches) // world * world][rank::world]

    def _epoch_items(self, epoch: int, skip: int) -> list[list[int]]:
        return self._batches(epoch)[skip:]  # epoch e's batches depend on (seed, e) only (medsight.resume)

    def num_batches(self) -> int:
        return len(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def phase_loader(cfg, phase: str) -> torch.utils.data.DataLoader:
    """The phase's training DataLoader over `phase_data`'s train split, length-grouped."""
    dm = phase_data(cfg, phase)
    ds = dm.dataset("train")
    from medsight.data.datamodule import SOURCES

    # the mix: a source's records listed `repeat` times per epoch (the image cache is keyed by record: no re-decode)
    repeat = {str(k): int(v) for k, v in dict(cfg.stage3.get("repeat") or {}).items()}
    bad = {k: v for k, v in repeat.items() if v < 1 or k not in SOURCES["instruct"]}
    if bad:
        raise ValueError(f"config key 'stage3.repeat': sources are {', '.join(SOURCES['instruct'])} and counts "
                         f">= 1, got {bad}")
    if any(v != 1 for v in repeat.values()):
        ds.samples = [s for s in ds.samples for _ in range(repeat.get(s.extra.get("kind"), 1))]
    lengths = [sum(len(t["value"]) for t in s.conversations) if s.conversations else
               len(s.question or "") + len(s.answer or "") for s in ds.samples]
    sampler = LengthGroupedBatches(lengths, int(cfg.data.batch_size), seed=int(cfg.seed))
    return ResumableLoader(ds, batch_sampler=sampler, collate_fn=dm.collate_fn, num_workers=int(cfg.data.num_workers))


def example_questions(cfg, n: int = 6) -> list[str]:
    """Up to `n` distinct opening questions of the grounded dialogues' test split (`data.instruct`, default
    <root>/instruct), written into the final export's meta so that the web app can offer them; [] when the
    split is missing or not in LLaVA form."""
    path = Path(cfg.data.instruct or Path(cfg.data.root) / "instruct") / "test.json"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        firsts = [r["conversations"][0]["value"] for r in rows if r.get("conversations")]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return []
    out: list[str] = []
    for q in firsts:
        q = " ".join(str(q).replace("<image>", " ").split())
        if q and q not in out:
            out.append(q)
    return out[:n]
