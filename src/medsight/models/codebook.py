"""Modality-aware region codebook (SPEC section 4; the paper's "region quantiser").

A frozen perceiver's final region query Q_r (d) is mapped by W_q to z (D), L2-normalised, and snapped to the
nearest row of its image's modality-group codebook (G groups x K codes x D, rows L2-normalised). W_m maps a
code back to query space so the perceiver can decode a mask from it. A modality head on the encoder's pooled
feature picks the group at inference (training routes by the ground-truth group).

What differs from the reference on purpose (SPEC section 9): a correct straight-through estimator
`z + (z_q - z).detach()`, configurable codebook/commitment weights with each term counted once, and two
options against dead codes: EMA codebook updates and re-seeding unused codes from recent z. The codes start
from k-means on the initial z, optionally with equal mass per code (`init_from_data(balance=...)`); the tiny
default then keeps W_q and the codes frozen (stages/configs/stage2.yaml has the measurement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from omegaconf import DictConfig


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear GELU LN Linear GELU LN (the paper's W_q / W_m)."""
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.GELU(), nn.LayerNorm(d_hidden),
        nn.Linear(d_hidden, d_out), nn.GELU(), nn.LayerNorm(d_out),
    )


@dataclass
class QuantizerOutput:
    """Result of quantising M region queries (shapes for M queries)."""

    z: Tensor  # (M, D) normalised W_q output
    z_q: Tensor  # (M, D) straight-through code vector: forward value = code, gradient -> z
    codes: Tensor  # (M,) int64 code index within the group
    groups: Tensor  # (M,) int64 modality group
    codebook_loss: Tensor  # () ||sg(z) - z_q||^2 (0 with EMA updates)
    commitment_loss: Tensor  # () ||z - sg(z_q)||^2 (unweighted; beta is applied by `quantizer_loss`)
    num_codes: int  # K

    @property
    def token_ids(self) -> Tensor:
        """Flat index into the G*K code tokens, modality-major (`group * K + code`)."""
        return self.groups * self.num_codes + self.codes


