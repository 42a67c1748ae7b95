"""Region quantiser (SPEC section 4): shapes, straight-through gradients, losses on hand-made cases,
EMA / dead-code maintenance, usage statistics, ill inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsight.models.codebook import RegionQuantizer, balanced_assignment, quantizer_loss, usage_stats


@pytest.mark.parametrize(
    "dim, enc_dim, groups, codes, code_dim, m",
    [(32, 16, 4, 8, 8, 5), (64, 64, 18, 32, 64, 3), (16, 24, 1, 2, 4, 1), (16, 24, 2, 4, 4, 0)],
)
def test_shapes(dim, enc_dim, groups, codes, code_dim, m):
    qz = RegionQuantizer(dim, enc_dim, groups, codes, code_dim)
    queries = torch.randn(m, dim)
    g = torch.randint(groups, (m,))
    recon, q = qz(queries, g)
    assert recon.shape == (m, dim)
    assert q.z.shape == q.z_q.shape == (m, code_dim)
    assert q.codes.shape == (m,) and q.codes.dtype == torch.long
    assert ((q.codes >= 0) & (q.codes < codes)).all()
    assert ((q.token_ids >= 0) & (q.token_ids < groups * codes)).all()
    assert qz.code_embeddings().shape == (groups * codes, dim)
    assert qz.predict_modality(torch.randn(3, enc_dim)).shape == (3, groups)
    assert torch.allclose(qz.normalized_codebook().norm(dim=-1), torch.ones(groups, codes))


def test_straight_through_gradient_reaches_w_q():
    torch.manual_seed(0)
    qz = RegionQuantizer(16, 8, 2, 4, 8)
    queries = torch.randn(6, 16)
    recon, q = qz(queries, torch.tensor([0, 0, 1, 1, 0, 1]))
    # forward value is the code itself
    code_vec = qz.normalized_codebook()[q.groups, q.codes]
    assert torch.allclose(q.z_q, code_vec, atol=1e-6)
    recon.pow(2).sum().backward()  # only the reconstruction path: through W_m and the STE into W_q
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in qz.w_q.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in qz.w_m.parameters())
    assert qz.codebook.grad is None  # the STE sends no gradient into the codebook


def _identity_quantizer(codebook: torch.Tensor, ema: bool = False) -> RegionQuantizer:
    G, K, D = codebook.shape
    qz = RegionQuantizer(D, 4, G, K, D, ema=ema)
    qz.w_q = nn.Identity()  # z = normalise(query)
    for g in range(G):
        qz.set_codes(g, slice(None), codebook[g])
    return qz


def test_losses_hand_made():
    cb = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]])  # 2 groups x 2 codes x 2
    qz = _identity_quantizer(cb)
    queries = torch.tensor([[3.0, 1.0], [3.0, 1.0], [1.0, 4.0]])
    q = qz.quantize(queries, torch.tensor([0, 1, 0]))
    assert q.codes.tolist() == [0, 1, 1]  # group 1 has only negative codes: [0,-1] is nearer than [-1,0]
    z = F.normalize(queries, dim=-1)
    target = torch.stack([cb[0, 0], cb[1, 1], cb[0, 1]])
    expected = ((z - target) ** 2).mean()
    assert math.isclose(q.codebook_loss.item(), expected.item(), rel_tol=1e-5)
    assert math.isclose(q.commitment_loss.item(), expected.item(), rel_tol=1e-5)
    total = quantizer_loss(q, codebook_weight=2.0, beta=0.25)
    assert math.isclose(total.item(), 2.25 * expected.item(), rel_tol=1e-5)  # each term exactly once
    # the codebook loss moves only the codebook, the commitment loss only the encoder side
    q.codebook_loss.backward()
    assert qz.codebook.grad is not None and qz.codebook.grad.abs().sum() > 0


def test_exact_code_gives_zero_loss():
    cb = F.normalize(torch.randn(1, 4, 3), dim=-1)
    qz = _identity_quantizer(cb)
    q = qz.quantize(cb[0] * 5.0, torch.zeros(4, dtype=torch.long))
    assert q.codes.tolist() == [0, 1, 2, 3]
    assert q.codebook_loss.item() < 1e-10 and q.commitment_loss.item() < 1e-10


def test_ema_moves_codes_and_skips_codebook_loss():
    cb = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    qz = _identity_quantizer(cb, ema=True).train()
    qz.ema_decay = 0.5
    before = qz.codebook.detach().clone()
    q = qz.quantize(torch.tensor([[1.0, 0.5]]), torch.tensor([0]))
    assert q.codebook_loss.item() == 0.0
    assert not torch.allclose(qz.codebook[0, 0], before[0, 0])  # assigned code moved toward z
    assert torch.allclose(qz.codebook[0, 1], before[0, 1])  # the other did not


def test_reseed_dead_codes_from_recent_z():
    torch.manual_seed(0)
    qz = RegionQuantizer(8, 4, 2, 8, 4).train()
    g1_before = qz.codebook[1].detach().clone()
    q = qz.quantize(torch.randn(20, 8), torch.zeros(20, dtype=torch.long))
    used = sorted(set(q.codes.tolist()))
    assert qz.reseed_dead() == 8 - len(used)  # group 1 saw no data: left alone
    assert torch.equal(qz.codebook[1], g1_before)
    dead = [k for k in range(8) if k not in used]
    sims = qz.normalized_codebook()[0, dead] @ q.z.T  # each re-seeded code sits on a recent z
    assert (sims.max(-1).values > 0.99).all()
    assert qz.usage.sum() == 0  # counter reset


def test_init_from_data_spreads_codes():
    torch.manual_seed(0)
    qz = RegionQuantizer(8, 4, 2, 4, 4)
    centers = F.normalize(torch.randn(4, 4), dim=-1)
    z = F.normalize(centers.repeat(10, 1) + 0.01 * torch.randn(40, 4), dim=-1)
    qz.init_from_data(z, torch.zeros(40, dtype=torch.long))
    assign = (z @ qz.normalized_codebook()[0].T).argmax(-1)
    assert len(set(assign.tolist())) == 4  # every code owns one cluster


def test_usage_stats_hand_made():
    codes = torch.tensor([0, 0, 1, 3, 2, 2])
    groups = torch.tensor([0, 0, 0, 0, 2, 2])
    usage, ppl, n = usage_stats(codes, groups, num_groups=3, num_codes=4)
    assert usage.tolist() == [0.75, 0.0, 0.25]
    p = torch.tensor([0.5, 0.25, 0.25])
    assert math.isclose(ppl[0].item(), math.exp(-(p * p.log()).sum().item()), rel_tol=1e-5)
    assert ppl[1].item() == 0.0 and math.isclose(ppl[2].item(), 1.0, rel_tol=1e-6)
    assert n.tolist() == [4.0, 0.0, 2.0]


def test_balanced_assignment_matches_exact_transport():
    """Oracle: the exact equal-size assignment (Hungarian on each code repeated M/K times, scipy); at a low
    temperature the Sinkhorn plan's argmax gives the same assignment, with every code taking M/K rows."""
    from scipy.optimize import linear_sum_assignment

    torch.manual_seed(3)
    m, k = 24, 4
    # most rows crowd near code 0
    codes = F.normalize(torch.randn(k, 6), dim=-1)
    z = F.normalize(codes[0] + 0.6 * torch.randn(m, 6), dim=-1)
    sim = z @ codes.T
    rows, cols = linear_sum_assignment(-sim.repeat_interleave(m // k, dim=1).numpy())
    exact = torch.as_tensor(cols // (m // k))[torch.as_tensor(rows).argsort()]
    got = balanced_assignment(sim, temperature=0.01, iters=500)
    assert torch.bincount(got, minlength=k).tolist() == [m // k] * k
    assert torch.equal(got, exact)
    assert int(torch.bincount(sim.argmax(-1), minlength=k).max()) > 2 * m // k  # nearest code: one code crowds


def test_balanced_init_gives_a_crowded_cluster_more_codes():
    torch.manual_seed(0)
    qz = RegionQuantizer(8, 4, 1, 8, 8)
    dense = F.normalize(torch.randn(8) + 0.05 * torch.randn(300, 8), dim=-1)  # one organ on every slice
    sparse = F.normalize(torch.randn(30, 8), dim=-1)  # a few scattered lesions
    z, g = torch.cat([dense, sparse]), torch.zeros(330, dtype=torch.long)
    def codes_on_dense(balance):
        qz.init_from_data(z, g, seed=0, balance=balance)
        return len(qz.nearest(dense, g[:300]).unique())
    assert codes_on_dense(0.02) > codes_on_dense(0.0)


@pytest.mark.parametrize(
    "queries, groups, match",
    [
        (torch.randn(3, 7), torch.zeros(3, dtype=torch.long), "shape"),
        (torch.randn(3, 8), torch.zeros(2, dtype=torch.long), "one group per query"),
        (torch.randn(2, 8), torch.tensor([0, 5]), "out of range"),
    ],
)
def test_ill_inputs(queries, groups, match):
    qz = RegionQuantizer(8, 4, 2, 4, 4)
    with pytest.raises(ValueError, match=match):
        qz.quantize(queries, groups)
    with pytest.raises(ValueError, match="positive"):
        RegionQuantizer(8, 4, 0, 4, 4)


def test_input_statistics_standardise_queries_and_reconstruction():
    torch.manual_seed(0)
    qz = RegionQuantizer(8, 4, 1, 4, 4)
    queries = 5.0 + 0.01 * torch.randn(50, 8)  # a large shared offset, tiny region-specific part
    qz.set_input_stats(queries)
    assert torch.allclose(qz.query_mean, queries.mean(0)) and torch.allclose(qz.query_std, queries.std(0))
    z = qz.encode(queries)
    assert (z @ z.T).mean() < 0.9  # standardised: the z do not all point the same way
    target, recon = queries[:3], queries[:3] + qz.query_std  # one std off in every channel
    assert math.isclose(qz.reconstruction_loss(recon, target).item(), 1.0, rel_tol=1e-4)
    assert torch.allclose(qz.w_m[-1].bias, qz.query_mean)  # W_m starts at the queries' mean
