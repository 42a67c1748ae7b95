"""Models: vision backbones, the Region Perceiver, the stage-1 set-prediction loss, and loaders for the
stage exports that later stages start from."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from medsight.models.backbones import VISION_BACKBONES, build_vision
from medsight.models.perceiver import RegionPerceiver, build_perceiver


def stage1_components(cfg: DictConfig) -> dict[str, nn.Module]:
    """The stage-1 modules `vision` and `perceiver` built from `cfg` (used by stage 1 and by inspect)."""
    vision = build_vision(cfg)
    return {"vision": vision, "perceiver": build_perceiver(cfg, vision.out_dim)}


def export_stage1_components(cfg: DictConfig, export_dir: Path | str) -> dict[str, nn.Module]:
    """`vision` and `perceiver` built for loading an export's weights into them: the encoder's architecture
    is built without reading its weights (they come from the export). A relative `vision.path` names a
    folder inside the export (an imported export keeps the encoder's config.json in `vision_config/`)."""
    from medsight.models.backbones import HFVisionEncoder, _hf_config_model

    if cfg.vision.name != "hf" or not cfg.vision.path:
        built = cfg.copy()
        if built.vision.name == "clip-vit-l14-336":
            built.vision.path = None
        return stage1_components(built)
    from transformers import AutoConfig

    path = Path(cfg.vision.path)
    if not path.is_absolute() and (Path(export_dir) / path / "config.json").is_file():
        path = Path(export_dir) / path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"vision.path '{cfg.vision.path}' of export {export_dir} has no config.json")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    config = getattr(config, "vision_config", config)  # a full CLIP/SigLIP config: its vision tower
    vision = HFVisionEncoder(_hf_config_model(config), cfg.vision.select_layer)
    return {"vision": vision, "perceiver": build_perceiver(cfg, vision.out_dim)}


def load_stage1(export_dir: Path | str, cfg: DictConfig) -> tuple[nn.Module, RegionPerceiver]:
    """(vision, perceiver) from a stage-1 export, strictly loaded, frozen and in eval mode.

    The modules are built from the export's own config (so stage-1-only structure such as
    perceiver.num_stages or pixel_ffn need not be repeated); `cfg` must agree with it on select_layer,
    perceiver dim, query count, image size and encoder name (meta.json), else ExportError. Key or shape
    mismatches raise ExportError naming them.
    """
    from medsight.export import (
        check_compatible,
        load_into,
        read_export_config,
        read_meta,
        require_export,
    )

    export_dir = require_export(export_dir, "stage1")
    check_compatible(read_meta(export_dir), cfg, export_dir)
    built = read_export_config(export_dir)
    if built.vision.name == "hf" and cfg.vision.path:
        built.vision.path = cfg.vision.path  # hf: the encoder's config.json may have moved
    comps = export_stage1_components(built, export_dir)  # architecture only: the weights come from the export
    for name, module in comps.items():
        load_into(module, export_dir, name)
        module.requires_grad_(False).eval()
    return comps["vision"], comps["perceiver"]  # type: ignore[return-value]


__all__ = [
    "VISION_BACKBONES",
    "RegionPerceiver",
    "build_perceiver",
    "build_vision",
    "export_stage1_components",
    "load_stage1",
    "stage1_components",
]