class RegionQuantizer(nn.Module):
    """W_q -> per-group nearest normalised code (straight-through) -> W_m, plus the modality head.

    Queries are standardised per channel (statistics of the training queries, `set_input_stats`) before W_q.

    Args:
        dim: perceiver query width d.
        enc_dim: encoder pooled-feature width (modality head input).
        num_groups: G modality groups; num_codes: K codes per group; code_dim: D.
        ema: update codebooks by exponential moving averages of assigned z instead of the codebook loss.
        ema_decay: EMA decay.
    """

    def __init__(self, dim: int, enc_dim: int, num_groups: int, num_codes: int, code_dim: int,
                 ema: bool = False, ema_decay: float = 0.99, recent_size: int = 1024) -> None:
        super().__init__()
        if min(dim, enc_dim, num_groups, num_codes, code_dim) < 1:
            raise ValueError(f"RegionQuantizer sizes must be positive, got dim={dim} enc_dim={enc_dim} "
                             f"groups={num_groups} codes={num_codes} code_dim={code_dim}")
        self.dim, self.enc_dim = dim, enc_dim
        self.num_groups, self.num_codes, self.code_dim = num_groups, num_codes, code_dim
        self.ema, self.ema_decay = ema, ema_decay
        self.w_q = _mlp(dim, dim, code_dim)
        self.w_m = _mlp(code_dim, dim, dim)
        self.modality_head = nn.Linear(enc_dim, num_groups)
        self.codebook = nn.Parameter(F.normalize(torch.randn(num_groups, num_codes, code_dim), dim=-1))
        # per-channel statistics of the region queries, applied before W_q (identity until set_input_stats)
        self.register_buffer("query_mean", torch.zeros(dim))
        self.register_buffer("query_std", torch.ones(dim))
        self.register_buffer("initialized", torch.tensor(False))  # set by the data-dependent initialisation
        # EMA statistics (used only when ema=True) and usage since the last dead-code check
        self.register_buffer("ema_count", torch.ones(num_groups, num_codes))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.register_buffer("usage", torch.zeros(num_groups, num_codes), persistent=False)
        # recent normalised z per group (ring buffers) for dead-code re-seeding; not exported
        self.recent_size = recent_size
        self.register_buffer("recent", torch.zeros(num_groups, recent_size, code_dim), persistent=False)
        self.register_buffer("recent_n", torch.zeros(num_groups, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------------------------ pieces
    def normalized_codebook(self) -> Tensor:
        """(G, K, D) L2-normalised code vectors."""
        return F.normalize(self.codebook, dim=-1)

    def encode(self, queries: Tensor) -> Tensor:
        """Standardise, W_q, L2-normalise: (..., d) -> (..., D)."""
        return F.normalize(self.w_q((queries - self.query_mean) / self.query_std), dim=-1)

    @torch.no_grad()
    def set_input_stats(self, queries: Tensor) -> None:
        """Per-channel mean/std of region queries (M, d), applied before W_q. A trained perceiver's final
        queries share a large common component (their spread is ~1% of their norm); without this every z
        points the same way and the nearest-code search collapses onto one or two codes. Also starts W_m's
        output at the queries' mean and scale."""
        self.query_mean.copy_(queries.mean(0))
        self.query_std.copy_(queries.std(0).clamp_min(1e-4) if len(queries) > 1 else torch.ones_like(self.query_std))
        # W_m ends in a LayerNorm: start its affine at the queries' scale so reconstruction starts near the mean
        self.w_m[-1].weight.copy_(self.query_std)
        self.w_m[-1].bias.copy_(self.query_mean)

    def nearest(self, z: Tensor, groups: Tensor) -> Tensor:
        """Index of the nearest code (cosine = Euclidean on unit vectors) in each row's group codebook."""
        cb = self.normalized_codebook()[groups]  # (M, K, D)
        return torch.einsum("md,mkd->mk", z, cb).argmax(-1)

    def decode_codes(self, groups: Tensor, codes: Tensor) -> Tensor:
        """W_m of codebook rows: the query-space vectors a (group, code) pair stands for. (M,) -> (M, d)."""
        return self.w_m(self.normalized_codebook()[groups, codes])

    def reconstruction_loss(self, recon: Tensor, queries: Tensor) -> Tensor:
        """MSE(W_m(z_q), Q_r), each channel in units of the queries' std (identity until set_input_stats), so
        the loss measures the region-specific part of a query and not its shared offset."""
        return (((recon - queries) / self.query_std) ** 2).mean() if len(queries) else recon.new_zeros(())

    def code_embeddings(self) -> Tensor:
        """W_m(every codebook row) in modality-major order: (G*K, d). Initialises the LLM's code tokens."""
        return self.w_m(self.normalized_codebook().reshape(-1, self.code_dim))

    def predict_modality(self, pooled: Tensor) -> Tensor:
        """Modality-group logits from the encoder's pooled feature: (B, d_enc) -> (B, G)."""
        return self.modality_head(pooled)

    # ----------------------------------------------------------------------------------- forward
    def quantize(self, queries: Tensor, groups: Tensor) -> QuantizerOutput:
        """Quantise queries (M, d) with the codebooks of `groups` (M,)."""
        if queries.dim() != 2 or queries.shape[-1] != self.dim:
            raise ValueError(f"quantize expects queries of shape (M, {self.dim}), got {tuple(queries.shape)}")
        if groups.shape != queries.shape[:1]:
            raise ValueError(f"quantize expects one group per query, got groups {tuple(groups.shape)} "
                             f"for {queries.shape[0]} queries")
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= self.num_groups):
            raise ValueError(f"modality group out of range 0..{self.num_groups - 1}: {groups.tolist()}")
        z = self.encode(queries)  # (M, D)
        codes = self.nearest(z.detach(), groups)  # (M,)
        code_vec = self.normalized_codebook()[groups, codes]  # (M, D), differentiable w.r.t. the codebook
        if self.training:
            self._track(z.detach(), groups, codes)
        if self.ema:
            codebook_loss = z.new_zeros(())
        else:
            codebook_loss = F.mse_loss(code_vec, z.detach()) if len(z) else z.new_zeros(())
        commitment = F.mse_loss(z, code_vec.detach()) if len(z) else z.new_zeros(())
        z_q = z + (code_vec - z).detach()  # straight-through: value = code, gradient flows to W_q
        return QuantizerOutput(z=z, z_q=z_q, codes=codes, groups=groups, codebook_loss=codebook_loss,
                               commitment_loss=commitment, num_codes=self.num_codes)

    def forward(self, queries: Tensor, groups: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Quantise and map back: (M, d) -> (W_m(z_q) (M, d), details)."""
        q = self.quantize(queries, groups)
        return self.w_m(q.z_q), q

    # -------------------------------------------------------------- codebook maintenance (no grad)
    @torch.no_grad()
    def _track(self, z: Tensor, groups: Tensor, codes: Tensor) -> None:
        G, K = self.num_groups, self.num_codes
        flat = groups * K + codes
        counts = torch.bincount(flat, minlength=G * K).view(G, K).to(self.usage)
        self.usage += counts
        for g in groups.unique().tolist():
            zg = z[groups == g][-self.recent_size:]
            n, start = len(zg), int(self.recent_n[g]) % self.recent_size
            idx = (torch.arange(n, device=z.device) + start) % self.recent_size
            self.recent[g, idx] = zg.to(self.recent)
            self.recent_n[g] += n
        if self.ema:
            sums = torch.zeros(G * K, self.code_dim, device=z.device, dtype=self.ema_sum.dtype)
            sums.index_add_(0, flat, z.to(sums))
            d = self.ema_decay
            self.ema_count.mul_(d).add_(counts, alpha=1 - d)
            self.ema_sum.mul_(d).add_(sums.view(G, K, -1), alpha=1 - d)
            # only codes that have ever been assigned move; normalisation happens on use
            self.codebook.data.copy_(F.normalize(self.ema_sum / self.ema_count.clamp_min(1e-5).unsqueeze(-1), dim=-1))

    @torch.no_grad()
    def set_codes(self, group: int, index: Tensor | slice, vectors: Tensor) -> None:
        """Overwrite codes of one group (normalised) and their EMA statistics."""
        vectors = F.normalize(vectors, dim=-1)
        self.codebook.data[group, index] = vectors.to(self.codebook)
        self.ema_sum[group, index] = vectors.to(self.ema_sum)
        self.ema_count[group, index] = 1.0

    @torch.no_grad()
    def reseed_dead(self, min_usage: int = 1) -> int:
        """Re-initialise codes used fewer than `min_usage` times since the last call from recent z of the
        same group (groups that saw no data are left alone). Resets the usage counter; returns #re-seeded."""
        reseeded = 0
        for g in range(self.num_groups):
            n = min(int(self.recent_n[g]), self.recent_size)
            if n == 0:
                continue
            dead = (self.usage[g] < min_usage).nonzero().flatten()
            if len(dead) == 0:
                continue
            pool = self.recent[g, :n]
            pick = pool[torch.randint(n, (len(dead),), device=pool.device)]
            self.set_codes(g, dead, pick + 0.01 * torch.randn_like(pick))
            reseeded += len(dead)
        self.usage.zero_()
        return reseeded

    @torch.no_grad()
    def init_from_data(self, z: Tensor, groups: Tensor, iters: int = 10, seed: int = 0,
                       balance: float = 0.0) -> None:
        """k-means++ seeding plus a few spherical k-means steps on normalised z (M, D) per group; groups
        without data keep their random codes. Spreads codes over the data from the first step.

        balance > 0: each k-means step assigns by entropic optimal transport with equal mass per code
        (Sinkhorn at this temperature on cosine similarity) instead of nearest code, so codes follow how many
        regions there are, not only how far apart they lie: a tight cluster holding many regions (an organ
        seen on every slice) gets several codes instead of one."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for g in groups.unique().tolist():
            zg = z[groups == g].float().cpu()
            centers = _kmeans_pp(zg, self.num_codes, gen)
            for _ in range(iters):
                sim = zg @ centers.T
                assign = balanced_assignment(sim, balance) if balance > 0 else sim.argmax(-1)
                for k in range(len(centers)):
                    members = zg[assign == k]
                    if len(members):
                        centers[k] = F.normalize(members.mean(0), dim=-1)
            self.set_codes(g, slice(None), centers)


def balanced_assignment(sim: Tensor, temperature: float, iters: int = 50) -> Tensor:
    """Rows of sim (M, K) to columns so that every column takes about M/K rows: the argmax of the entropic
    optimal-transport plan with uniform row and column marginals (log-domain Sinkhorn at `temperature`)."""
    log_p = sim / temperature
    m, k = log_p.shape
    v = log_p.new_zeros(1, k)
    for _ in range(iters):
        u = -math.log(m) - torch.logsumexp(log_p + v, dim=1, keepdim=True)
        v = -math.log(k) - torch.logsumexp(log_p + u, dim=0, keepdim=True)
    return (log_p + u + v).argmax(-1)


def _kmeans_pp(z: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeds (cosine distance) from rows of z; pads with jittered copies when len(z) < k."""
    n = len(z)
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [z[first]]
    dist = (1 - z @ z[first]).clamp_min(0)
    for _ in range(1, min(k, n)):
        if float(dist.sum()) <= 0:
            break
        i = int(torch.multinomial(dist / dist.sum(), 1, generator=gen))
        centers.append(z[i])
        dist = torch.minimum(dist, (1 - z @ z[i]).clamp_min(0))
    c = torch.stack(centers)
    if len(c) < k:
        extra = c[torch.randint(len(c), (k - len(c),), generator=gen)]
        extra = extra + 0.05 * torch.randn(extra.shape, generator=gen)
        c = torch.cat([c, extra])
    return F.normalize(c, dim=-1)


def quantizer_loss(q: QuantizerOutput, codebook_weight: float, beta: float) -> Tensor:
    """codebook_weight * ||sg(z) - z_q||^2 + beta * ||z - sg(z_q)||^2, each term once."""
    return codebook_weight * q.codebook_loss + beta * q.commitment_loss


def usage_stats(codes: Tensor, groups: Tensor, num_groups: int, num_codes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per group: fraction of codes used at least once, perplexity exp(H(code frequencies)), and the number
    of assignments. Groups with no assignments get usage 0 and perplexity 0."""
    counts = torch.bincount(groups * num_codes + codes, minlength=num_groups * num_codes)
    counts = counts.view(num_groups, num_codes).float()
    n = counts.sum(-1)
    usage = (counts > 0).float().mean(-1)
    p = counts / n.clamp_min(1).unsqueeze(-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    perplexity = torch.where(n > 0, entropy.exp(), torch.zeros_like(entropy))
    return usage, perplexity, n


def build_quantizer(cfg, enc_dim: int | None = None) -> RegionQuantizer:
    """RegionQuantizer from the full config (`codebook` + `perceiver.dim`; enc_dim defaults to the
    vision width of the tiny encoder)."""
    c = cfg.codebook
    return RegionQuantizer(
        dim=cfg.perceiver.dim, enc_dim=enc_dim if enc_dim is not None else cfg.vision.width,
        num_groups=c.num_groups, num_codes=c.num_codes, code_dim=c.code_dim, ema=c.ema, ema_decay=c.ema_decay,
    )


def load_quantizer(export_dir, cfg=None) -> tuple[RegionQuantizer, DictConfig]:
    """The quantiser of a stage-2 export (strictly loaded, eval mode) and the config it was built with
    (`cfg` overrides the export's own config.yaml)."""
    from medsight.export import load_into, read_export_config, read_meta, require_export

    export_dir = require_export(export_dir, "stage2")
    cfg = cfg if cfg is not None else read_export_config(export_dir)
    q = build_quantizer(cfg, enc_dim=int(read_meta(export_dir)["encoder_dim"]))
    load_into(q, export_dir, "codebook")
    return q.eval(), cfg


__all__ = [
    "QuantizerOutput",
    "RegionQuantizer",
    "balanced_assignment",
    "build_quantizer",
    "load_quantizer",
    "quantizer_loss",
    "usage_stats",
]
