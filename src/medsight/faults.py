"""Test-only fault hook: make "the process died here" deterministic.

Set the environment variable `MEDSIGHT_FAULT` to one or more comma-separated points:

- `step:K`         die at the start of the training batch whose global step is K (after step K-1's optimiser
                   step and any checkpoint written at it), in every stage and stage-3 phase that reaches it;
- `write:NAME`     die half-way through writing the file NAME (e.g. `last.ckpt`, `llm.safetensors`): the
                   temporary file holds half the bytes, the real one is untouched;
- `write:NAME:N`   the same, at the N-th write of NAME in this process (1-based).

The "death" is `SimulatedKill`, a BaseException (nothing catches it as an error; Lightning's interrupt
handling re-raises it and writes no checkpoint). Unset in normal use: every check is one dict lookup.
"""

from __future__ import annotations

import os
from collections import Counter

ENV = "MEDSIGHT_FAULT"
_writes: Counter = Counter()


class SimulatedKill(BaseException):
    """Raised by a fault point: the test stands in for SIGKILL at a known place."""


def _points() -> list[str]:
    return [p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()]


def die_at_step(step: int) -> None:
    """Raise SimulatedKill when `MEDSIGHT_FAULT` holds `step:<step>`."""
    if f"step:{int(step)}" in _points():
        raise SimulatedKill(f"{ENV}: killed at global step {step}")


def should_die_writing(name: str) -> bool:
    """True when `MEDSIGHT_FAULT` asks to die while writing the current write of file `name` (counted)."""
    pts = _points()
    if not pts:
        return False
    _writes[name] += 1
    for p in pts:
        parts = p.split(":")
        if parts[0] == "write" and len(parts) >= 2 and parts[1] == name:
            if len(parts) == 2 or int(parts[2]) == _writes[name]:
                return True
    return False


def reset() -> None:
    """Forget the write counts (tests)."""
    _writes.clear()


__all__ = ["ENV", "SimulatedKill", "die_at_step", "reset", "should_die_writing"]
