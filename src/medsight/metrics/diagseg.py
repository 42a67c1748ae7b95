"""Scoring for DiagSeg (diagnose, then segment what you diagnosed), SPEC section 7.

An item has a short diagnosis (`short_answer`), GT masks (`masks: [[id, path]]`) and `mask_ids`, the
targets in answer order (a nested entry is the union of several masks). The model's answer text is
scored by *diagnosis recall* (open recall of the short answer, strict normalisation) and its emitted
masks by Dice:

* a predicted mask given as logits is upsampled bilinearly to the GT size and thresholded at logit > 0;
  a binary mask of another size is resized with nearest neighbour;
* Dice = (2|P & G| + eps) / (|P| + |G| + eps), emitted mask i against target i; when the item has a
  single target every emitted mask is compared with it, and masks beyond the last of several targets are
  compared with the union of all targets;
* item score = mean Dice over its emitted masks; an item where no mask was emitted scores 0 and is
  counted in `n_no_mask`;
* items without any GT mask (no finding) count for diagnosis recall only (`n_no_target`);
* reported per modality, as a macro mean (of the per-modality means) and a micro mean (over items):
  the paper's 69.9 average is not the macro mean of its own per-modality values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsight.metrics.vqa import open_score_strict

DICE_EPS = 1e-6


def dice(pred: np.ndarray, gt: np.ndarray, eps: float = DICE_EPS) -> float:
    """Dice of two boolean masks of the same shape (two empty masks score 1)."""
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, ground truth {gt.shape}")
    pred, gt = pred.astype(bool), gt.astype(bool)
    inter = np.logical_and(pred, gt).sum()
    return float((2.0 * inter + eps) / (pred.sum() + gt.sum() + eps))


def to_binary(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A predicted mask at the GT size (H, W): float arrays are logits (bilinear, > 0), others binary."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    if np.issubdtype(mask.dtype, np.floating):
        logits = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, h, w)
        if tuple(mask.shape) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return (logits[0, 0] > 0).numpy()
    binary = mask > 0
    if tuple(mask.shape) != tuple(size):
        t = torch.from_numpy(binary.astype(np.uint8))[None, None].float()
        binary = F.interpolate(t, size=size, mode="nearest")[0, 0].numpy() > 0.5
    return binary


def read_mask_file(path: str | Path) -> np.ndarray:
    """A mask from disk: PNG/JPEG (binary, > half range) or .npy (logits if float, else binary)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    if path.suffix.lower() == ".npy":
        array = np.load(path)
        return array[0] if array.ndim == 3 and array.shape[0] == 1 else array
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("L"))
    return array > 127


def target_masks(mask_ids: Sequence, masks: dict[str, np.ndarray]) -> list[np.ndarray]:
    """GT targets in answer order; a nested id list is the union of its masks."""
    targets = []
    for entry in mask_ids:
        ids = entry if isinstance(entry, (list, tuple)) else [entry]
        missing = [i for i in ids if str(i) not in masks]
        if missing:
            raise ValueError(f"mask id(s) {missing} are listed in mask_ids but not in masks")
        targets.append(np.logical_or.reduce([masks[str(i)].astype(bool) for i in ids]))
    return targets


def item_dice(emitted: Sequence[np.ndarray], targets: Sequence[np.ndarray], eps: float = DICE_EPS) -> float | None:
    """Mean Dice over the emitted masks (already at GT size), or None when none was emitted."""
    if not emitted:
        return None
    if not targets:
        raise ValueError("an item without ground-truth masks cannot be scored for Dice")
    union = np.logical_or.reduce([t.astype(bool) for t in targets])
    scores = []
    for i, mask in enumerate(emitted):
        target = targets[0] if len(targets) == 1 else (targets[i] if i < len(targets) else union)
        scores.append(dice(mask, target, eps))
    return float(np.mean(scores))


@dataclass
class DiagSegRecord:
    """One scored item: its modality, diagnosis recall in [0, 1], and Dice (None: no mask emitted).
    `has_target` False: the item has no GT mask (no finding) and counts for diagnosis recall only."""

    modality: str
    recall: float
    dice: float | None
    has_target: bool = True


def diagnosis_recall(prediction: str, short_answer: str) -> float:
    """Open recall of the short diagnosis in the answer text (strict normalisation, in [0, 1])."""
    return open_score_strict(prediction, short_answer).recall


@dataclass
class DiagSegScores:
    diagnosis_recall: float
    dice_macro: float
    dice_micro: float
    n: int
    n_no_mask: int
    n_no_target: int = 0
    per_modality: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def score_diagseg(records: Iterable[DiagSegRecord]) -> DiagSegScores:
    """Aggregate per-item records into percentages (items without a mask score Dice 0)."""
    groups: dict[str, list[DiagSegRecord]] = {}
    for record in records:
        groups.setdefault(record.modality, []).append(record)
    everything = [r for rs in groups.values() for r in rs]

    def summary(rs: list[DiagSegRecord]) -> dict:
        scored = [r for r in rs if r.has_target]
        return {
            "dice": 100.0 * float(np.mean([r.dice or 0.0 for r in scored])) if scored else None,
            "diagnosis_recall": 100.0 * float(np.mean([r.recall for r in rs])),
            "n": len(rs),
            "n_no_mask": sum(r.dice is None for r in scored),
            "n_no_target": len(rs) - len(scored),
        }

    per_modality = {m: summary(rs) for m, rs in sorted(groups.items())}
    if not everything:
        return DiagSegScores(0.0, 0.0, 0.0, 0, 0, 0, {})
    overall = summary(everything)
    dice_by_modality = [s["dice"] for s in per_modality.values() if s["dice"] is not None]
    return DiagSegScores(
        diagnosis_recall=overall["diagnosis_recall"],
        dice_macro=float(np.mean(dice_by_modality)) if dice_by_modality else 0.0,
        dice_micro=overall["dice"] or 0.0,
        n=overall["n"],
        n_no_mask=overall["n_no_mask"],
        n_no_target=overall["n_no_target"],
        per_modality=per_modality,
    )
