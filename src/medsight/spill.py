"""Bounded in-memory tensor keeping with an on-disk overflow: what does not fit in `budget_mb` is written to
one append-only file and read back (memory-mapped, then copied) when used.

Stage 2 keeps per image the frozen patch features (H', W', D) and the target masks (T, S, S) for its decode
loss; at BiomedParse scale (211k training images) that is hundreds of GB, so beyond `codebook.region_store_mb`
they live on disk (`<run>/stage2/spill/`, removed when the process ends).
"""

from __future__ import annotations

import atexit
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Spilled:
    """A tensor written to a SpillFile; `load()` reads it back."""

    store: SpillFile
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def load(self) -> torch.Tensor:
        return self.store.read(self)


class SpillFile:
    """keep(t) -> t itself while the kept bytes fit `budget_mb`, else a `Spilled` handle to a copy on disk."""

    def __init__(self, folder: str | Path, budget_mb: float) -> None:
        self.folder, self.budget = Path(folder), int(budget_mb * 2**20)
        self.in_memory = 0
        self.on_disk = 0
        self._path: Path | None = None
        self._fh: Any = None

    def keep(self, t: torch.Tensor) -> torch.Tensor | Spilled:
        n = t.numel() * t.element_size()
        if self.in_memory + n <= self.budget:
            self.in_memory += n
            return t
        if self._fh is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"spill_{os.getpid()}_", suffix=".bin", dir=self.folder)
            self._path, self._fh = Path(name), os.fdopen(fd, "wb+")
            atexit.register(self.close)
        arr = t.detach().contiguous().cpu().numpy()
        self._fh.seek(0, os.SEEK_END)
        offset = self._fh.tell()
        self._fh.write(arr.tobytes())
        self.on_disk += arr.nbytes
        return Spilled(self, offset, tuple(arr.shape), arr.dtype)

    def read(self, ref: Spilled) -> torch.Tensor:
        self._fh.flush()
        count = int(np.prod(ref.shape)) if ref.shape else 1
        mm = np.memmap(self._path, dtype=ref.dtype, mode="r", offset=ref.offset, shape=(count,))
        return torch.from_numpy(np.array(mm).reshape(ref.shape))

    def close(self) -> None:
        """Delete the file (handles become unreadable)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            if self._path is not None and self._path.exists():
                self._path.unlink()


def materialize(x: Any) -> Any:
    """The tensor behind a `Spilled` handle (anything else unchanged)."""
    return x.load() if isinstance(x, Spilled) else x


__all__ = ["SpillFile", "Spilled", "materialize"]
