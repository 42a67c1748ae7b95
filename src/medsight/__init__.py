"""medsight: MedSIGHT (grounded medical VLM: answers and segments from one model) in PyTorch Lightning."""

import os as _os

# On a shared or small CPU, OpenMP threads that spin while waiting slow training 3-4x; let them sleep.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def load(export_dir, device: str = "cpu"):
    """Load a final (stage-3) export for inference; see medsight.model.MedSight.answer."""
    from medsight.model import MedSight

    return MedSight.load(export_dir, device=device)


def available_backbones() -> dict[str, list[str]]:
    """Names accepted by `vision.name` and `llm.name`."""
    from medsight.models.backbones import VISION_BACKBONES
    from medsight.models.llm import LLM_BACKBONES

    return {"vision": sorted(VISION_BACKBONES), "llm": sorted(LLM_BACKBONES)}
