"""Stage 3: the LLM side (SPEC section 5) in phases align -> ground -> instruct, from the stage-1 and stage-2
exports. Each phase is one Trainer, starts from the previous phase's export and writes its own.

    python -m stages.stage3 [overlay.yaml ...] [key=value ...]     (make stage3: 5-6 min on a 2-core CPU)
    python -m stages.stage3 stage3.phases=[instruct] llm.lora.enabled=true     (one phase, LoRA)

Writes checkpoints/<run>/stage3/: config.yaml, tokenizer/ (the tiny tokenizer's cache), <phase>/ckpt/
(resuming only), <phase>/export/ (the joint model after each phase), tb/<phase>/ (TensorBoard), export/
(the final model for `medsight.load`) and metrics.json (synthetic test split; wall and per-phase times).

The frozen encoder and perceiver give the same outputs for an image every time, so their outputs (patch
features, region tokens) are computed once per image and kept in memory (`FeatureCache`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medsight.config import from_dict, run_dir, to_dict
from medsight.export import ExportError, lineage, load_component, read_meta, require_export, write_metrics
from medsight.joint_data import CodedText, FeatureCache, example_questions, phase_loader, select_rows
from medsight.joint_eval import evaluate
from medsight.manifest import manifest_digest, staged_dir
from medsight.model import build_joint, load_joint, save_joint
from medsight.models import load_stage1
from medsight.models.llm import init_code_embeddings
from medsight.models.phases import apply_lora, row_masked_params, set_phase
from medsight.train import (
    adamw,
    build_trainer,
    cosine_with_warmup,
    log,
    process_start_time,
    resume_checkpoint,
    run_stage,
    setup_run,
    stopped_by_time_cap,
)

FEATURES = FeatureCache()  # frozen outputs per image, shared by every phase of this process


class JointLLMModule(L.LightningModule):
    """One phase of stage 3 on the joint model (medsight.models.joint.MedSightLM)."""

    def __init__(self, config: dict[str, Any], phase: str, stage1: str, stage2: str, tokenizer_dir: str,
                 init_from: str | None = None, total_steps: int = 100) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = cfg = from_dict(config)
        code_tokens = read_meta(stage2)["code_tokens"]
        if init_from:  # the previous phase's export
            model, _, meta = load_joint(init_from, trust_remote_code=bool(cfg.llm.trust_remote_code))
            self.codes_initialised = bool(meta.get("codes_initialised"))
        else:
            vision, perceiver = load_stage1(stage1, cfg)
            model = build_joint(cfg, vision, perceiver, code_tokens, tokenizer_dir)
            self.codes_initialised = False
        if phase != "align" and not self.codes_initialised:
            # code rows <- v->t projector(stage-2 code embeddings): after align, the projector maps region space
            # to where the LLM reads image tokens (SPEC section 4b)
            emb = load_component(stage2, "code_embeddings")["embeddings"]
            with torch.no_grad():
                init_code_embeddings(model.causal_lm(), model.code_ids.tolist(), model.projector_v2t.project_regions(emb))
            self.codes_initialised = True
        lora = phase == "instruct" and cfg.llm.lora.enabled
        if lora:
            lo = cfg.llm.lora
            apply_lora(model, lo.r, lo.alpha, lo.dropout, list(lo.target_modules))
        model.set_dropout(cfg.llm.attention_dropout, cfg.llm.image_dropout)
        self.model = model
        self.phase = phase
        self.phase_key = phase + ("+lora" if lora else "")
        self.param_counts = set_phase(model, self.phase_key)  # what trains: the one place (phases.PHASES)
        self.coded = CodedText(Path(stage2).parent / "coded")

    def on_train_epoch_start(self) -> None:
        self.model.vision.eval()
        self.model.perceiver.eval()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        convs, keep = self.coded.conversations(batch)
        if not all(keep):
            idx = [i for i, k in enumerate(keep) if k]
            batch = select_rows(batch, idx)
            convs = [convs[i] for i in idx]
        counts = batch.get("image_counts")  # several images per sample: feats/regions of batch["images"]
        feats, regions = FEATURES(self.model, batch["images"] if counts is not None else batch["image"])
        tok = {k: v.to(self.device) for k, v in self.model.tokenize(convs).items()}
        out = self.model(tok["input_ids"], tok["attention_mask"], tok["labels"], feats, regions,
                         batch.get("masks"), batch.get("mask_valid"), image_counts=counts)
        bs = len(convs)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        self.log_dict({"train/ce": out["ce"], "train/mask_loss": out["mask_loss"], "train/token_acc": out["token_acc"]},
                      batch_size=bs)
        if out["code_total"] > 0:
            self.log("train/code_acc", out["code_correct"] / out["code_total"], batch_size=bs)
        return out["loss"]

    def configure_optimizers(self) -> dict:
        """AdamW (row-masked embeddings without weight decay: decay would move the frozen rows), warm-up then
        cosine over the phase. Progress = the larger of step/total (max_steps, or the steps of max_epochs) and,
        on one process, elapsed/max_time_s, so a phase cut by its time budget still ends annealed."""
        o, pc = self.cfg.optim, self.cfg.stage3[self.phase]
        rows = {id(p) for p in row_masked_params(self.model)}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in rows], "weight_decay": o.weight_decay},
                  {"params": [p for p in trainable if id(p) in rows], "weight_decay": 0.0}]
        opt = adamw([g for g in groups if g["params"]], pc.lr, self.cfg)
        total = self.hparams.total_steps
        if pc.max_epochs:  # Lightning's count: epochs x batches per process / gradient accumulation
            total = int(self.trainer.estimated_stepping_batches)
        budget = pc.max_time_s if self.trainer.world_size == 1 else None  # ranks would disagree on the clock
        sched = cosine_with_warmup(opt, total, o.warmup_frac, o.min_lr_ratio, time_budget_s=budget)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_model(self) -> None:
        """FSDP2 (trainer.strategy=model_parallel): every decoder layer, the embeddings, the lm_head, the rest of
        the LLM and each projector become their own shard units; the frozen encoder and perceiver stay
        replicated (frozen and trainable weights never share a unit, which is what breaks FSDP)."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        lm = self.model.causal_lm()
        if lm.get_input_embeddings().weight is lm.get_output_embeddings().weight:
            raise ValueError("trainer.strategy=model_parallel (FSDP2) needs an untied lm_head (llm.tie_word_embeddings=false)")
        dp = mesh["data_parallel"]
        for layer in lm.model.layers:
            fully_shard(layer, mesh=dp)
        for unit in (lm.get_input_embeddings(), lm.get_output_embeddings(), lm.model, self.model.projector_v2t,
                     self.model.projector_t2v):
            fully_shard(unit, mesh=dp)
        frozen = {*self.model.vision.parameters(), *self.model.perceiver.parameters()}
        fully_shard(self.model, mesh=dp, ignored_params=frozen)  # the root (training calls its forward)
        set_phase(self.model, self.phase_key)  # sharding made new parameters: declare again (and row masks)


