"""Mechanics every stage shares: run setup, the trainable-set declaration, optimiser + schedule, the
Lightning Trainer with TensorBoard, checkpoints for resuming, and the wall-clock budget.

A stage file calls these; there is no stage base class (STYLE.md point 1).
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from medsight.config import load_config, offline_env, parse_cli, run_dir

log = logging.getLogger("medsight")


def process_start_time() -> float:
    """When this process started (a stage's wall_time_s counts interpreter start-up and imports too)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except (ImportError, OSError):  # psutil missing or /proc unreadable
        return time.time()


def run_stage(main: Any) -> None:
    """`python -m stages.stageN` entry: a user error (missing export, bad config key, bad data) ends with one
    line naming the file/key and exit status 2, not a traceback; anything else propagates as usual."""
    from medsight.atomic import OutputError
    from medsight.config import ConfigError
    from medsight.data import DataError
    from medsight.export import ExportError
    from medsight.guards import NonFiniteLossError

    try:
        main()
    except (ExportError, ConfigError, DataError, OutputError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")


def setup_run(stage: str, argv: Optional[list[str]] = None) -> tuple[DictConfig, Path]:
    """Parse `[overlay.yaml ...] [key=value ...]`, build the config, seed, and create the run directory
    (with the resolved config written as `config.yaml`)."""
    offline_env()
    setup_logging()
    torch.set_flush_denormal(True)  # denormal floats from confident mask logits slow CPUs 8x
    overlays, overrides = parse_cli(list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(stage, overlays, overrides)
    from medsight.handoff import inherit_for_stage

    inherit_for_stage(cfg, overlays, overrides)  # the architecture comes from the export this stage starts from
    seed_everything(cfg.seed)
    out = run_dir(cfg)
    from medsight.atomic import check_writable, write_text

    check_writable(out)  # an unwritable output folder: one line naming it, before any work
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return cfg, out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)


# ------------------------------------------------------------------------------------ what trains
def declare_trainable(model: torch.nn.Module, trainable: Iterable[str]) -> dict[str, int]:
    """Freeze everything, then unfreeze the named submodules (dotted names; '' = all). Returns counts.

    This is the one place a stage says what trains (STYLE.md point 2); tests assert the result.
    """
    names = list(trainable)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        sub = model if name == "" else model.get_submodule(name)
        for p in sub.parameters():
            p.requires_grad_(True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    return {"trainable": n_train, "frozen": n_total - n_train, "total": n_total}


def trainable_names(model: torch.nn.Module) -> set[str]:
    """Top-level-ish names of trainable parameters (for tests)."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def log_param_counts(model: torch.nn.Module, components: Optional[dict[str, torch.nn.Module]] = None) -> None:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    log.info("parameters: %s trainable, %s frozen, %s total", f"{n_train:,}", f"{n_total - n_train:,}",
             f"{n_total:,}")
    for name, comp in (components or {}).items():
        t = sum(p.numel() for p in comp.parameters() if p.requires_grad)
        a = sum(p.numel() for p in comp.parameters())
        log.info("  %-14s %12s params, %12s trainable", name, f"{a:,}", f"{t:,}")


# --------------------------------------------------------------------------------------- optimiser
def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float,
                       min_lr_ratio: float, time_budget_s: Optional[float] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for `warmup_frac` of the steps, then cosine to `min_lr_ratio` x lr (per step).
    With `time_budget_s`, progress is the larger of the step count and the elapsed share of the budget (from
    this call), so a run stopped by its wall-clock budget still ends annealed."""
    total = max(1, int(total_steps))
    warm = int(total * warmup_frac)
    start = time.time()

    def factor(step: int) -> float:
        if time_budget_s:
            step = max(step, (time.time() - start) / time_budget_s * total)
        if step < warm:
            return (step + 1) / max(1, warm)
        t = min(1.0, (step - warm) / max(1, total - warm))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


_UNFUSED_STRATEGIES = ("fsdp", "deepspeed", "model_parallel")  # sharded or wrapped parameters and optimizers


def auto_fuses(devices: set[str], plain: bool, precision: str, strategy: str) -> bool:
    """optim.impl=auto's rule: torch's fused AdamW kernel when every parameter is a plain float tensor on CUDA,
    the precision has no fp16 grad scaler (Lightning cannot clip a fused optimizer's gradients under one) and
    the strategy does not shard or wrap the optimizer. On CPU auto keeps torch's default per-tensor loop: the
    fused kernel is faster there too (1.7 vs 6.2 ms per step at stage 1's 90 tensors) but rounds differently,
    and the documented CPU runs, which users reproduce exactly, were trained with the loop."""
    return (devices == {"cuda"} and plain and not precision.startswith("16")
            and not strategy.startswith(_UNFUSED_STRATEGIES))


def adamw(params: Any, lr: float, cfg: DictConfig, **kwargs: Any) -> torch.optim.AdamW:
    """torch.optim.AdamW with the kernel chosen by `optim.impl` (auto: `auto_fuses`; fused | foreach |
    for_loop force one). The update is AdamW's whichever kernel runs (tests/test_optim.py)."""
    impl = str(cfg.optim.impl)  # one of config.ADAMW_IMPLS (config._validate checks it)
    params = list(params)
    if impl == "auto":
        flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        plain = all(type(p.data) is torch.Tensor and p.dtype.is_floating_point for p in flat)
        fused = auto_fuses({p.device.type for p in flat}, plain, str(cfg.trainer.precision or ""),
                           str(cfg.trainer.strategy))
        flags = {"fused": fused or None}  # None: torch's default kernel
    else:
        flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(params, lr=lr, **flags, **kwargs)


def adamw_cosine(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, total_steps: int,
                 warmup_frac: float, min_lr_ratio: float, cfg: DictConfig) -> dict[str, Any]:
    """`configure_optimizers` return value: AdamW (`adamw`) + per-step cosine schedule."""
    params = [p for p in params if p.requires_grad]
    opt = adamw(params, lr, cfg, weight_decay=weight_decay)
    sched = cosine_with_warmup(opt, total_steps, warmup_frac, min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------------- trainer
def default_device(cfg: DictConfig) -> str:
    """"cuda" when one is available and `trainer.accelerator` allows it, else "cpu" (work done outside a Trainer)."""
    return "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"


def default_precision(cfg: DictConfig) -> str:
    if cfg.trainer.precision:
        return str(cfg.trainer.precision)
    return "bf16-mixed" if default_device(cfg) == "cuda" else "32-true"


def build_trainer(cfg: DictConfig, out: Path, monitor: Optional[str] = None, mode: str = "max",
                  callbacks: Optional[list] = None, max_steps: Optional[int] = None, subdir: str = "",
                  max_time_s: Optional[float] = None, **overrides: Any):
    """A Lightning Trainer logging to `<out>/tb`, keeping `last.ckpt` (+ best by `monitor`) in
    `<out>/<subdir>ckpt/`, stopping at `trainer.max_steps` or the wall-clock budget (`max_time_s`, default
    `trainer.max_time_s`), whichever first."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from medsight.guards import nonfinite_guard
    from medsight.resume import atomic_checkpoint_io, exact_resume

    t = cfg.trainer
    ckpt_dir = out / f"{subdir}ckpt"
    # last.ckpt: its own callback, rewritten at every validation (or, without validation, at the end of fit) and
    # every trainer.checkpoint_every_n_steps steps; Lightning 2.6's save_last=True rewrites it only when the
    # best checkpoint improves, which would resume from an old step
    every = int(t.checkpoint_every_n_steps) if t.checkpoint_every_n_steps else None
    cbs = [ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, save_last=False,
                           enable_version_counter=False, every_n_train_steps=every)]
    if monitor:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_last=False,
                                   save_top_k=1, enable_version_counter=False))
    cbs.append(exact_resume(int(cfg.seed)))  # per-step seeds, sampler positions (medsight.resume)
    cbs.append(nonfinite_guard(str(t.on_nonfinite)))  # NaN/inf loss: stop naming step + part, or skip (counted)
    budget = max_time_s if max_time_s is not None else t.max_time_s
    if budget:
        cbs.append(wall_clock_budget(float(budget)))
    cbs += callbacks or []
    progress = t.enable_progress_bar if t.enable_progress_bar is not None else sys.stderr.isatty()
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=_strategy(t.strategy, t.devices),
        precision=default_precision(cfg),
        max_epochs=t.max_epochs,
        max_steps=max_steps if max_steps is not None else t.max_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if t.val_check_interval else 1,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        fast_dev_run=t.fast_dev_run,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps,
        enable_progress_bar=progress,
        enable_model_summary=False,
        logger=TensorBoardLogger(str(out), name="tb", version=subdir.rstrip("/") or None, default_hp_metric=False),
        callbacks=cbs,
        deterministic=False,
        plugins=[atomic_checkpoint_io()],  # last.ckpt written atomically, read with weights_only
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def _strategy(name: str, devices: Any = "auto") -> Any:
    """`model_parallel`/`fsdp2`: FSDP2 over every process. Lightning's "auto" sizes put a node's devices on the
    tensor-parallel axis, which leaves the data-parallel (FSDP) mesh at size 1: nothing would be sharded."""
    if name in ("model_parallel", "fsdp2"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        if isinstance(devices, int) and devices > 0:
            return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
        log.warning("trainer.strategy=%s with devices=%r: mesh sizes left to Lightning (set trainer.devices to a "
                    "number to shard over every process)", name, devices)
        return ModelParallelStrategy()
    return name


def resume_checkpoint(cfg: DictConfig, out: Path, subdir: str = "") -> Optional[str]:
    """`resume=auto` -> `<out>/<subdir>ckpt/last.ckpt` when it exists; a path -> that file."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        last = out / f"{subdir}ckpt" / "last.ckpt"
        if last.is_file():
            log.info("resuming from %s", last)
            return str(last)
        log.warning("resume=auto: nothing to resume (no %s); starting from scratch", last)
        return None
    path = Path(cfg.resume)
    if not path.is_file():
        from medsight.config import ConfigError

        raise ConfigError(f"config key 'resume': checkpoint {path} not found (use resume=auto for this run's "
                          "last.ckpt)")
    return str(path)


def per_device_batch(global_batch: int, world_size: int, key: str = "data.batch_size") -> int:
    """The per-process batch for a configured GLOBAL batch: with `trainer.devices=N` each of the N processes
    takes global/N samples a step, so the samples seen per optimizer step (and the step budget's meaning)
    stay the same on any number of devices."""
    world_size = max(1, int(world_size))
    if global_batch % world_size:
        from medsight.config import ConfigError

        raise ConfigError(f"config key '{key}' = {global_batch} (the global batch) is not divisible by the "
                          f"{world_size} training processes")
    return global_batch // world_size


def stopped_by_time_cap(trainer: Any) -> bool:
    """Whether the wall-clock budget callback (not the step budget) ended this trainer's fit."""
    return any(getattr(cb, "stopped", False) for cb in getattr(trainer, "callbacks", []))


def wall_clock_budget(seconds: float) -> Any:
    """Callback: stop fitting after `seconds` of wall time in THIS process (a resumed run gets a fresh budget;
    Lightning's own `max_time` would restore the time already spent from the checkpoint). When it fires it
    logs a warning and sets `.stopped` (`stopped_by_time_cap` in metrics.json). Lightning is imported here so
    that importing medsight.train does not import it."""
    from lightning.pytorch.callbacks import Callback

    class WallClockBudget(Callback):
        def __init__(self) -> None:
            self.t0: Optional[float] = None
            self.stopped = False

        def on_train_start(self, trainer, pl_module) -> None:
            self.t0 = time.time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.t0 is None or trainer.should_stop:
                return
            over = time.time() - self.t0 > seconds
            # every rank stops at the same step (as Lightning's own Timer does): one rank over budget is enough
            if trainer.strategy.reduce_boolean_decision(over, all=False):
                log.warning("time cap of %.0f s reached at step %d of %s: stopping early (stopped_by_time_cap; "
                            "the result now depends on this machine's speed)", seconds, trainer.global_step,
                            trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "the epochs")
                trainer.should_stop = True
                self.stopped = True

    return WallClockBudget()


__all__ = [
    "setup_run", "seed_everything", "declare_trainable", "trainable_names", "log_param_counts",
    "cosine_with_warmup", "adamw", "adamw_cosine", "build_trainer", "resume_checkpoint", "wall_clock_budget", "log",
    "process_start_time", "run_stage", "default_device", "default_precision", "per_device_batch",
    "stopped_by_time_cap",
]
