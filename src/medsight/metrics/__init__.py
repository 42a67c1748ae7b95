"""Metrics (torchmetrics objects, one per split): segmentation Dice for region masks."""

from medsight.metrics.seg import MaskDice, binary_dice, pairwise_binary_dice

__all__ = ["MaskDice", "binary_dice", "pairwise_binary_dice"]
