"""Typed configuration for every stage.

Merge order (STYLE.md): schema <- stages/configs/base.yaml <- stages/configs/<stage>.yaml <- overlay YAML
files <- command-line `key=value`. An unknown key or a wrong type fails with the key's name and the
closest valid keys. One schema serves all stages; each section documents its fields.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medsight.vocab import NUM_CLASSES, SYNTHETIC_MODALITY_GROUPS

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "stages" / "configs"
STAGES = ("stage1", "stage2", "stage3")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


# --------------------------------------------------------------------------------------------- data
@dataclass
class SyntheticConfig:
    """Parameters of the embedded synthetic dataset generator (`make data`)."""

    seed: int = 0
    image_size: int = 128  # written PNG side (BiomedParse writes 1024; the reader resizes anyway)
    cases_per_group: int = 48  # patients per modality group (10 test, 10 val at val_fraction 0.25, 28 train)
    slices_per_case: int = 6  # 2D slices per patient
    test_fraction: float = 0.2  # fraction of cases written to test/
    lesion_free_fraction: float = 0.25  # fraction of slices without any lesion
    vqa_per_image: int = 6  # VQA questions generated per image (half closed, half open)
    instruct_per_image: int = 2  # grounded dialogues per image
    mcq_per_image: int = 1  # OmniMedVQA-style questions per image


@dataclass
class DataConfig:
    """Where data comes from and how it is read (SPEC section 6)."""

    format: str = "synthetic"  # synthetic | biomedparse
    root: str = "data/synthetic"  # synthetic: dataset folder; biomedparse: folder holding meta.json
    meta: Optional[str] = None  # BiomedParse meta file; default <root>/biomedparse/meta.json
    instruct: Optional[str] = None  # folder with {train,val,test}.json grounded dialogues; default <root>/instruct
    vqa: Optional[str] = None  # folder with {train,val,test}.json LLaVA-Med VQA; default <root>/vqa
    diagseg: Optional[str] = None  # folder with {train,val,test}.json DiagSeg; default <root>/diagseg
    omnimedvqa: Optional[str] = None  # folder with <modality>.json OmniMedVQA (test only); default <root>/omnimedvqa
    # record set -> distributed layout (medsight.data.formats.FORMATS), e.g. {vqa: slake, instruct: pubmedvision};
    # the set's path (data.vqa, ...) is then that layout's PATH. Unlisted sets are read as today.
    formats: dict[str, str] = field(default_factory=dict)
    path_map: dict[str, str] = field(default_factory=dict)  # authors' absolute prefix -> local prefix
    image_size: int = 128  # model input side (336 at paper scale)
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int = 0
    val_fraction: float = 0.15  # fraction of training CASES held out for validation (split by case)
    max_masks: int = 8  # cap on masks per image for segmentation batches
    on_error: str = "raise"  # raise | skip (skips are logged and counted)
    max_pixels: int = 268435456  # largest image/volume (pixels/voxels, from its header) read; larger: DataError
    modality_groups: list[str] = field(default_factory=lambda: list(SYNTHETIC_MODALITY_GROUPS))
    cache: bool = True  # cache decoded images in memory
    cache_max_mb: float = 8192.0  # bound of that cache (least recently used out first); 211k images at 336 px: 71 GB
    augment: bool = False  # flips/intensity jitter for segmentation training
    preprocess: str = "resize"  # inference input: resize (square, bilinear, as the DataModule) | clip (the
    #                             reference's: shorter side to image_size bicubic, centre crop; masks mapped back)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


# ------------------------------------------------------------------------------------------- models
@dataclass
class VisionConfig:
    """Vision encoder (SPEC section 2). `name` picks a factory from medsight.models.backbones."""

    name: str = "tiny"  # tiny | hf (local CLIP/SigLIP dir in `path`) | clip-vit-l14-336
    path: Optional[str] = None  # local weights directory (hf / clip-vit-l14-336)
    select_layer: int = -1  # transformer block whose output gives patch features; recorded in exports
    trainable: bool = True  # False at paper scale (frozen encoder); the random tiny encoder must train
    width: int = 128  # tiny encoder width
    depth: int = 4  # tiny encoder blocks
    patch_size: int = 8  # tiny encoder stride (image_size / patch_size = feature side)
    tiny_arch: str = "conv"  # tiny encoder: conv (strided conv stem + ConvNeXt blocks) | vit (tiny CLIP ViT)


@dataclass
class PerceiverConfig:
    """Region Perceiver (SPEC section 3)."""

    dim: int = 128  # d (1024 at paper scale)
    num_queries: int = 20  # N
    num_stages: int = 1  # upsampling stages after the init block (paper: 3; tiny: 1 -> 32x32 masks, by measurement)
    heads: int = 4
    head_dim: int = 32
    ff_mult: int = 4
    num_classes: int = NUM_CLASSES  # C; the class head has C + 1 outputs ("no object")
    pixel_ffn: bool = False  # feed-forward on every pixel in the pixel->query update (paper: True; tiny: off, 1.4x faster)
    mask_threshold: float = 0.5  # attention-mask threshold on sigmoid(logit)
    adapter_impl: str = "factored"  # the stages' upsample + 3x3 conv: factored (channel mixing at the input
    #                                 resolution, ~3x cheaper fwd + bwd, measured) | direct; the same function (ours only)
    conv_layout: str = "auto"  # memory layout of the direct adapter's conv: auto (by device and map size, measured) |
    #                            nchw | channels_last; the same function either way (ours only)
    variant: str = "ours"  # ours | reference (the released model's forward: bias-free FFs with LN, uniform
    #                        attention for fully blocked queries, no input projection; needs pixel_ffn)


@dataclass
class LossConfig:
    """Stage-1 set-prediction loss (SPEC section 3). Defaults are the paper's (Mask2Former) weights."""

    preset: str = "paper"  # paper | official_code (1/1/1, no no-object term); applied by the stage
    class_weight: float = 2.0
    bce_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 0  # 0: loss at mask resolution (GT area-averaged); >0: sample this many points (Mask2Former
    #                      12544); -1: at the GT's resolution (predictions bilinearly upsampled, as the metric reads)
    foreground_points: float = 0.0  # with num_points > 0: this fraction of the points is drawn inside the GT masks
    #                                 (split evenly over an image's masks), the rest uniform
    foreground_box: float = 0.0  # 0: those points inside each mask; > 0: in its bounding box scaled by this factor
    deep_supervision: bool = False  # also apply the loss to the init block's and intermediate stages' masks


