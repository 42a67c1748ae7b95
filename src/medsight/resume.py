"""Exact resume: a run killed at any point after a checkpoint and restarted with `resume=auto` ends with the
same weights and metrics as an uninterrupted run (fp32, CPU, same seed).

What makes it exact:
- **Data order**: every training sampler (stage 1's shuffle `SeededShuffle`, stage 2's buckets
  `medsight.regions.BucketBatches`, stage 3's length-grouped batches `medsight.joint_data.LengthGroupedBatches`)
  is an `EpochBatches`: epoch e's order is a function of (seed, e) only, and it can start an epoch at batch k.
  `ResumableLoader` (a DataLoader) hands (epoch, batches consumed) to Lightning's stateful-loader hooks, so
  the position is saved in `last.ckpt` and restored before the first batch is fetched.
- **Randomness**: `exact_resume` (a callback) re-seeds python/numpy/torch at the start of every training batch from
  (seed, global step, batch index, rank), so dropout, random query draws and dead-code re-seeding depend on
  the step, which the checkpoint holds, not on whatever consumed random numbers before; augmentation draws
  its own seed per (epoch, position) sample (`SeededShuffle` yields (index, seed) pairs).
- **Schedules and optimiser state**: Lightning's checkpoint (LR schedulers step with the global step; no
  wall-clock progress when the time caps are off).
- **Stage-specific state**: stage 2 adds the codebook's dead-code bookkeeping (usage counts, recent z) to the
  checkpoint; stage 3 keeps one checkpoint folder per phase (`<phase>/ckpt/`) and skips finished phases.
- **Writing**: `atomic_checkpoint_io` writes `last.ckpt` through a temporary file and `os.replace` (a kill while
  writing leaves the previous checkpoint) and reads checkpoints with `medsight.safeload` (weights_only).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from medsight.atomic import atomic_file
from medsight.faults import die_at_step

log = logging.getLogger("medsight")


def mix_seed(*parts: int) -> int:
    """A 32-bit seed from integers (numpy's SeedSequence: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def reseed(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and every CUDA device) global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


# ------------------------------------------------------------------------------------------ samplers
class EpochBatches:
    """Mixin for samplers whose epoch-e order depends only on (seed, e) and which can start at batch k.

    `epoch` is the epoch the next `iter()` produces (then it advances by one), `iter_epoch` the epoch being
    iterated; `resume_at(epoch, consumed)` makes the next `iter()` continue epoch `epoch` after `consumed`
    batches (or start the next epoch when that one was finished). Subclasses implement `_epoch_items(epoch,
    skip)` and `num_batches()`.
    """

    epoch: int = 0
    iter_epoch: int = 0
    _skip: int = 0

    def _epoch_items(self, epoch: int, skip: int) -> list:
        raise NotImplementedError

    def num_batches(self) -> int:
        raise NotImplementedError

    def __iter__(self):
        e, skip = self.epoch, self._skip
        self.iter_epoch, self.epoch, self._skip = e, e + 1, 0
        return iter(self._epoch_items(e, skip))

    def resume_at(self, epoch: int, consumed: int) -> None:
        if consumed >= self.num_batches():
            epoch, consumed = epoch + 1, 0
        self.epoch, self._skip = int(epoch), int(consumed)

    def set_epoch(self, epoch: int) -> None:
        """Ignored: Lightning calls it after the first iterator of a resumed fit was made; the sampler counts
        its own epochs from the checkpointed position."""


class SeededShuffle(EpochBatches, DistributedSampler):
    """Stage 1's training order: a permutation per epoch from (seed, epoch), split over processes like
    DistributedSampler (padded to a multiple of the world size). Yields (index, sample_seed) pairs; the
    dataset seeds its random augmentation with sample_seed. A DistributedSampler subclass, so Lightning does
    not wrap it again under DDP."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int = 0) -> None:
        DistributedSampler.__init__(self, range(n), num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.n, self.batch_size, self.drop_last_batch = n, int(batch_size), bool(drop_last)

    def _per_rank(self) -> int:
        world, _ = _world()
        return -(-self.n // world)

    def __len__(self) -> int:
        return self._per_rank()

    def num_batches(self) -> int:
        k = self._per_rank()
        return k // self.batch_size if self.drop_last_batch else -(-k // self.batch_size)

    def _epoch_items(self, epoch: int, skip: int) -> list:
        world, rank = _world()
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        total = self._per_rank() * world
        perm = (perm * (-(-total // max(1, len(perm)))))[:total] if perm else perm  # pad like DistributedSampler
        mine = list(enumerate(perm))[rank::world]  # (position in the epoch's order, index)
        return [(i, mix_seed(self.seed, epoch, pos, 1)) for pos, i in mine][skip * self.batch_size:]


class ResumableLoader(DataLoader):
    """A DataLoader whose sampler position (epoch, batches consumed) goes into Lightning checkpoints through
    Lightning's stateful-loader hooks (`state_dict` / `load_state_dict`, restored before the first fetch).
    The `exact_resume` callback records the position after every training batch (the loader itself runs a batch ahead)."""

    _position: Optional[dict[str, int]] = None

    def resumable(self) -> EpochBatches:
        bs = self.batch_sampler
        if isinstance(bs, EpochBatches):
            return bs
        if isinstance(self.sampler, EpochBatches):
            return self.sampler
        raise TypeError("ResumableLoader needs an EpochBatches sampler or batch sampler")

    def mark_consumed(self, consumed: int) -> None:
        self._position = {"epoch": self.resumable().iter_epoch, "consumed": int(consumed)}

    def state_dict(self) -> dict[str, int]:
        return dict(self._position or {"epoch": self.resumable().epoch, "consumed": 0})

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resumable().resume_at(int(state["epoch"]), int(state["consumed"]))
        self._position = dict(state)
        log.info("resume: data order continues at epoch %d after batch %d", state["epoch"], state["consumed"])


# ------------------------------------------------------------------------------------------ callback
def exact_resume(seed: int) -> Any:
    """Callback: per-step seeding, the loaders' positions, and the test-only `MEDSIGHT_FAULT=step:K` kill
    point. (Lightning is imported here, so importing medsight.resume does not import it.)"""
    from lightning.pytorch.callbacks import Callback

    class ExactResume(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            die_at_step(trainer.global_step)
            reseed(mix_seed(seed, trainer.global_step, batch_idx, trainer.global_rank))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            for dl in _loaders(trainer.train_dataloader):
                if isinstance(dl, ResumableLoader):
                    dl.mark_consumed(batch_idx + 1)

    return ExactResume()


def _loaders(obj: Any) -> list:
    if obj is None:
        return []
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _loaders(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _loaders(v)]
    return [obj]


# ------------------------------------------------------------------------------------------ checkpoints
def lightning_checkpoint_globals() -> list:
    """Globals a Lightning checkpoint of this project holds beyond safeload's base allowlist."""
    out: list = []
    try:
        from lightning.fabric.utilities.data import AttributeDict

        out.append(AttributeDict)
    except ImportError:  # pragma: no cover - older Lightning
        pass
    return out


def atomic_checkpoint_io() -> Any:
    """Lightning CheckpointIO: save through a temporary file + os.replace (a kill or a full disk while writing
    leaves the previous checkpoint); load with `torch.load(weights_only=True)` and medsight's allowlist."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
            with atomic_file(Path(path)) as f:
                torch.save(checkpoint, f)

        def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                            weights_only: Optional[bool] = None) -> dict[str, Any]:
            return load_lightning_checkpoint(path, map_location)

    return AtomicCheckpointIO()


def load_lightning_checkpoint(path: Any, map_location: Optional[Any] = None) -> dict[str, Any]:
    """A Lightning `.ckpt` through medsight.safeload (weights_only=True + allowlist); tensors stay on the device
    they were saved from unless `map_location` says otherwise."""
    from medsight.safeload import load_checkpoint

    keep = map_location if map_location is not None else (lambda storage, loc: storage)
    return load_checkpoint(path, map_location=keep, extra_globals=lightning_checkpoint_globals())


__all__ = ["EpochBatches", "ResumableLoader", "SeededShuffle", "atomic_checkpoint_io", "exact_resume",
           "lightning_checkpoint_globals", "load_lightning_checkpoint", "mix_seed", "reseed"]
