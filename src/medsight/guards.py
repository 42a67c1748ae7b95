"""Numerical guards for training: a non-finite loss never reaches the weights.

`trainer.on_nonfinite`:
- `stop` (default): the stage stops with `NonFiniteLossError` naming the global step, the loss parts that
  were not finite (from what the stage logged for that step, e.g. `train/mask_loss`) and the last good
  checkpoint (`resume=auto` continues from it); the weights of the bad step are never updated.
- `skip`: the batch's gradients are dropped (no optimiser update), the batch is counted
  (`train/skipped_nonfinite`, and a warning per batch) and training goes on.
The decision is agreed across DDP ranks (one rank with a non-finite loss is enough), so every rank skips or
stops at the same step: no rank is left waiting in a collective.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("medsight")
MODES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or infinite (trainer.on_nonfinite=stop); the message names the step, the loss
    parts and the last good checkpoint."""


def _last_checkpoint(trainer: Any) -> str:
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        if getattr(cb, "filename", None) == "last" and cb.dirpath:
            path = Path(cb.dirpath) / "last.ckpt"
            if path.is_file():
                return f"{path} (resume=auto continues from it)"
    return "none written yet (the run must start again)"


def _bad_parts(trainer: Any) -> list[str]:
    out = []
    for k, v in trainer.callback_metrics.items():
        if not k.startswith("train/"):
            continue
        x = float(v) if torch.is_tensor(v) and v.numel() == 1 else v
        if isinstance(x, float) and not math.isfinite(x):
            out.append(f"{k}={x}")
    return out


def nonfinite_guard(mode: str) -> Any:
    """The Lightning callback for `trainer.on_nonfinite` (Lightning imported here, not at module import)."""
    from lightning.pytorch.callbacks import Callback

    from medsight.config import ConfigError

    if mode not in MODES:
        raise ConfigError(f"bad value for config key 'trainer.on_nonfinite': {mode!r}; choose from {list(MODES)}")

    class NonFiniteGuard(Callback):
        def __init__(self) -> None:
            self.bad = False
            self.skipped = 0

        def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
            self.bad = self.bad or not bool(torch.isfinite(loss.detach()).all())

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            bad = trainer.strategy.reduce_boolean_decision(self.bad, all=False)  # any rank
            self.bad = False
            if not bad:
                return
            step = trainer.global_step
            parts = _bad_parts(trainer)
            what = ", ".join(parts) if parts else "the loss (its logged parts are finite: the total overflowed)"
            if mode == "stop":
                raise NonFiniteLossError(
                    f"non-finite training loss at global step {step}: {what}; weights of this step not updated; "
                    f"last good checkpoint: {_last_checkpoint(trainer)} (trainer.on_nonfinite=skip drops such "
                    "batches instead)")
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)  # no gradient -> AdamW leaves every parameter as it is
            log.warning("step %d: non-finite loss (%s): batch skipped (%d so far, trainer.on_nonfinite=skip)",
                        step, what, self.skipped)
            pl_module.log("train/skipped_nonfinite", float(self.skipped), reduce_fx="max")

        def state_dict(self) -> dict[str, int]:
            return {"skipped": self.skipped}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.skipped = int(state.get("skipped", 0))

    return NonFiniteGuard()


__all__ = ["MODES", "NonFiniteLossError", "nonfinite_guard"]
