"""The two projectors between vision and language (SPEC sections 2 and 5).

- v->t ("mlp2x_gelu", LLaVA): Linear(d_in, h) GELU Linear(h, h). One projector is shared by patch tokens
  (encoder width) and region tokens (perceiver width), as in the paper; when the two widths differ, region
  tokens first pass a Linear input adapter to the encoder width. `separate=True` gives each its own MLP.
- t->v: Linear(h, h) ReLU Linear(h, d_perceiver): a code token's final hidden state -> a perceiver query.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp2x_gelu(d_in: int, h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, h), nn.GELU(), nn.Linear(h, h))


class VisionToText(nn.Module):
    """Patch tokens (B, P, d_enc) and region tokens (B, R, d_perc) -> LLM embeddings (B, P + R, h)."""

    def __init__(self, d_enc: int, d_perc: int, hidden: int, separate: bool = False) -> None:
        super().__init__()
        self.separate = separate
        self.mlp = mlp2x_gelu(d_enc, hidden)
        if separate:
            self.region_mlp = mlp2x_gelu(d_perc, hidden)
        elif d_perc != d_enc:
            self.region_adapter = nn.Linear(d_perc, d_enc)

    def project_regions(self, x: torch.Tensor) -> torch.Tensor:
        """Region-space vectors (..., d_perc) -> (..., h); also used for the code-token initialisation."""
        if self.separate:
            return self.region_mlp(x)
        if hasattr(self, "region_adapter"):
            x = self.region_adapter(x)
        return self.mlp(x)

    def forward(self, patches: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mlp(patches), self.project_regions(regions)], dim=1)  # (B, P + R, h)


class TextToVision(nn.Module):
    """Final hidden state of a code token (..., h) -> perceiver query (..., d_perc)."""

    def __init__(self, hidden: int, d_perc: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_perc))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


__all__ = ["TextToVision", "VisionToText", "mlp2x_gelu"]
