"""Stage 2: learn the modality-aware region codebook (SPEC section 4) over the frozen stage-1 encoder and
perceiver, then assign a code token to every ground-truth mask of the instruction data.

    python -m stages.stage2 [overlay.yaml ...] [key=value ...]     (make stage2: about 2-3 min on a 2-core CPU)

The encoder and perceiver are frozen, so their outputs (patch features, pooled feature, the final region
queries Hungarian-matched to each GT mask, the continuous masks' Dice) are computed ONCE for every image;
training then runs only the quantiser and the perceiver's decode of the quantised queries.
Writes checkpoints/<run>/stage2/: config.yaml, tb/, ckpt/last.ckpt (resuming only), export/ (codebook +
code_embeddings for stage 3), coded/ (instruct + DiagSeg files with code tokens, code_consistency.{json,png})
and metrics.json.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from medsight import codes
from medsight.config import from_dict, previous_export, to_dict
from medsight.export import require_export, save_export, write_metrics
from medsight.manifest import manifest_digest, staged_dir
from medsight.metrics.seg import MaskDice
from medsight.models import build_vision, load_stage1
from medsight.models.codebook import build_quantizer, quantizer_loss, usage_stats
from medsight.models.matching import (
    dice_loss,
    flatten_for_loss,
    loss_weights,
    sigmoid_bce_loss,
)
from medsight.regions import BucketBatches, Regions, collate_regions, encode_regions
from medsight.resume import ResumableLoader
from medsight.train import (
    adamw,
    build_trainer,
    cosine_with_warmup,
    declare_trainable,
    default_device,
    default_precision,
    log,
    log_param_counts,
    process_start_time,
    resume_checkpoint,
    run_stage,
    setup_run,
    stopped_by_time_cap,
)


class CodebookModule(L.LightningModule):
    """Frozen encoder + perceiver (from the stage-1 export) and the trainable region quantiser."""

    def __init__(self, config: dict[str, Any], stage1_export: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = cfg = from_dict(config)
        self.vision, self.perceiver = load_stage1(stage1_export, cfg)  # strict, frozen, checked for compatibility
        self.quantizer = build_quantizer(cfg, enc_dim=self.vision.out_dim)
        # what trains in stage 2 (the one place): the quantiser (W_q, codebooks, W_m, modality head)
        self.param_counts = declare_trainable(self, ["quantizer"])
        self.w = loss_weights(cfg.loss)
        self.val_dice = MaskDice(cfg.data.modality_groups, threshold=0.5)
        self.train_regions: list[Regions] = []
        self.val_regions: list[Regions] = []
        self.dice_continuous = float("nan")
        self.final_metrics: dict[str, Any] = {}
        self.val_step = -1  # global step of the last validation
        self._val_codes: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------ cached inputs
    def set_regions(self, regions: list[Regions], dice_continuous: float) -> None:
        """The frozen outputs computed once (regions.encode_regions): train/val splits are used here."""
        self.train_regions = [r for r in regions if r.split == "train"]
        self.val_regions = [r for r in regions if r.split == "val"]
        self.dice_continuous = float(dice_continuous)
        if self.cfg.codebook.quantize_all:  # every final region query, matched or not
            single = [(r.all_queries, r.group) for r in self.train_regions]
        else:  # the GT-matched ones (what code assignment quantises)
            single = [(r.queries[~r.is_union], r.group) for r in self.train_regions]
        self.bank_q = torch.cat([q for q, _ in single])  # (Q, d) every matched training query
        self.bank_g = torch.cat([torch.full((len(q),), g) for q, g in single])
        self.bank_pooled = torch.stack([r.pooled for r in self.train_regions])  # (I, D_enc)
        self.bank_mod = torch.tensor([r.group for r in self.train_regions])

    def _loader(self, regions: list[Regions], batch_size: int, shuffle: bool) -> DataLoader:
        sampler = BucketBatches([r.num_single for r in regions], batch_size, shuffle, seed=self.cfg.seed)
        return ResumableLoader(regions, batch_sampler=sampler, collate_fn=collate_regions)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_regions, int(self.cfg.data.batch_size), True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_regions, int(self.cfg.data.eval_batch_size), False)

    def on_fit_start(self) -> None:
        for k in ("bank_q", "bank_g", "bank_pooled", "bank_mod"):
            setattr(self, k, getattr(self, k).to(self.device))
        if not bool(self.quantizer.initialized):  # a resumed run keeps its statistics and codes
            self.quantizer.initialized.fill_(True)
            if self.cfg.codebook.standardize:
                self.quantizer.set_input_stats(self.bank_q)
            if self.cfg.codebook.init_from_data:  # k-means++ codes on the initial z
                with torch.no_grad():
                    self.quantizer.init_from_data(self.quantizer.encode(self.bank_q), self.bank_g,
                                                  seed=self.cfg.seed, balance=float(self.cfg.codebook.init_balance))
        self.vision.eval()
        self.perceiver.eval()

    # ---------------------------------------------------------------------------------- training
    def _decode_loss(self, feats: torch.Tensor, queries: torch.Tensor, masks: torch.Tensor) -> tuple:
        """Masks decoded by the perceiver from queries (B, M, d); BCE + Dice (stage-1 weights) vs masks."""
        pred = self.perceiver(feats, queries=queries)["pred_masks"]  # (B, M, h, w)
        x, t = flatten_for_loss(pred, masks, int(self.cfg.loss.num_points))
        x, t = x.flatten(0, 1).float(), t.flatten(0, 1)  # (B*M, P)
        loss = self.w["bce"] * sigmoid_bce_loss(x, t).mean() + self.w["dice"] * dice_loss(x, t).mean()
        return loss, pred

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        c = self.cfg.codebook
        B, M, d = batch["queries"].shape
        n = min(int(c.query_batch), len(self.bank_q))  # extra cached queries for the cheap losses
        qi = torch.randint(len(self.bank_q), (n,), device=self.device)
        ii = torch.randint(len(self.bank_pooled), (min(n, len(self.bank_pooled)),), device=self.device)
        queries = torch.cat([batch["queries"].reshape(B * M, d), self.bank_q[qi]])  # (B*M + n, d)
        groups = torch.cat([batch["group"].repeat_interleave(M), self.bank_g[qi]])
        recon, q = self.quantizer(queries, groups)
        loss_recon = self.quantizer.reconstruction_loss(recon, queries)
        loss_vq = quantizer_loss(q, c.codebook_weight, c.beta)
        loss_mask = recon.new_zeros(())
        warm = self.global_step < int(c.warmup_steps)
        if not warm and batch_idx % max(1, int(c.mask_every)) == 0:  # the decode is the expensive part of a step
            loss_mask, _ = self._decode_loss(batch["feats"], recon[: B * M].view(B, M, d), batch["masks"])
        logits = self.quantizer.predict_modality(torch.cat([batch["pooled"], self.bank_pooled[ii]]))
        loss_mod = F.cross_entropy(logits, torch.cat([batch["group"], self.bank_mod[ii]]))
        loss = c.recon_weight * loss_recon + loss_vq + c.mask_weight * loss_mask + c.modality_weight * loss_mod
        logs = {"train/loss": loss, "train/loss_recon": loss_recon, "train/loss_codebook": q.codebook_loss,
                "train/loss_commitment": q.commitment_loss, "train/loss_modality": loss_mod}
        if loss_mask.requires_grad:
            logs["train/loss_mask"] = loss_mask
        self.log_dict(logs, batch_size=B)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # warm-up: W_m learns to decode the initial (k-means) codes before W_q and the codes move; otherwise
        # the first reconstruction gradients, alike for every query, drag all z one way and the codes collapse
        if self.global_step < int(self.cfg.codebook.warmup_steps):
            for p in [*self.quantizer.w_q.parameters(), self.quantizer.codebook]:
                p.grad = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        c = self.cfg.codebook
        if c.reseed_dead and self.global_step % max(1, int(c.reseed_every)) == 0:
            n = self.quantizer.reseed_dead()
            self.log("train/reseeded_codes", float(n))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The dead-code bookkeeping (usage since the last check, recent z per group) is not part of the export
        (non-persistent buffers) but a resumed run needs it to re-seed the same codes."""
        q = self.quantizer
        checkpoint["codebook_bookkeeping"] = {k: getattr(q, k).detach().cpu().clone()
                                              for k in ("usage", "recent", "recent_n")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for k, v in checkpoint.get("codebook_bookkeeping", {}).items():
            getattr(self.quantizer, k).copy_(v)

    # -------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        B, M, d = batch["queries"].shape
        groups = batch["group"].repeat_interleave(M)
        recon, q = self.quantizer(batch["queries"].reshape(B * M, d), groups)
        loss_mask, pred = self._decode_loss(batch["feats"], recon.view(B, M, d), batch["masks"])
        ar = torch.arange(M)
        self.val_dice.update(pred, [(ar, ar)] * B, batch["masks"], torch.ones(B, M, dtype=torch.bool,
                             device=self.device), batch["labels"], batch["group"])
        self._val_codes.append(torch.stack([groups, q.codes]).cpu())
        self.log_dict({"val/loss_recon": self.quantizer.reconstruction_loss(recon, batch["queries"].reshape(B * M, d)),
                       "val/loss_mask": loss_mask}, batch_size=B)

    def on_validation_epoch_end(self) -> None:
        names = list(self.cfg.data.modality_groups)
        c = self.cfg.codebook
        gc = torch.cat(self._val_codes, 1) if self._val_codes else torch.zeros(2, 0, dtype=torch.long)
        self._val_codes = []
        usage, ppl, n = usage_stats(gc[1], gc[0], c.num_groups, c.num_codes)
        present = [g for g in range(len(names)) if n[g] > 0]
        usage_all, mod_acc = torch.zeros(len(names)), torch.tensor(float("nan"))
        if self.val_regions:
            # usage over every final region query of the validation images (N per image), not only matched ones
            qa = torch.cat([r.all_queries for r in self.val_regions]).to(self.device)
            ga = torch.cat([torch.full((len(r.all_queries),), r.group) for r in self.val_regions]).to(self.device)
            usage_all = usage_stats(self.quantizer.quantize(qa, ga).codes.cpu(), ga.cpu(), c.num_groups, c.num_codes)[0]
            pooled = torch.stack([r.pooled for r in self.val_regions]).to(self.device)  # (I, D_enc)
            truth = torch.tensor([r.group for r in self.val_regions], device=self.device)
            mod_acc = (self.quantizer.predict_modality(pooled).argmax(-1) == truth).float().mean()
        dice = self.val_dice.compute()
        self.val_dice.reset()
        m = {"val/dice_quantized": dice["dice"], "val/dice_continuous": self.dice_continuous,
             "val/modality_acc": mod_acc}
        m.update({f"val/codebook_usage/{names[g]}": usage[g] for g in present})
        m.update({f"val/perplexity/{names[g]}": ppl[g] for g in present})
        self.log_dict({k: float(v) for k, v in m.items()})
        self.final_metrics = {
            "val/dice_quantized": float(dice["dice"]), "val/dice_continuous": self.dice_continuous,
            "val/dice_quantized_group": {k.split("/", 1)[1]: float(v) for k, v in dice.items() if k.startswith("dice_group/")},
            "codebook_usage": {names[g]: float(usage[g]) for g in present},
            "codebook_usage_all_queries": {names[g]: float(usage_all[g]) for g in present},
            "perplexity": {names[g]: float(ppl[g]) for g in present},
            "val_masks": {names[g]: int(n[g]) for g in present},
            "modality_accuracy": float(mod_acc),
        }
        self.val_step = self.global_step
        log.info("step %d  val/dice_quantized %.4f (continuous %.4f)  usage %s  modality acc %.3f", self.global_step,
                 dice["dice"], self.dice_continuous, {k: round(v, 2) for k, v in self.final_metrics["codebook_usage"].items()},
                 mod_acc)

    def configure_optimizers(self) -> dict:
        o, q = self.cfg.optim, self.quantizer
        slow = [*q.w_q.parameters(), q.codebook]
        fast = [p for p in q.parameters() if all(p is not s for s in slow)]
        groups = [{"params": fast}, {"params": slow, "lr": o.lr * self.cfg.codebook.encoder_lr_scale}]
        opt = adamw(groups, o.lr, self.cfg, weight_decay=o.weight_decay)
        sched = cosine_with_warmup(opt, self.cfg.trainer.max_steps, o.warmup_frac, o.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def components(cfg) -> dict[str, Any]:
    """Stage-2 components for `python -m medsight.inspect stage2`: the quantiser and the code-token count."""
    q = build_quantizer(cfg, enc_dim=build_vision(cfg).out_dim)
    return {"codebook": q, "code_tokens": cfg.codebook.num_groups * cfg.codebook.num_codes}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    t0 = process_start_time()
    cfg, out = setup_run("stage2", argv)
    stage1 = require_export(previous_export(cfg, "stage1"), "stage1")
    from medsight.data.datamodule import MedicalDataModule

    model = CodebookModule(to_dict(cfg), str(stage1))
    log_param_counts(model, {"vision": model.vision, "perceiver": model.perceiver, "quantizer": model.quantizer})
    dm = MedicalDataModule(cfg, "segmentation")
    records = codes.read_records(dm)  # instruction / DiagSeg records: their masks (and unions) get codes too
    loader = codes.region_loader(dm, codes.region_samples(dm, records), int(cfg.data.eval_batch_size))
    cont = MaskDice(cfg.data.modality_groups, threshold=0.5)
    device = default_device(cfg)
    model.to(device)
    from medsight.spill import SpillFile

    spill = SpillFile(out / "spill", float(cfg.codebook.region_store_mb))  # bounded memory at real scale
    regions = encode_regions(model.vision, model.perceiver, loader, model.w, metric=cont.to(device),
                             device=device, autocast=default_precision(cfg).startswith("bf16"), spill=spill)
    if spill.on_disk:
        log.info("stage 2: %.0f MB of frozen features/masks kept on disk in %s (codebook.region_store_mb=%g)",
                 spill.on_disk / 2**20, out / "spill", cfg.codebook.region_store_mb)
    model.set_regions(regions, float(cont.compute()["dice"]))
    log.info("frozen outputs of %d images computed once in %.0f s (train %d, val %d)", len(regions),
             time.time() - t0, len(model.train_regions), len(model.val_regions))
    vci = cfg.trainer.val_check_interval
    trainer = build_trainer(cfg, out, check_val_every_n_epoch=None, val_check_interval=vci or 10**9)
    trainer.fit(model, ckpt_path=resume_checkpoint(cfg, out))
    if model.val_step != trainer.global_step:  # a fit stopped by the clock has validated already
        trainer.validate(model, verbose=False)  # final metrics of the final weights
    q = model.quantizer.eval()
    names = codes.code_names(cfg.codebook.num_groups, cfg.codebook.num_codes)
    with torch.no_grad():
        emb = {"embeddings": q.code_embeddings().float().cpu()}  # (G*K, d) modality-major
    # coded/ (what stage 3 trains on) first, staged and swapped in with its manifest; the export then records
    # that manifest's digest, so stage 3 reads the coded files of exactly this export
    with staged_dir(out / "coded") as coded:
        report = codes.run_assignment(dm, q, regions, records, coded.path, names)
    save_export(out / "export", cfg, {"codebook": q, "code_embeddings": emb},
                extra_meta={"code_tokens": names, "num_groups": cfg.codebook.num_groups,
                            "num_codes": cfg.codebook.num_codes, "code_dim": cfg.codebook.code_dim,
                            "encoder_dim": model.vision.out_dim, "stage1_export": str(stage1),
                            "coded_manifest_sha256": manifest_digest(out / "coded"),
                            "val/dice_quantized": model.final_metrics.get("val/dice_quantized")})
    spill.close()  # the on-disk part of the frozen outputs is no longer needed
    metrics = {**model.final_metrics, "global_step": trainer.global_step, "seed": cfg.seed,
               "stopped_by_time_cap": stopped_by_time_cap(trainer),
               "code_consistency_mean_top3_share": report["mean_top_share"], "wall_time_s": time.time() - t0}
    write_metrics(out, metrics)
    log.info("stage 2 done in %.0f s: val/dice_quantized %.4f vs continuous %.4f; export %s", metrics["wall_time_s"],
             metrics.get("val/dice_quantized", float("nan")), metrics["val/dice_continuous"], out / "export")
    return metrics


if __name__ == "__main__":
    run_stage(main)
