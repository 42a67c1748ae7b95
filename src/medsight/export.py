"""Stage hand-off through export directories (STYLE.md point 3).

An export directory holds:
- `<component>.safetensors` per component (e.g. `vision`, `perceiver`, `codebook`, `llm`),
- `config.yaml`: the resolved config of the stage that wrote it,
- `meta.json`: stage, dims, select_layer, class and modality lists, git sha, component list, extras.
The next stage loads it strictly: a missing or unexpected key, or a shape mismatch, is an error that names it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from medsight.config import REPO_ROOT, from_dict, save_config, to_dict
from medsight.vocab import CLASSES


class ExportError(RuntimeError):
    """An export directory is missing, incomplete or does not fit the model it is loaded into."""


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def save_export(
    export_dir: Path | str,
    cfg: DictConfig,
    components: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    extra_meta: Optional[dict[str, Any]] = None,
) -> Path:
    """Write each component's state dict to `<name>.safetensors`, plus config.yaml and meta.json."""
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    for name, comp in components.items():
        state = comp.state_dict() if isinstance(comp, torch.nn.Module) else comp
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        # safetensors refuses shared storage: clone every tensor
        save_file({k: v.clone() for k, v in state.items()}, str(export_dir / f"{name}.safetensors"))
    save_config(cfg, export_dir / "config.yaml")
    meta = {
        "stage": cfg.stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git_sha": git_sha(),
        "components": sorted(components),
        "select_layer": cfg.vision.select_layer,
        "vision": cfg.vision.name,
        "image_size": cfg.data.image_size,
        "perceiver_dim": cfg.perceiver.dim,
        "num_queries": cfg.perceiver.num_queries,
        "classes": {str(k): v for k, v in CLASSES.items()},
        "modality_groups": list(cfg.data.modality_groups),
    }
    meta.update(extra_meta or {})
    (export_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return export_dir


def read_meta(export_dir: Path | str) -> dict[str, Any]:
    path = Path(export_dir) / "meta.json"
    if not path.is_file():
        raise ExportError(f"no export at {export_dir} (missing {path.name})")
    return json.loads(path.read_text())


def lineage(*export_dirs: Path | str) -> list[dict[str, Any]]:
    """The stage lineage of exports made from `export_dirs`: each input's own lineage (meta "lineage"), then
    one entry for it {"stage", "path", "created", "git_sha", "data"}, earlier stages first, without repeats."""
    entries: list[dict[str, Any]] = []
    for d in export_dirs:
        meta = read_meta(d)
        cfg_path = Path(d) / "config.yaml"
        data = OmegaConf.to_container(OmegaConf.load(cfg_path).get("data", {})) if cfg_path.is_file() else {}
        own = {"stage": meta.get("stage"), "path": str(d), "created": meta.get("created"),
               "git_sha": meta.get("git_sha"),
               "data": {k: data.get(k) for k in ("format", "root", "modality_groups") if k in data}}
        for e in [*meta.get("lineage", []), own]:
            if e not in entries:
                entries.append(e)
    return entries


def update_meta(export_dir: Path | str, **fields: Any) -> dict[str, Any]:
    """Add or replace top-level fields of an export's meta.json; returns the new meta."""
    meta = read_meta(export_dir)
    meta.update(fields)
    (Path(export_dir) / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def read_export_config(export_dir: Path | str) -> DictConfig:
    path = Path(export_dir) / "config.yaml"
    if not path.is_file():
        raise ExportError(f"export {export_dir} has no config.yaml")
    return from_dict(OmegaConf.to_container(OmegaConf.load(path)))  # type: ignore[arg-type]


def load_component(export_dir: Path | str, name: str) -> dict[str, torch.Tensor]:
    path = Path(export_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise ExportError(f"export {export_dir} has no component '{name}' ({path.name} missing)")
    return load_file(str(path))


def load_into(module: torch.nn.Module, export_dir: Path | str, name: str) -> None:
    """Strictly load component `name` of an export into `module`; errors list every mismatch."""
    state = load_component(export_dir, name)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = [
        f"{k}: export {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shape:
            parts.append(f"shape mismatches {shape[:8]}{' ...' if len(shape) > 8 else ''}")
        raise ExportError(
            f"component '{name}' of export {export_dir} does not fit the configured model: " + "; ".join(parts)
            + " (do the stage configs match the config the export was written with?)"
        )
    module.load_state_dict(state, strict=True)


def check_compatible(meta: dict[str, Any], cfg: DictConfig, export_dir: Path | str) -> None:
    """The values every stage must share with its predecessor (SPEC section 9: one select_layer)."""
    pairs = {
        "select_layer": cfg.vision.select_layer,
        "perceiver_dim": cfg.perceiver.dim,
        "num_queries": cfg.perceiver.num_queries,
        "image_size": cfg.data.image_size,
        "vision": cfg.vision.name,
    }
    bad = [f"{k}: export {meta.get(k)!r} vs config {v!r}" for k, v in pairs.items() if k in meta and meta[k] != v]
    if bad:
        raise ExportError(f"export {export_dir} was made with a different config: " + "; ".join(bad))


def require_export(export_dir: Path | str, make_target: str) -> Path:
    """Fail with "run make <target> first" when the previous stage's export is missing."""
    export_dir = Path(export_dir)
    if not (export_dir / "meta.json").is_file():
        raise ExportError(f"no export found at {export_dir}: run make {make_target} first")
    return export_dir


def write_metrics(run_dir: Path | str, metrics: dict[str, Any]) -> Path:
    """Write `metrics.json` into the run directory (floats rounded for reading, not for scoring)."""
    path = Path(run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
        if isinstance(v, float):
            return round(v, 6)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(metrics), indent=2, sort_keys=True))
    return path


__all__ = [
    "ExportError", "save_export", "read_meta", "read_export_config", "load_component", "load_into",
    "check_compatible", "require_export", "write_metrics", "to_dict", "lineage", "update_meta",
]
