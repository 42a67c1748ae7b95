"""Stage 1: train the Region Perceiver (SPEC section 3) on segmentation, with Hungarian-matched set loss.

    python -m stages.stage1 [overlay.yaml ...] [key=value ...]     (make stage1: 2-6 min on a 2-core CPU)
    python -m stages.stage1 resume=auto                            (continue an interrupted run from last.ckpt)

Writes checkpoints/<run>/stage1/: config.yaml, tb/ (TensorBoard: losses, val/dice*, mask overlays),
ckpt/{last,best}.ckpt (resuming only), export/ (vision + perceiver for stage 2) and metrics.json.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from medsight.config import from_dict, to_dict
from medsight.export import save_export, write_metrics
from medsight.metrics.seg import MaskDice
from medsight.models import stage1_components
from medsight.models.matching import build_criterion
from medsight.train import (
    adamw_cosine,
    build_trainer,
    declare_trainable,
    log,
    log_param_counts,
    process_start_time,
    resume_checkpoint,
    run_stage,
    setup_run,
    stopped_by_time_cap,
)
from medsight.viz import mask_grid, matched_predictions


class PerceiverModule(L.LightningModule):
    """Vision encoder -> Region Perceiver, trained with the set-prediction loss; validated by matched Dice."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = cfg = from_dict(config)
        comps = stage1_components(cfg)
        self.vision, self.perceiver = comps["vision"], comps["perceiver"]
        self.criterion = build_criterion(cfg)
        # what trains in stage 1 (the one place): the perceiver, and the encoder when vision.trainable
        # (the random tiny encoder must learn; the paper's CLIP encoder stays frozen)
        self.param_counts = declare_trainable(self, ["perceiver"] + (["vision"] if cfg.vision.trainable else []))
        self.val_dice = MaskDice(cfg.data.modality_groups, threshold=0.5)
        self.final_metrics: dict[str, float] = {}
        self.val_step = -1  # global step of the last validation
        self._viz: list[tuple] = []  # validation pictures for TensorBoard

    def forward(self, images: torch.Tensor) -> dict:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.vision.trainable):
            feats, _ = self.vision(images)  # (B, H', W', D)
        return self.perceiver(feats)

    def _loss(self, batch: dict) -> tuple[dict, dict, list]:
        out = self(batch["image"])
        losses, matches = self.criterion(out, batch["labels"], batch["masks"], batch["mask_valid"])
        return out, losses, matches

    def on_train_start(self) -> None:
        log.info("stage 1 training from global step %d (max_steps %d)", self.global_step, self.trainer.max_steps)

    def on_train_epoch_start(self) -> None:
        if not self.cfg.vision.trainable:
            self.vision.eval()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, losses, _ = self._loss(batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out, losses, matches = self._loss(batch)
        self.log("val/loss", losses["loss"], batch_size=batch["image"].shape[0])
        self.val_dice.update(out["pred_masks"], matches, batch["masks"], batch["mask_valid"], batch["labels"],
                             batch["modality"])
        self._collect_viz(batch, out["pred_masks"], matches)

    def on_validation_epoch_end(self) -> None:
        metrics = {f"val/{k}": v for k, v in self.val_dice.compute().items()}
        self.val_dice.reset()
        self.log_dict(metrics)
        self.final_metrics = {k: float(v) for k, v in metrics.items()}
        self.val_step = self.global_step
        log.info("step %d  val/dice %.4f  val/dice_oracle %.4f", self.global_step, metrics["val/dice"],
                 metrics["val/dice_oracle"])
        if self._viz and self.logger is not None:
            images = torch.stack([v[0] for v in self._viz])
            grid = mask_grid(images, [v[1] for v in self._viz], [v[2] for v in self._viz], self.cfg.data.mean,
                             self.cfg.data.std, max_rows=len(self._viz))
            self.logger.experiment.add_image("val/masks", grid, self.global_step)
        self._viz = []

    def _collect_viz(self, batch: dict, pred_masks: torch.Tensor, matches: list, per_group: int = 2) -> None:
        """Keep (image, GT masks, matched predicted masks) of the first `per_group` images of each group."""
        masks = batch["masks"]
        for b, g in enumerate(batch["modality"].tolist()):
            if sum(v[3] == g for v in self._viz) >= per_group:
                continue
            gt_idx, preds = matched_predictions(pred_masks[b:b + 1], matches[b:b + 1], size=tuple(masks.shape[-2:]))
            self._viz.append((batch["image"][b], masks[b, gt_idx[0]], preds[0], g))

    def configure_optimizers(self) -> dict:
        o = self.cfg.optim
        return adamw_cosine(self.parameters(), o.lr, o.weight_decay, self.cfg.trainer.max_steps, o.warmup_frac,
                            o.min_lr_ratio, self.cfg)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    t0 = process_start_time()
    cfg, out = setup_run("stage1", argv)
    from medsight.data.datamodule import MedicalDataModule

    dm = MedicalDataModule(cfg, task="segmentation")
    model = PerceiverModule(to_dict(cfg))
    log_param_counts(model, {"vision": model.vision, "perceiver": model.perceiver})
    trainer = build_trainer(cfg, out, monitor="val/dice", mode="max")
    trainer.fit(model, datamodule=dm, ckpt_path=resume_checkpoint(cfg, out))
    if model.val_step != trainer.global_step:  # final metrics of the final weights
        trainer.validate(model, datamodule=dm, verbose=False)
    metrics = {**model.final_metrics, "global_step": trainer.global_step, "seed": cfg.seed,
               "stopped_by_time_cap": stopped_by_time_cap(trainer), "wall_time_s": time.time() - t0}
    save_export(out / "export", cfg, {"vision": model.vision, "perceiver": model.perceiver},
                extra_meta={"val/dice": metrics.get("val/dice")})
    write_metrics(out, metrics)
    log.info("stage 1 done in %.0f s: val/dice %.4f; export %s", metrics["wall_time_s"], metrics["val/dice"],
             out / "export")
    return metrics


if __name__ == "__main__":
    run_stage(main)