@dataclass
class CodebookConfig:
    """Modality-aware region codebook (SPEC section 4)."""

    num_groups: int = 4  # G (18 at paper scale); must equal len(data.modality_groups)
    num_codes: int = 32  # K per group
    code_dim: int = 64  # D
    beta: float = 0.25  # commitment weight
    codebook_weight: float = 1.0
    recon_weight: float = 1.0
    mask_weight: float = 1.0
    modality_weight: float = 1.0
    ema: bool = False  # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    reseed_dead: bool = True  # re-seed codes unused since the last check from recent z of their group
    reseed_every: int = 50  # steps between dead-code checks
    standardize: bool = True  # standardise region queries per channel (training-set statistics) before W_q
    init_from_data: bool = True  # k-means++ (+ a few k-means steps) codebooks from the training queries' initial z
    init_balance: float = 0.0  # > 0: those k-means steps assign with equal mass per code (Sinkhorn at this temperature)
    query_batch: int = 1024  # cached matched queries per step for the cheap losses (recon, codebook, modality)
    region_store_mb: float = 8192.0  # stage 2's per-image feats + masks in memory; beyond it on disk (spill/)
    mask_every: int = 2  # decode masks for the mask loss every this many steps (the one expensive part of a step)
    warmup_steps: int = 100  # first steps: only W_m and the modality head learn, on the initial codes, no decode
    quantize_all: bool = False  # cheap losses on all N final queries of each image, not only the GT-matched ones
    encoder_lr_scale: float = 0.1  # lr of W_q and the codebooks relative to optim.lr (fast W_q moves collapse z)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class LLMConfig:
    """Language model (SPEC section 2/5). `name` picks a factory from medsight.models.llm."""

    name: str = "tiny"  # tiny | hf (local causal-LM dir in `path`) | qwen3-8b
    path: Optional[str] = None
    trust_remote_code: bool = False
    hidden_size: int = 192  # tiny only
    num_layers: int = 3  # tiny only
    num_heads: int = 4  # tiny only
    num_kv_heads: int = 2  # tiny only
    intermediate_size: int = 512  # tiny only
    vocab_size: int = 512  # tiny tokenizer's BPE vocabulary size (before code tokens)
    max_length: int = 256  # text tokens per sample (the image adds patch + region tokens)
    tie_word_embeddings: bool = False  # tiny only (Qwen3-8B has an untied lm_head)
    separate_projectors: bool = False  # separate v->t projectors for patch and region tokens
    patch_pool: Optional[int] = None  # average-pool the patch grid by this factor before the v->t projector;
    #                                   None: 8 for the tiny LLM (CPU budget), 1 otherwise (the paper: all 576)
    patch_pool_mode: str = "avg"  # avg | max
    system_prompt: Optional[str] = "You are a medical assistant."  # system turn text; null/"": no system turn
    attention_dropout: float = 0.0  # dropout on attention weights while training (any Qwen/Llama-family LLM)
    image_dropout: float = 0.0  # dropout on the projected image tokens while training (regularises small data)
    gradient_checkpointing: bool = False
    mask_loss_weight: float = 1.0
    generation_prompt: bool = True  # end the prompt with "<|im_start|>assistant\n"; false: the reference's
    #                                 format (the model writes it itself; stripped from the answer)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class PhaseConfig:
    """One stage-3 phase (align / ground / instruct)."""

    lr: float = 1e-3
    max_steps: int = 300  # used when max_epochs is null
    max_epochs: Optional[int] = None  # train this many passes over the phase's data instead (the paper's recipe)
    max_time_s: Optional[float] = None  # stop the phase after this many seconds (CPU budgets)


