"""The released stage-2 codebook (`0035673.pt`, kept by `medsight import official --codebook` as the export
component `codebook_reference` under its released names), as a quantiser that assigns codes the way the
reference does, so new grounded data can be coded with the released code tokens (`python -m medsight.codes
--export <imported export> ...`).

The reference (Aofei-Chang/MedSIGHT `source/regtok/vq_model.py`, ModalitySpecificQuantizer of
VectorQuantizerST, hard assignment at inference): z = to_code(final region query) (Linear GELU LayerNorm
Linear GELU LayerNorm), L2-normalised; each modality group's codebook rows L2-normalised; the code is the
row at the smallest Euclidean distance (on unit vectors: the largest cosine). The modality head is a Linear
on the encoder's CLS feature of the selected block.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsight.data import DataError


class ReferenceAssignment:
    """What `medsight.codes.assign_codes` reads from a quantiser's output: `codes` (T,)."""

    def __init__(self, codes: Tensor) -> None:
        self.codes = codes


class ReferenceQuantizer(nn.Module):
    """to_code + per-group codebooks (G, K, e) + modality head, with `quantize(queries, groups)` and
    `predict_modality(pooled)` as medsight's RegionQuantizer offers them."""

    def __init__(self, dim: int, code_dim: int, num_groups: int, num_codes: int, enc_dim: int) -> None:
        super().__init__()
        self.to_code = (nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, code_dim),
                                      nn.GELU(), nn.LayerNorm(code_dim)) if dim != code_dim else nn.Identity())
        self.codebooks = nn.Parameter(torch.zeros(num_groups, num_codes, code_dim), requires_grad=False)
        self.modality_head = nn.Linear(enc_dim, num_groups)
        self.num_groups, self.num_codes = num_groups, num_codes

    def predict_modality(self, pooled: Tensor) -> Tensor:
        return self.modality_head(pooled)  # (B, G) logits

    @torch.no_grad()
    def quantize(self, queries: Tensor, groups: Tensor) -> ReferenceAssignment:
        z = F.normalize(self.to_code(queries), dim=-1)  # (T, e)
        emb = F.normalize(self.codebooks[groups], dim=-1)  # (T, K, e) each query's own group's codebook
        dist = (z * z).sum(-1, keepdim=True) + (emb * emb).sum(-1) - 2 * torch.einsum("te,tke->tk", z, emb)
        return ReferenceAssignment(dist.argmin(-1))


def load_reference_quantizer(export_dir: Path | str) -> ReferenceQuantizer:
    """The `codebook_reference` component of an imported export as a ReferenceQuantizer (eval mode)."""
    from medsight.export import load_component, read_export_config, read_meta

    state = load_component(export_dir, "codebook_reference")
    cfg, meta = read_export_config(export_dir), read_meta(export_dir)
    source = str(Path(export_dir) / "codebook_reference.safetensors")
    books = {}
    for k, v in state.items():
        m = re.fullmatch(r"quantizer\.codebooks\.(\d+)\.embedding\.weight", k)
        if m:
            books[int(m.group(1))] = v.float()
    if not books:
        raise DataError(f"{source}: no quantizer.codebooks.<g>.embedding.weight tensors", path=source,
                        field="quantizer.codebooks")
    groups = 1 + max(books)
    if sorted(books) != list(range(groups)):
        raise DataError(f"{source}: codebooks of groups {sorted(set(range(groups)) - set(books))} are missing",
                        path=source, field="quantizer.codebooks")
    k, e = books[0].shape
    head = state.get("modality_predictor.weight")
    if head is None:
        raise DataError(f"{source}: no modality_predictor.weight (the modality head)", path=source,
                        field="modality_predictor.weight")
    q = ReferenceQuantizer(int(cfg.perceiver.dim), e, groups, k, head.shape[1])
    with torch.no_grad():
        q.codebooks.copy_(torch.stack([books[g] for g in range(groups)]))
        q.modality_head.weight.copy_(head.float())
        q.modality_head.bias.copy_(state.get("modality_predictor.bias", torch.zeros(groups)).float())
        if isinstance(q.to_code, nn.Sequential):
            for i in (0, 2, 3, 5):
                for p in ("weight", "bias"):
                    key = f"region_perceiver.to_code.{i}.{p}"
                    if key not in state:
                        raise DataError(f"{source}: missing '{key}'", path=source, field=key)
                    getattr(q.to_code[i], p).copy_(state[key].float())
    if len(meta.get("code_tokens", [])) != groups * k:
        raise DataError(f"{source}: {groups} x {k} codes but the export names {len(meta.get('code_tokens', []))} "
                        "code tokens", path=source, field="code_tokens")
    return q.eval()


__all__ = ["ReferenceQuantizer", "load_reference_quantizer"]
