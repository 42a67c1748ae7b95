"""Exports describe themselves: a stage takes the architecture from the export it starts from.

Stage 2 takes `vision.*`, `perceiver.*` and the input (`data.image_size`, `data.mean`, `data.std`) from the
stage-1 export; stage 3 takes those and `codebook.*` with `data.modality_groups` from the stage-2 export
(or from the joint export it fine-tunes, `stage3.init_from_joint`). So `python -m stages.stage1
vision.name=hf vision.path=X data.image_size=224` is followed by `make stage2 stage3` without repeating
anything. A value given explicitly (on the command line or in an overlay file) that contradicts the export
fails, naming both values; an explicit value equal to the export's is fine (e.g. the same overlay passed to
every stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from medsight.config import ConfigError

#: stage -> the sections it inherits from the export it starts from
INHERITED: dict[str, tuple[str, ...]] = {
    "stage2": ("vision", "perceiver", "data.image_size", "data.mean", "data.std"),
    "stage3": ("vision", "perceiver", "codebook", "data.image_size", "data.mean", "data.std",
               "data.modality_groups"),
}
#: fine-tuning a joint export (`stage3.init_from_joint`) also keeps its LLM and its input/chat format
JOINT_INHERITED = (*INHERITED["stage3"], "data.preprocess", "llm.name", "llm.path", "llm.trust_remote_code",
                   "llm.separate_projectors", "llm.patch_pool", "llm.patch_pool_mode", "llm.system_prompt",
                   "llm.generation_prompt", "llm.max_length", "llm.hidden_size", "llm.num_layers", "llm.num_heads",
                   "llm.num_kv_heads", "llm.intermediate_size", "llm.vocab_size", "llm.tie_word_embeddings")


def _leaves(node: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    if isinstance(node, (DictConfig, dict)):
        for k in node.keys():
            yield from _leaves(node[k], f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, node


def explicit_keys(overlays: Iterable[str], overrides: Iterable[str]) -> dict[str, str]:
    """{dotted key: where it was given} for every leaf set by an overlay file or a `key=value` override."""
    out: dict[str, str] = {}
    for path in overlays:
        for key, _ in _leaves(OmegaConf.load(path), ""):
            out[key] = f"overlay {path}"
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        for sub, _ in _leaves(OmegaConf.from_dotlist([item]), ""):
            out[sub] = f"command line '{item}'"
        out.setdefault(key, f"command line '{item}'")
    return out


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def inherit_from_export(cfg: DictConfig, export_dir: Path | str, explicit: dict[str, str],
                        sections: Optional[Iterable[str]] = None) -> list[str]:
    """Copy the architecture `sections` of the export's config into `cfg` (in place); returns the keys that
    changed. An explicit value that differs from the export's raises ConfigError naming both."""
    from medsight.export import read_export_config

    export_cfg = read_export_config(export_dir)
    changed, conflicts = [], []
    for section in sections or INHERITED.get(cfg.stage, ()):
        theirs = OmegaConf.select(export_cfg, section)
        leaves = _leaves(theirs, section) if isinstance(theirs, DictConfig) else [(section, theirs)]
        for key, value in leaves:
            ours = OmegaConf.select(cfg, key)
            if _plain(ours) == _plain(value):
                continue
            source = explicit.get(key) or next((s for k, s in explicit.items() if key.startswith(k + ".")), None)
            if source is not None:
                conflicts.append(f"{key}: export {_plain(value)!r} vs {source} {_plain(ours)!r}")
                continue
            OmegaConf.update(cfg, key, _plain(value), merge=False)
            changed.append(key)
    if conflicts:
        raise ConfigError(f"the export {export_dir} this stage starts from was made with other values: "
                          + "; ".join(conflicts) + " (leave them out: later stages take them from the export)")
    return changed


__all__ = ["INHERITED", "JOINT_INHERITED", "explicit_keys", "inherit_for_stage", "inherit_from_export"]


def inherit_for_stage(cfg: DictConfig, overlays: Iterable[str], overrides: Iterable[str]) -> list[str]:
    """Inherit the architecture of the export `cfg.stage` starts from (when it exists; a missing export is
    reported by the stage itself: "run make stageN first"). Returns the keys taken from it."""
    import logging

    from medsight.config import previous_export

    if cfg.stage not in INHERITED:
        return []
    source = previous_export(cfg, {"stage2": "stage1", "stage3": "stage2"}[cfg.stage])
    joint = cfg.stage3.get("init_from_joint") if cfg.stage == "stage3" else None
    if joint:
        source = Path(joint)
    if not (Path(source) / "config.yaml").is_file():
        return []
    changed = inherit_from_export(cfg, source, explicit_keys(overlays, overrides),
                                  JOINT_INHERITED if joint else None)
    if changed:
        logging.getLogger("medsight").info("%s: took %s from the export %s", cfg.stage, ", ".join(changed), source)
    return changed
