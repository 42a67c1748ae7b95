"""Parameter counts of a stage's components without weights or memory: modules are built on the `meta`
device, so paper scale (ViT-L, a 1024-wide perceiver, an 8B LLM) takes seconds.

    python -m medsight.inspect <stage> [overlay.yaml ...] [key=value ...]
    -> {"vision": 303507456, "perceiver": 102893586}  (one JSON object: component -> parameter count)

Adding a stage's components (stage 2/3 owners): write a function `components(cfg) -> dict[str, nn.Module
| int]` (ints are reported as they are, e.g. a number of code tokens) in your own module, and register it
with one line in COMPONENT_BUILDERS below as "module:function". A stage without an entry falls back to
`stages.<stage>:components` when that function exists.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable

import torch
from omegaconf import DictConfig

#: stage -> "module:function" building {component name: module or count} from a config.
COMPONENT_BUILDERS: dict[str, str] = {
    "stage1": "medsight.models:stage1_components",
}


def _builder(stage: str) -> Callable[[DictConfig], dict]:
    target = COMPONENT_BUILDERS.get(stage, f"stages.{stage}:components")
    module, _, func = target.partition(":")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError):
        raise ValueError(f"no component builder for '{stage}' ({target}); registered: {sorted(COMPONENT_BUILDERS)}") from None


def count_params(module: torch.nn.Module) -> int:
    """Parameters of a module, each shared tensor counted once."""
    return sum(p.numel() for p in dict(module.named_parameters(remove_duplicate=True)).values())


def component_sizes(cfg: DictConfig, device: str = "meta") -> dict[str, int]:
    """{component: parameter count} for `cfg.stage`, built on `device` (meta: no memory, no weights)."""
    from medsight.config import offline_env

    offline_env()
    build = _builder(cfg.stage)
    with torch.device(device):
        comps = build(cfg)
    return {k: (v if isinstance(v, int) else count_params(v)) for k, v in comps.items()}


def main(argv: list[str] | None = None) -> None:
    from medsight.config import load_config, parse_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m medsight.inspect <stage> [overlay.yaml ...] [key=value ...]")
    overlays, overrides = parse_cli(argv[1:])
    cfg = load_config(argv[0], overlays, overrides)
    sys.stdout.write(json.dumps(component_sizes(cfg)) + "\n")


if __name__ == "__main__":
    main()
