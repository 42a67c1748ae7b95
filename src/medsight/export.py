"""Stage hand-off through export directories (STYLE.md point 3).

An export directory holds:
- `<component>.safetensors` per component (e.g. `vision`, `perceiver`, `codebook`, `llm`),
- `config.yaml`: the resolved config of the stage that wrote it,
- `meta.json`: stage, dims, select_layer, class and modality lists, git sha, component list, extras,
- `manifest.json`: every other file with its size and sha256 (medsight.manifest), written last.
The folder is built in a hidden staging folder and swapped into place complete (medsight.manifest), so the
previous export stays loadable until the new one is whole. Loading verifies each file against the manifest
(a flipped byte, a truncation or a missing file is refused, naming the file) and is strict: a missing or
unexpected key, or a shape mismatch, is an error that names it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medsight.atomic import write_text
from medsight.config import REPO_ROOT, from_dict, save_config, to_dict
from medsight.manifest import StagedDir, recover, staged_dir, verify_file
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
    extra_files: Optional[Callable[[Path], None]] = None,
    in_place: bool = False,
) -> Path:
    """Write each component's state dict to `<name>.safetensors` (hashed while streamed to disk), config.yaml,
    meta.json, whatever `extra_files(folder)` writes into the folder, and the manifest; then swap the folder
    into place (medsight.manifest.staged_dir). `in_place=True` (a writer that adds its own files to a new
    folder, e.g. the official import): write straight into `export_dir`, no manifest; the caller finishes
    with `medsight.manifest.write_manifest(export_dir)` once every file is there."""
    export_dir = Path(export_dir)
    with (_in_place(export_dir) if in_place else staged_dir(export_dir)) as out:
        for name, comp in components.items():
            state = comp.state_dict() if isinstance(comp, torch.nn.Module) else comp
            out.write_safetensors(f"{name}.safetensors", {k: v.detach() for k, v in state.items()})
        save_config(cfg, out.path / "config.yaml")
        if extra_files is not None:
            extra_files(out.path)
        out.write_text("meta.json", json.dumps(_meta(cfg, components, extra_meta), indent=2))
    return export_dir


@contextlib.contextmanager
def _in_place(export_dir: Path) -> Iterator[StagedDir]:
    export_dir.mkdir(parents=True, exist_ok=True)
    yield StagedDir(export_dir)


def _meta(cfg: DictConfig, components: dict[str, Any], extra_meta: Optional[dict[str, Any]]) -> dict[str, Any]:
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
        "perceiver_variant": cfg.perceiver.variant,
        "classes": {str(k): v for k, v in CLASSES.items()},
        "modality_groups": list(cfg.data.modality_groups),
    }
    meta.update(extra_meta or {})
    return meta


def read_meta(export_dir: Path | str) -> dict[str, Any]:
    recover(Path(export_dir))
    path = Path(export_dir) / "meta.json"
    if not path.is_file():
        raise ExportError(f"no export at {export_dir} (missing {path.name})")
    verify_file(export_dir, "meta.json")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None


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


def read_export_config(export_dir: Path | str) -> DictConfig:
    path = Path(export_dir) / "config.yaml"
    if not path.is_file():
        raise ExportError(f"export {export_dir} has no config.yaml")
    verify_file(export_dir, "config.yaml")
    return from_dict(OmegaConf.to_container(OmegaConf.load(path)))  # type: ignore[arg-type]


def load_component(export_dir: Path | str, name: str) -> dict[str, torch.Tensor]:
    """The tensors of component `name`: `<name>.safetensors`, or the shards listed in
    `<name>.safetensors.index.json` (big components; see save_component_shards); every file is checked
    against the export's manifest first."""
    path = Path(export_dir) / f"{name}.safetensors"
    index = Path(export_dir) / f"{name}.safetensors.index.json"
    if not path.is_file() and index.is_file():
        verify_file(export_dir, index.name)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if not (Path(export_dir) / shard).is_file():
                raise ExportError(f"export {export_dir}: shard {shard} of component '{name}' is missing")
            verify_file(export_dir, shard)
            state.update(load_file(str(Path(export_dir) / shard)))
        return state
    if not path.is_file():
        raise ExportError(f"export {export_dir} has no component '{name}' ({path.name} missing)")
    verify_file(export_dir, path.name)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:  # an export without a manifest, damaged
        raise ExportError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())[:160]})") from None


def save_component_shards(export_dir: Path | str, name: str, shards: Iterable[dict[str, torch.Tensor]],
                          count: int) -> Path:
    """Write a big component as `<name>-0000i-of-0000n.safetensors` (n = `count`) + `<name>.safetensors.index.json`,
    one shard at a time (`shards` may be a generator: one shard in memory); tensors keep their dtype."""
    export_dir = Path(export_dir)
    weight_map: dict[str, str] = {}
    n = count
    for i, shard in enumerate(shards, 1):
        fname = f"{name}-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(export_dir / fname))
        weight_map.update({k: fname for k in shard})
    index = export_dir / f"{name}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return index


def load_into(module: torch.nn.Module, export_dir: Path | str, name: str) -> None:
    """Strictly load component `name` of an export into `module`; errors list every mismatch."""
    state = load_component(export_dir, name)
    check_fits(module, state, export_dir, name)
    module.load_state_dict(state, strict=True)


def check_fits(module: torch.nn.Module, state: dict[str, torch.Tensor], export_dir: Path | str, name: str) -> None:
    """ExportError listing every missing / unexpected key and shape mismatch of `state` against `module`
    (which may live on the meta device)."""
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
    recover(export_dir)
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

    write_text(path, json.dumps(clean(metrics), indent=2, sort_keys=True))  # atomically (medsight.atomic)
    return path


__all__ = [
    "ExportError", "save_export", "read_meta", "read_export_config", "load_component", "load_into",
    "save_component_shards", "check_fits", "lineage",
    "check_compatible", "require_export", "write_metrics", "to_dict",
]