@dataclass
class Stage3Config:
    phases: list[str] = field(default_factory=lambda: ["align", "ground", "instruct"])
    align: PhaseConfig = field(default_factory=lambda: PhaseConfig(lr=1e-3, max_steps=100))
    ground: PhaseConfig = field(default_factory=lambda: PhaseConfig(lr=5e-3, max_steps=100))
    instruct: PhaseConfig = field(default_factory=lambda: PhaseConfig(lr=1e-3, max_steps=400))
    max_new_tokens: int = 48  # greedy decoding budget per answer
    repeat: dict[str, int] = field(default_factory=dict)  # training records of a source seen this many times per
    #                                                       epoch of a phase (the mix), e.g. {diagseg: 2}
    init_from_joint: Optional[str] = None  # a stage-3 (joint) export to fine-tune, e.g. `medsight import official`'s;
    #                                        its weights replace the stage-1/2 start, `phases` picks what trains
    do_sample: bool = False  # greedy by default; true: the reference's sampling (temperature, repetition_penalty)
    temperature: float = 0.2  # the reference's chatbot value (used only with do_sample)
    repetition_penalty: float = 1.2  # the reference's chatbot value (used only with do_sample)
    val_batches: Optional[int] = 2  # eval batches per split after each phase (None: the whole val split)
    test_batches: Optional[int] = None  # eval batches per split for the final test metrics (None: all)
    feature_cache_mb: float = 4096.0  # bound of the frozen per-image features kept in memory (LRU out first)


# --------------------------------------------------------------------------------------- training
ADAMW_IMPLS = ("auto", "fused", "foreach", "for_loop")  # optim.impl (medsight.train.adamw)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.03
    min_lr_ratio: float = 0.01  # cosine ends at lr * min_lr_ratio
    # AdamW kernel: auto = torch's fused one on CUDA where it applies (no fp16 grad scaler, no FSDP/DeepSpeed/
    # model-parallel sharding), else torch's default (on CPU the per-tensor loop); fused | foreach | for_loop force one
    impl: str = "auto"  # one of ADAMW_IMPLS


@dataclass
class TrainerConfig:
    """Passed to lightning.Trainer (only these keys)."""

    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | deepspeed_stage_2 | fsdp | model_parallel
    precision: Optional[str] = None  # None: 32 on CPU, bf16-mixed on GPU
    max_epochs: int = -1
    max_steps: int = 1000
    max_time_s: Optional[float] = None  # wall-clock budget for fit(); checked by a callback
    checkpoint_every_n_steps: Optional[int] = None  # also write ckpt/last.ckpt every this many steps (resume)
    on_nonfinite: str = "stop"  # stop | skip: a non-finite loss stops the stage, or its batch is skipped and counted
    val_check_interval: Optional[int] = None  # in steps; None: once at the end of each epoch
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    fast_dev_run: bool = False
    limit_val_batches: Optional[float] = None
    num_sanity_val_steps: int = 0
    enable_progress_bar: Optional[bool] = None  # None: only when stderr is a terminal


