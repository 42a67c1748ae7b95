"""Numerical guards: a non-finite loss stops the stage naming the step, the part and the last good
checkpoint (trainer.on_nonfinite=stop) or skips the batch, counted (skip); fp16 logits that overflowed give a
defined Dice; all-background batches and empty masks give finite losses for both loss presets."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from medsight.config import load_config
from medsight.guards import NonFiniteLossError
from medsight.train import build_trainer

BAD_STEPS = (2, 4)


class Tiny(L.LightningModule):
    """Linear regression whose `train/mask_loss` part is NaN at BAD_STEPS."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        mse = ((self.lin(x) - y) ** 2).mean()
        mask = mse * 0 + (float("nan") if self.global_step in BAD_STEPS else 0.0)
        self.log("train/mse", mse)
        self.log("train/mask_loss", mask)
        return mse + mask

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, generator=g)
        return torch.utils.data.DataLoader(list(zip(x, x.sum(1, keepdim=True))), batch_size=8)


def _fit(tmp_path, mode: str) -> tuple[Tiny, L.Trainer]:
    cfg = load_config("stage1", overrides=[f"trainer.on_nonfinite={mode}", "trainer.max_steps=6",
                                           "trainer.checkpoint_every_n_steps=1", "trainer.max_time_s=null",
                                           "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"])
    model = Tiny()
    trainer = build_trainer(cfg, tmp_path, limit_val_batches=0)
    trainer.fit(model)
    return model, trainer


def test_nonfinite_loss_stops_naming_step_part_and_checkpoint(tmp_path):
    model = Tiny()
    with pytest.raises(NonFiniteLossError) as err:
        model, _ = _fit(tmp_path, "stop")
    msg = str(err.value)
    assert "global step 2" in msg and "train/mask_loss=nan" in msg and "train/mse" not in msg
    assert str(tmp_path / "ckpt" / "last.ckpt") in msg and (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_nonfinite_loss_skip_counts_and_keeps_weights_finite(tmp_path):
    model, trainer = _fit(tmp_path, "skip")
    guard = next(cb for cb in trainer.callbacks if type(cb).__name__ == "NonFiniteGuard")
    assert guard.skipped == len(BAD_STEPS) and trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == len(BAD_STEPS)


def test_bad_mode_is_a_config_error(tmp_path):
    from medsight.config import ConfigError

    cfg = load_config("stage1", overrides=["trainer.on_nonfinite=ignore"])
    with pytest.raises(ConfigError, match="trainer.on_nonfinite"):
        build_trainer(cfg, tmp_path)


def test_fp16_overflowed_mask_logits_give_the_saturated_dice():
    """+-inf fp16 logits score as the same masks with large finite logits (an independent saturated oracle)."""
    from medsight.metrics.seg import MaskDice

    g = torch.Generator().manual_seed(0)
    sign = torch.randn(2, 3, 8, 8, generator=g) > 0
    inf = torch.where(sign, torch.tensor(float("inf")), torch.tensor(float("-inf"))).half()  # (B, N, h, w)
    finite = torch.where(sign, torch.tensor(30.0), torch.tensor(-30.0))
    gt = (torch.randn(2, 2, 16, 16, generator=g) > 0).float()
    args = ([(torch.tensor([0, 2]), torch.tensor([0, 1]))] * 2, gt, torch.ones(2, 2, dtype=torch.bool),
            torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1]))
    a, b = MaskDice(["x", "y"]), MaskDice(["x", "y"])
    a.update(inf, *args)
    b.update(finite, *args)
    ra, rb = a.compute(), b.compute()
    assert all(math.isfinite(float(v)) for v in ra.values())
    assert {k: round(float(v), 6) for k, v in ra.items()} == {k: round(float(v), 6) for k, v in rb.items()}


@pytest.mark.parametrize("preset", ["paper", "official_code"])
def test_all_background_batch_and_empty_masks_are_finite(preset):
    from medsight.metrics.seg import binary_dice
    from medsight.models.matching import build_criterion, dice_loss

    cfg = load_config("stage1", overrides=[f"loss.preset={preset}", "loss.deep_supervision=false"])
    crit = build_criterion(cfg)
    B, N, C = 2, 5, cfg.perceiver.num_classes
    for M in (0, 2):  # M=0: no image has a mask; M=2: image 0 has one real and one empty mask, image 1 none
        out = {"pred_masks": torch.randn(B, N, 16, 16, requires_grad=True),
               "pred_logits": torch.randn(B, N, C + 1, requires_grad=True)}
        labels = torch.full((B, M), -1, dtype=torch.long)
        masks, valid = torch.zeros(B, M, 32, 32), torch.zeros(B, M, dtype=torch.bool)
        if M:
            labels[0], valid[0] = torch.tensor([1, 2]), True
            masks[0, 0, :8] = 1
        losses, _ = crit(out, labels, masks, valid)
        assert all(math.isfinite(float(v)) for v in losses.values()), (M, losses)
        losses["loss"].backward()
        assert all(torch.isfinite(t.grad).all() for t in out.values())
    empty = torch.zeros(1, 64)
    assert float(binary_dice(empty, empty)) == 1.0  # evaluation: an empty GT predicted empty is exact
    assert float(dice_loss(torch.full((1, 64), -30.0), empty)) == pytest.approx(0.0, abs=1e-6)  # training
    assert float(dice_loss(torch.full((1, 64), 30.0), empty)) == pytest.approx(64 / 65, abs=1e-5)