# ------------------------------------------------------------------------------------------ FSDP2
def _unsharded(module: JointLLMModule) -> JointLLMModule:
    """An unsharded copy of an FSDP2-trained module, built on every rank, full weights gathered (collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    full = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    fresh = JointLLMModule(**module.hparams)
    fresh.model.load_state_dict({k: v.detach().cpu() for k, v in full.items()}, strict=True)
    return fresh


def main(argv: list[str] | None = None) -> dict[str, Any]:
    t0 = process_start_time() if argv is None else time.time()
    cfg, out = setup_run("stage3", argv)
    joint = cfg.stage3.init_from_joint  # fine-tune a joint export (e.g. `medsight import official`'s)
    if joint:
        joint = require_export(Path(joint), "stage3 (or medsight import official)")
        # code names come from it; code-assigned text from the stage-2 export in init_from, when given
        stage1, stage2 = joint, require_export(Path(cfg.init_from), "stage2") if cfg.init_from else joint
    else:
        stage1 = require_export(Path(cfg.out_root) / cfg.run_name / "stage1" / "export", "stage1")
        stage2 = require_export(Path(cfg.init_from) if cfg.init_from else run_dir(cfg, "stage2") / "export",
                                "stage2")
    coded_digest = read_meta(stage2).get("coded_manifest_sha256")
    if coded_digest and manifest_digest(stage2.parent / "coded") != coded_digest:
        raise ExportError(f"{stage2.parent / 'coded'}: its manifest is not the one export {stage2} was written "
                          "with (coded data from another stage-2 run); run make stage2 again")
    if not cfg.stage3.phases:
        raise ValueError("config key 'stage3.phases' is empty; list at least one of align, ground, instruct")
    FEATURES.max_bytes = int(float(cfg.stage3.feature_cache_mb) * 2**20)  # bounded at real scale
    timings: dict[str, float] = {}
    steps: dict[str, int] = {}
    capped: dict[str, bool] = {}
    init: Path | None = joint or None
    module, rank0 = None, True
    for phase in cfg.stage3.phases:
        tp, pc = time.time(), cfg.stage3[phase]
        if _finished(out, phase, cfg):
            log.info("phase %s: finished earlier (resume=auto), continuing from its export", phase)
            init, module = out / phase / "export", None
            done = read_meta(init)
            steps[phase], capped[phase] = int(done.get("global_step", 0)), bool(done.get("stopped_by_time_cap"))
            continue
        module = JointLLMModule(to_dict(cfg), phase, str(stage1), str(stage2), str(out / "tokenizer"),
                              str(init) if init else None, total_steps=pc.max_steps)
        c = module.param_counts
        log.info("phase %s: %s trainable (%s in code-token rows), %s frozen", phase, f"{c['trainable']:,}",
                 f"{c['code_rows']:,}", f"{c['frozen']:,}")
        trainer = build_trainer(cfg, out, max_steps=-1 if pc.max_epochs else pc.max_steps, subdir=f"{phase}/",
                                max_epochs=pc.max_epochs or -1, max_time_s=pc.max_time_s, use_distributed_sampler=False)
        trainer.fit(module, train_dataloaders=phase_loader(cfg, phase),
                    ckpt_path=resume_checkpoint(cfg, out, f"{phase}/"))
        init, rank0 = out / phase / "export", trainer.is_global_zero
        steps[phase], capped[phase] = trainer.global_step, stopped_by_time_cap(trainer)
        if module.coded.missing:
            log.warning("phase %s: %d grounded records had no code-assigned text in %s and were skipped", phase,
                        module.coded.missing, stage2.parent / "coded")
        if getattr(module, "device_mesh", None) is not None:  # FSDP2: gather the full weights (every rank)
            module = _unsharded(module)
        if rank0:
            val = evaluate(module.model, FEATURES, cfg, "val", module.coded, phase=phase,
                           max_batches=cfg.stage3.val_batches)
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"val/{k}": v for k, v in val.items()}, step=trainer.global_step)
            log.info("phase %s: %d steps in %.0f s; %s", phase, trainer.global_step, time.time() - tp,
                     ", ".join(f"val/{k} {v:.3f}" for k, v in val.items()))
            save_joint(module.model, init, cfg, {"phase": phase, "codes_initialised": module.codes_initialised,
                                                 "global_step": trainer.global_step,
                                                 "stopped_by_time_cap": capped[phase],
                                                 **{f"val/{k}": v for k, v in val.items()}})
        trainer.strategy.barrier()
        timings[phase] = time.time() - tp
    if not rank0:
        return {}
    final = out / "export"
    model = module.model if module is not None else load_joint(init)[0]
    coded = module.coded if module is not None else CodedText(stage2.parent / "coded")
    tt = time.time()
    test = evaluate(model, FEATURES, cfg, "test", coded, max_batches=cfg.stage3.test_batches)
    metrics = {**{f"test/{k}": v for k, v in test.items()}, "test_time_s": time.time() - tt,
               **{f"time/{p}_s": t for p, t in timings.items()}, "steps": steps, "stopped_by_time_cap": capped,
               "seed": cfg.seed}
    meta = read_meta(init)
    meta.update(stage="stage3", phases=list(cfg.stage3.phases), lineage=lineage(stage1, stage2),
                example_questions=example_questions(cfg),
                test_metrics={k: float(v) for k, v in metrics.items() if k.startswith("test/")})
    with staged_dir(final) as staged:  # the last phase's export (the model just tested), copied and swapped in
        staged.copy_from(init, skip=("meta.json",))
        staged.write_text("meta.json", json.dumps(meta, indent=2))
    metrics["wall_time_s"] = time.time() - t0
    write_metrics(out, metrics)
    log.info("stage 3 done in %.0f s: %s; export %s", metrics["wall_time_s"],
             ", ".join(f"{k} {v:.3f}" for k, v in test.items()), final)
    return metrics


def _finished(out: Path, phase: str, cfg) -> bool:
    """resume=auto and this phase already wrote its export (a phase's export is written after its training)."""
    return cfg.resume == "auto" and (out / phase / "export" / "meta.json").is_file()


def components(cfg) -> dict[str, Any]:
    """`python -m medsight.inspect stage3 ...`: the joint model's parts, built on the current (meta) device."""
    from medsight.models.joint import joint_components

    return joint_components(cfg)


if __name__ == "__main__":
    run_stage(main)