@dataclass
class Config:
    stage: str = "stage1"
    run_name: str = "default"
    out_root: str = "checkpoints"  # run directory = <out_root>/<run_name>/<stage>
    seed: int = 0
    resume: Optional[str] = None  # "auto" (last.ckpt of this run) or a .ckpt path
    init_from: Optional[str] = None  # previous stage's export dir; default <out_root>/<run_name>/stage{N-1}/export
    data: DataConfig = field(default_factory=DataConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ------------------------------------------------------------------------------------------ loading
def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                keys.extend(_valid_keys(child, full + "."))
    return keys


#: Config keys whose values are free-form {str: str} maps (their keys are data, not schema).
FREE_FORM_KEYS = ("data.formats.", "data.path_map.", "stage3.repeat.")


def _check_keys(schema: DictConfig, update: Any, source: str, prefix: str = "") -> None:
    """Reject keys of `update` that the schema lacks, naming the closest valid ones."""
    if not isinstance(update, (DictConfig, dict)) or prefix in FREE_FORM_KEYS:
        return
    for k in update.keys():
        full = f"{prefix}{k}"
        if k not in schema:
            siblings = [f"{prefix}{s}" for s in schema.keys()]
            close = difflib.get_close_matches(full, list(dict.fromkeys(siblings + _valid_keys(schema, prefix))), n=3,
                                              cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys here: {', '.join(siblings)}"
            raise ConfigError(f"unknown config key '{full}' (from {source}){hint}")
        child = schema._get_node(k)
        if isinstance(child, DictConfig):
            _check_keys(child, update[k], source, full + ".")


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    _check_keys(base, update, source)
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"bad value for config key '{key}' (from {source}): {msg}") from None


def load_config(
    stage: str,
    overlays: Optional[list[str]] = None,
    overrides: Optional[list[str]] = None,
    config_dir: Path | str = CONFIG_DIR,
) -> DictConfig:
    """Build the resolved config of `stage` (schema <- base <- stage <- overlays <- key=value)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; choose from {list(STAGES)}")
    config_dir = Path(config_dir)
    cfg = OmegaConf.structured(Config)
    for path in [config_dir / "base.yaml", config_dir / f"{stage}.yaml", *[Path(p) for p in overlays or []]]:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            update = OmegaConf.load(path)
        except Exception as e:  # yaml errors
            raise ConfigError(f"cannot parse config file {path}: {e}") from None
        cfg = _merge(cfg, update, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' is not of the form key=value")
        try:
            update = OmegaConf.from_dotlist([item])
        except Exception as e:
            raise ConfigError(f"cannot parse override '{item}': {e}") from None
        cfg = _merge(cfg, update, f"command line '{item}'")
    cfg.stage = stage
    _validate(cfg)
    return cfg


def _validate(cfg: DictConfig) -> None:
    choices = {
        "data.format": ("synthetic", "biomedparse"),
        "data.on_error": ("raise", "skip"),
        "loss.preset": ("paper", "official_code"),
        "perceiver.variant": ("ours", "reference"),
        "data.preprocess": ("resize", "clip"),
        "optim.impl": ADAMW_IMPLS,
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is '{value}'; choose from {list(allowed)}")
    for phase in cfg.stage3.phases:
        if phase not in ("align", "ground", "instruct"):
            raise ConfigError(f"config key 'stage3.phases' has unknown phase '{phase}'; choose from align, ground, instruct")
    if cfg.codebook.num_groups != len(cfg.data.modality_groups):
        raise ConfigError(
            f"config key 'codebook.num_groups' is {cfg.codebook.num_groups} but 'data.modality_groups' "
            f"lists {len(cfg.data.modality_groups)} groups; they must match"
        )


def parse_cli(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split stage arguments into overlay YAML paths and key=value overrides."""
    overlays, overrides = [], []
    for a in argv:
        if "=" in a:
            overrides.append(a)
        elif a.endswith((".yaml", ".yml")):
            overlays.append(a)
        else:
            raise ConfigError(f"argument '{a}' is neither an overlay .yaml file nor a key=value override")
    return overlays, overrides


def run_dir(cfg: DictConfig, stage: Optional[str] = None) -> Path:
    """`<out_root>/<run_name>/<stage>`."""
    return Path(cfg.out_root) / cfg.run_name / (stage or cfg.stage)


def previous_export(cfg: DictConfig, stage: str) -> Path:
    """Export directory that `cfg.stage` starts from (cfg.init_from, else the default location)."""
    if cfg.init_from:
        return Path(cfg.init_from)
    return run_dir(cfg, stage) / "export"


def save_config(cfg: DictConfig, path: Path | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(d: dict) -> DictConfig:
    """Rebuild a typed config from a plain dict (e.g. an export's config.yaml), rejecting unknown keys."""
    base = OmegaConf.structured(Config)
    return _merge(base, OmegaConf.create(d), "saved config")


def offline_env() -> None:
    """Never reach the hub: nothing can be downloaded at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


__all__ = [
    "Config", "ConfigError", "load_config", "parse_cli", "run_dir", "previous_export", "save_config",
    "to_dict", "from_dict", "offline_env", "ListConfig",
]
