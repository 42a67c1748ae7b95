"""What trains in stage 3 (SPEC section 5): PHASES, the one declaration of each phase's trainable set;
`set_phase` applies it to a MedSightLM (code-token rows train through a gradient row mask), `apply_lora` wraps
the LLM with LoRA adapters for the instruct phase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from medsight.models.joint import MedSightLM


#: The one place each phase's trainable set is declared (SPEC section 5). `rows`: the code tokens' rows of
#: the input embedding (and of an untied lm_head) train through a gradient row mask, the rest of those
#: matrices stays frozen. `lora`: the instruct phase with llm.lora.enabled.
PHASES: dict[str, dict[str, Any]] = {
    "align": {"modules": ["projector_v2t"], "rows": False},
    "ground": {"modules": ["projector_t2v"], "rows": True},
    "instruct": {"modules": ["llm", "projector_v2t", "projector_t2v"], "rows": False},
    "instruct+lora": {"modules": ["projector_v2t", "projector_t2v"], "rows": True, "lora": True, "lm_head": True},
}


def apply_lora(model: MedSightLM, r: int, alpha: int, dropout: float, target_modules: list[str]) -> None:
    """Wrap the LLM with peft LoRA adapters (instruct phase with llm.lora.enabled)."""
    from peft import LoraConfig, get_peft_model

    if hasattr(model.llm, "get_base_model"):
        return
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, cfg)


def set_phase(model: MedSightLM, phase: str) -> dict[str, int]:
    """Freeze everything, then unfreeze what `phase` trains (PHASES); returns parameter counts with
    `code_rows` = the number of trainable code-token rows' entries."""
    from medsight.train import declare_trainable

    spec = PHASES[phase]
    for h in model._row_hooks:
        h.remove()
    model._row_hooks, model._row_params = [], []
    counts = declare_trainable(model, spec["modules"])
    lm = model.causal_lm()
    emb, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    tied = emb.data_ptr() == head.data_ptr()
    if spec.get("lora"):
        for n, p in model.llm.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    if spec.get("lm_head") and not tied:
        head.requires_grad_(True)
    rows = 0
    if spec["rows"]:
        keep = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
        keep[model.code_ids] = 1
        masked = [emb] + ([head] if not tied and not spec.get("lm_head") else [])
        for w in masked:
            w.requires_grad_(True)
            model._row_hooks.append(w.register_hook(lambda g, keep=keep: g * _like(keep, g)))
            model._row_params.append(w)
            rows += len(model.code_ids) * w.shape[1]
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts["frozen"] = counts["total"] - counts["trainable"]
    counts["code_rows"] = rows
    return counts


def _like(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The row mask in the gradient's dtype and, for a sharded (FSDP2 DTensor) gradient, its placement."""
    mask = mask.to(device=grad.device, dtype=grad.dtype)
    if hasattr(grad, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(mask, grad.device_mesh, grad.placements)
    return mask


def row_masked_params(model: MedSightLM) -> list[nn.Parameter]:
    """Parameters trained through a row mask (they get no weight decay: decay would move the frozen rows)."""
    return list(model._row_params)


__all__ = [
    "PHASES",
    "apply_lora",
    "row_masked_params",
    "set_phase",
]
