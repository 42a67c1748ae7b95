"""Frozen region outputs and stage-2 training batches: the frozen encoder + perceiver run once over the data
(`encode_regions`), each image's GT masks Hungarian-matched to the N final region queries with the stage-1 cost
(a union target: its best query), kept per image as `Regions`; stage 2 trains on batches of images with the same
number of masks (`BucketBatches`, `collate_regions`), and `medsight.codes` assigns codes from the same outputs.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from medsight.resume import EpochBatches, mix_seed


# ------------------------------------------------------------------------------ frozen region outputs
@dataclass
class Regions:
    """What stage 2 and code assignment need from the frozen encoder + perceiver for one image.

    Targets are the image's GT masks (single masks, Hungarian-matched jointly) followed by union targets
    (several masks merged, each matched to its best query on its own). Row i of `queries` is the final region
    query matched to target i."""

    image: str  # image path: the key used by instruction records
    id: str
    group: int  # modality group (ground truth)
    split: str
    pooled: Tensor  # (D_enc,) encoder pooled feature (modality head input)
    queries: Tensor  # (T, d) matched final region query per target
    pred_idx: Tensor  # (T,) which of the N queries was matched
    labels: Tensor  # (T,) class id per target (0: not given)
    ann_ids: list[str]  # per target; unions are "a+b"
    is_union: Tensor  # (T,) bool
    all_queries: Tensor | None = None  # (N, d) every final region query (kept for training/validation splits)
    feats: Tensor | None = None  # (H', W', D_enc) patch features (kept for training/validation splits)
    masks: Tensor | None = None  # (T, S, S) bool targets (kept for training/validation splits)

    @property
    def num_single(self) -> int:
        return int((~self.is_union).sum())


def _union_cost(pred_logits: Tensor, pred_masks: Tensor, label: int, target: Tensor, w: Mapping[str, float]) -> Tensor:
    """Matching cost (stage-1 weights) of every query against one target mask: (N,)."""
    from medsight.models.matching import flatten_for_loss, pairwise_bce, pairwise_dice

    x, t = flatten_for_loss(pred_masks[None], target[None, None].float())  # (1, N, P), (1, 1, P)
    cost = w["bce"] * pairwise_bce(x[0].float(), t[0]) + w["dice"] * pairwise_dice(x[0].float(), t[0])
    if label > 0:
        cost = cost - w["class"] * pred_logits.float().softmax(-1)[:, label : label + 1]
    return cost[:, 0]


@torch.no_grad()
def encode_regions(vision: nn.Module, perceiver: nn.Module, loader: Iterable[dict], weights: Mapping[str, float],
                   keep_splits: Sequence[str] = ("train", "val"), metric: Any = None, device: Any = "cpu",
                   autocast: bool = False, spill: Any = None) -> list[Regions]:
    """Run the frozen encoder + perceiver once over `loader` (segmentation batches plus keys `image_path`,
    `split`, `is_union`), Hungarian-match each image's single GT masks to the N queries (unions: best query),
    and keep the matched queries. `metric` (MaskDice), when given, is updated with the continuous masks of the
    validation split (the `val/dice_continuous` reference)."""
    from medsight.models.matching import hungarian_match

    out: list[Regions] = []
    for batch in loader:
        images = batch["image"].to(device)
        with torch.autocast("cuda" if "cuda" in str(device) else "cpu", dtype=torch.bfloat16, enabled=autocast):
            feats, pooled = vision(images)  # (B, H', W', D), (B, D)
            pred = perceiver(feats)
        feats, pooled = feats.float(), pooled.float()
        pred_masks, pred_logits = pred["pred_masks"].float(), pred["pred_logits"].float()
        masks, valid, labels = batch["masks"].to(device), batch["mask_valid"].to(device), batch["labels"].to(device)
        union = torch.zeros_like(valid)
        for b, u in enumerate(batch["is_union"]):
            union[b, : len(u)] = torch.as_tensor(u, dtype=torch.bool)
        single = valid & ~union
        w = dict(weights)
        if bool((labels[single] <= 0).any()):  # some class not given: match on the masks alone
            w["class"] = 0.0
        matches = hungarian_match(pred_logits, pred_masks, labels.clamp_min(0), masks, single, w)
        if metric is not None:
            is_val = torch.tensor([s == "val" for s in batch["split"]], device=device)
            if bool(is_val.any()):
                idx = is_val.nonzero().flatten()
                metric.update(pred_masks[idx], [matches[int(i)] for i in idx], masks[idx], single[idx],
                              labels[idx], batch["modality"][idx.cpu()].to(device))
        for b in range(images.shape[0]):
            n = int(valid[b].sum())
            pred_idx = torch.full((n,), -1, dtype=torch.long)
            p, g = matches[b]
            pred_idx[g] = p
            for t in union[b, :n].nonzero().flatten().tolist():
                cost = _union_cost(pred_logits[b], pred_masks[b], int(labels[b, t]), masks[b, t], w)
                pred_idx[t] = int(cost.argmin())
            keep = batch["split"][b] in keep_splits
            out.append(Regions(
                image=batch["image_path"][b], id=batch["id"][b], group=int(batch["modality"][b]),
                split=batch["split"][b], pooled=pooled[b].cpu(), queries=pred["queries"][b, pred_idx].float().cpu(),
                pred_idx=pred_idx, labels=labels[b, :n].cpu(), ann_ids=list(batch["ann_ids"][b][:n]),
                is_union=union[b, :n].cpu(),
                all_queries=pred["queries"][b].float().cpu() if keep else None,
                feats=_kept(feats[b].cpu(), spill) if keep else None,
                masks=_kept((masks[b, :n] > 0.5).cpu(), spill) if keep else None))
    return out


# ------------------------------------------------------------------------ training batches (stage 2)
class BucketBatches(EpochBatches, torch.utils.data.Sampler):
    """Batches of images with the same number M > 0 of GT masks (the decode runs M queries per image).
    With shuffle, epoch e's order depends only on (seed, e), so a resumed run continues it (medsight.resume)."""

    def __init__(self, sizes: list[int], batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.batches: list[list[int]] = []
        by_m = defaultdict(list)
        for i, m in enumerate(sizes):
            if m > 0:
                by_m[m].append(i)
        self.by_m, self.batch_size, self.shuffle, self.seed = by_m, batch_size, shuffle, seed

    def _batches(self, epoch: int = 0) -> list[list[int]]:
        rng = random.Random(mix_seed(self.seed, epoch))
        out = []
        for idx in self.by_m.values():
            idx = list(idx)
            if self.shuffle:
                rng.shuffle(idx)
            out += [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.shuffle:
            rng.shuffle(out)
        return out

    def _epoch_items(self, epoch: int, skip: int) -> list[list[int]]:
        return self._batches(epoch)[skip:]

    def num_batches(self) -> int:
        return len(self)

    def __len__(self) -> int:
        return sum(-(-len(v) // self.batch_size) for v in self.by_m.values())


def _kept(t: torch.Tensor, spill: Any) -> Any:
    """`t`, or its on-disk handle once `spill` (medsight.spill.SpillFile) is over its memory budget."""
    return t if spill is None else spill.keep(t)


def collate_regions(regions: list[Regions]) -> dict[str, torch.Tensor]:
    """Single GT masks of same-M images: feats (B,H',W',D), pooled (B,D), queries (B,M,d), masks (B,M,S,S),
    labels (B,M), group (B,). Spilled feats/masks are read back from disk here."""
    from medsight.spill import materialize

    keep = [~r.is_union for r in regions]
    return {"feats": torch.stack([materialize(r.feats) for r in regions]),
            "pooled": torch.stack([r.pooled for r in regions]),
            "queries": torch.stack([r.queries[k] for r, k in zip(regions, keep)]),
            "masks": torch.stack([materialize(r.masks)[k] for r, k in zip(regions, keep)]).float(),
            "labels": torch.stack([r.labels[k] for r, k in zip(regions, keep)]),
            "group": torch.tensor([r.group for r in regions])}


__all__ = [
    "BucketBatches",
    "Regions",
    "collate_regions",
    "encode_regions",
]
