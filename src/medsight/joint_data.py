"""Stage-3 inputs: the frozen-feature cache, stage 2's code-assigned text and length-grouped text batches.

Used by `stages/stage3.py` (training and its per-phase evaluation) and `medsight.joint_eval`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


class FeatureCache:
    """Frozen stage-1 outputs per image (keyed by the image tensor's bytes): (patch feats, region tokens)."""

    def __init__(self) -> None:
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [hashlib.blake2b(img.detach().cpu().numpy().tobytes(), digest_size=16).hexdigest() for img in images]
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        if todo:
            feats, regions = model.encode_images(images[todo])
            for j, i in enumerate(todo):
                self.store[keys[i]] = (feats[j], regions[j])
        return (torch.stack([self.store[k][0] for k in keys]), torch.stack([self.store[k][1] for k in keys]))


FEATURES = FeatureCache()  # shared by every phase of this process



class CodedText:
    """Stage 2's code-assigned text (`stage2/coded/{instruct,diagseg}/<split>.json`, every <mask> replaced by
    its code token), looked up by record id; masks and images still come from the DataModule, in the same
    order (the i-th code <-> the i-th mask)."""

    def __init__(self, coded_dir: Path | str) -> None:
        self.by_id: dict[str, list[dict]] = {}
        for kind in ("instruct", "diagseg"):
            for f in sorted((Path(coded_dir) / kind).glob("*.json")):
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
            if "conversations" in batch:
                conv = batch["conversations"][i]
            else:
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


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Training batches of similar text length: a batch costs as much as its longest sequence, and mixing
    one-line VQA with three-turn dialogues would pad most of every batch. Shuffle, order pools of `pool`
    batches by length bucket (`bucket` characters; random inside a bucket), cut, shuffle the batches; each
    process takes every world-th batch (the same count on each)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, pool: int = 50, bucket: int = 64) -> None:
        self.lengths, self.batch_size, self.seed, self.pool, self.epoch = lengths, batch_size, seed, pool, 0
        self.bucket = bucket  # characters per length bucket

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm, bs = torch.randperm(len(self.lengths), generator=g).tolist(), self.batch_size
        batches = []
        for i in range(0, len(perm), self.pool * bs):
            # coarse buckets, random order inside (sorting by exact length would batch identical questions)
            chunk = sorted(perm[i:i + self.pool * bs], key=lambda k: self.lengths[k] // self.bucket)
            batches += [chunk[j:j + bs] for j in range(0, len(chunk), bs) if len(chunk[j:j + bs]) == bs]
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        return batches[: len(batches) // world * world][rank::world]

    def __iter__(self):
        batches = self._batches()
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches())


def phase_loader(cfg, phase: str) -> torch.utils.data.DataLoader:
    """The phase's training DataLoader over `phase_data`'s train split, length-grouped."""
    dm = phase_data(cfg, phase)
    ds = dm.dataset("train")
    lengths = [sum(len(t["value"]) for t in s.conversations) if s.conversations else
               len(s.question or "") + len(s.answer or "") for s in ds.samples]
    sampler = LengthGroupedBatches(lengths, int(cfg.data.batch_size), seed=int(cfg.seed))
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=dm.collate_fn,
                                       num_workers=int(cfg.data.num_workers))


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
