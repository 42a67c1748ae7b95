"""The stages' AdamW (medsight.train.adamw): which kernel optim.impl=auto takes, and that every kernel makes
AdamW's update, checked against the update written out from the algorithm (Loshchilov & Hutter, decoupled
weight decay), not against torch."""

from __future__ import annotations

import math

import pytest
import torch

from medsight.config import ADAMW_IMPLS, load_config
from medsight.train import adamw, auto_fuses


def _textbook_adamw(params, grads, lr, wd, steps, betas=(0.9, 0.999), eps=1e-8):
    """float64 AdamW by the formula, per tensor; grads[t][i] is tensor i's gradient at step t."""
    p = [x.double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for t in range(1, steps + 1):
        for i, x in enumerate(p):
            g = grads[t - 1][i].double()
            x.mul_(1 - lr * wd[i])
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            mhat, vhat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
            x.sub_(lr * mhat / (vhat.sqrt() + eps))
    return p


@pytest.mark.parametrize("impl", ADAMW_IMPLS)
def test_every_kernel_makes_the_adamw_update(impl):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(6)]
    for row in grads:
        row[0][2] = 0.0  # a row that never gets a gradient (stage 3's frozen code rows): it must not move
    start = [p.detach().clone() for p in params]
    cfg = load_config("stage1", [], [f"optim.impl={impl}"])
    opt = adamw([{"params": params[:2], "weight_decay": 0.0}, {"params": params[2:], "weight_decay": 0.1}],
                3e-2, cfg)
    for row in grads:
        for p, gr in zip(params, row):
            p.grad = gr.clone()
        opt.step()
    want = _textbook_adamw(start, grads, 3e-2, [0.0, 0.0, 0.1], len(grads))
    for p, w in zip(params, want):
        assert torch.allclose(p.detach().double(), w, atol=1e-6, rtol=1e-5), (impl, (p.double() - w).abs().max())
    assert torch.equal(params[0][2].detach(), start[0][2])
    assert not math.isclose(float(params[2].detach().sum()), float(start[2].sum()))


@pytest.mark.parametrize("overrides, fused", [
    ([], False),  # CPU: torch's default loop (the documented CPU runs' rounding)
    (["optim.impl=fused"], True),
    (["optim.impl=for_loop"], False),
    (["optim.impl=foreach"], False),
])
def test_optim_impl_picks_the_kernel(overrides, fused):
    cfg = load_config("stage1", [], overrides)
    opt = adamw([torch.nn.Parameter(torch.ones(3))], 1e-3, cfg)
    assert bool(opt.defaults["fused"]) is fused
    assert bool(opt.defaults["foreach"]) is ("optim.impl=foreach" in overrides)


@pytest.mark.parametrize("devices, plain, precision, strategy, fused", [
    ({"cuda"}, True, "bf16-mixed", "auto", True),
    ({"cuda"}, True, "32-true", "ddp", True),
    ({"cpu"}, True, "32-true", "auto", False),
    ({"cuda", "cpu"}, True, "bf16-mixed", "auto", False),
    ({"cuda"}, False, "bf16-mixed", "auto", False),  # a DTensor or integer parameter
    ({"cuda"}, True, "16-mixed", "auto", False),  # Lightning cannot clip a fused optimizer under fp16 scaling
    ({"cuda"}, True, "bf16-mixed", "fsdp", False),
    ({"cuda"}, True, "bf16-mixed", "deepspeed_stage_2", False),
    ({"cuda"}, True, "bf16-mixed", "model_parallel", False),
])
def test_auto_fuses_only_where_the_fused_kernel_applies(devices, plain, precision, strategy, fused):
    assert auto_fuses(devices, plain, precision, strategy) is fused
