"""Region Perceiver shapes (learned-query and decode modes), masking, positional encoding; stage-1 loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsight.models.matching import (
    SetCriterion,
    dice_loss,
    flatten_for_loss,
    hungarian_match,
    loss_weights,
    pairwise_bce,
    pairwise_dice,
    sigmoid_bce_loss,
)
from medsight.models.perceiver import CHANNELS_LAST_MAX_ELEMENTS, ConvAdapter, RegionPerceiver, sine_position_encoding

W = {"class": 2.0, "bce": 5.0, "dice": 5.0, "no_object": 0.1}


def small(in_dim=24, dim=32, num_queries=20, num_stages=2, pixel_ffn=True, num_classes=17):
    return RegionPerceiver(in_dim=in_dim, dim=dim, num_queries=num_queries, num_stages=num_stages, heads=2, head_dim=8,
                           ff_mult=2, num_classes=num_classes, pixel_ffn=pixel_ffn)


@pytest.mark.parametrize(
    "batch, grid, in_dim, num_queries, num_stages, external, pixel_ffn",
    [
        (1, 4, 24, 20, 2, None, True),    # learned queries
        (3, 4, 32, 20, 1, None, False),   # odd batch, in_dim == dim (no in_proj), no pixel FF
        (5, 6, 24, 7, 0, None, True),     # N != 20, no upsampling stage
        (2, 4, 24, 20, 3, 1, True),       # decode mode, one external query
        (3, 3, 24, 20, 2, 11, False),     # decode mode, M = 11 != N, odd grid
    ],
)
def test_perceiver_shapes(batch, grid, in_dim, num_queries, num_stages, external, pixel_ffn):
    p = small(in_dim, 32, num_queries, num_stages, pixel_ffn)
    feats = torch.randn(batch, grid, grid, in_dim)
    queries = None if external is None else torch.randn(batch, external, 32)
    out = p(feats, queries)
    m = num_queries if external is None else external
    side = grid * 2 ** num_stages
    assert out["pred_masks"].shape == (batch, m, side, side)
    assert out["pred_logits"].shape == (batch, m, 18)
    assert out["queries"].shape == (batch, m, 32)
    assert [a["pred_masks"].shape[-1] for a in out["aux"]] == [grid * 2 ** s for s in range(num_stages)]
    assert isinstance(p.in_proj, torch.nn.Identity) == (in_dim == 32)


def test_decode_mode_is_batch_independent():
    """Each image's result depends only on its own features and queries (no cached module state)."""
    torch.manual_seed(0)
    p = small(num_stages=1).eval()
    feats, q = torch.randn(3, 4, 4, 24), torch.randn(3, 5, 32)
    full = p(feats, q)
    one = p(feats[1:2], q[1:2])
    torch.testing.assert_close(one["pred_masks"][0], full["pred_masks"][1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one["queries"][0], full["queries"][1], atol=1e-4, rtol=1e-4)


def test_fully_masked_rows_are_unmasked():
    p = small()
    logits = torch.full((2, 3, 4, 4), -20.0)  # every pixel below threshold for every query
    logits[0, 1, 0, 0] = 20.0  # query 1 of image 0 keeps (at least) one pixel
    allow = p.attention_mask(logits, (8, 8))
    assert allow.shape == (2, 3, 64)
    assert allow[1].all() and allow[0, 0].all() and allow[0, 2].all()  # fully blocked rows -> un-masked
    assert 0 < allow[0, 1].sum() < 64  # partially blocked row kept as predicted


def test_masked_forward_is_finite_when_everything_blocked():
    p = small(num_stages=2)
    with torch.no_grad():
        p.mask_embed.weight.zero_()
        p.mask_embed.bias.fill_(-1.0)
    out = p(torch.randn(2, 4, 4, 24))
    assert torch.isfinite(out["pred_masks"]).all() and torch.isfinite(out["queries"]).all()


def test_adapter_layouts_compute_the_same_function():
    """The direct adapter's conv layouts are a speed choice: outputs and every gradient agree with the NCHW
    path, `auto` picks channels-last for small maps and NCHW for large ones while training on CPU, and a typo
    fails by name."""
    torch.manual_seed(0)
    ref = ConvAdapter(16, "nchw", "direct")
    f = torch.randn(2, 6, 5, 16)
    g = torch.randn(2, 12, 10, 16)
    results = {}
    for layout in ("nchw", "channels_last", "auto"):
        ad = ConvAdapter(16, layout, "direct")
        ad.load_state_dict(ref.state_dict())
        x = f.clone().requires_grad_()
        y = ad(x)
        assert y.shape == (2, 12, 10, 16) and y.is_contiguous()
        (y * g).sum().backward()
        results[layout] = (y.detach(), x.grad, ad.conv.weight.grad, ad.conv.bias.grad)
    for layout in ("channels_last", "auto"):
        for a, b in zip(results[layout], results["nchw"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    auto = ConvAdapter(16, "auto")
    side = int((CHANNELS_LAST_MAX_ELEMENTS // 16) ** 0.5)  # output side at the threshold
    assert auto.channels_last(torch.empty(1, side // 2, side // 2, 16))
    assert not auto.channels_last(torch.empty(1, side, side, 16))
    with torch.no_grad():  # forward-only passes always run channels-last
        assert auto.channels_last(torch.empty(1, side, side, 16))
    with pytest.raises(ValueError, match="perceiver.conv_layout='nhwc'"):
        ConvAdapter(16, "nhwc")
    with pytest.raises(ValueError, match="perceiver.adapter_impl='fast'"):
        ConvAdapter(16, "auto", "fast")


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (7, 4), (12, 12)])
def test_factored_adapter_is_upsample_then_conv(h, w):
    """The factored adapter (channel mixing at the input resolution, then one matmul per axis for the
    upsample-and-shift) against torch's own bilinear x2 + zero-padded 3x3 conv on the same parameters, in
    float64: outputs and the gradients of the input, weight and bias. Edges included (1x1 and non-square maps);
    the tap matrices are built once and also serve a pass that runs after an inference-mode one."""
    torch.manual_seed(h * 10 + w)
    ad = ConvAdapter(8, impl="factored").double()
    with torch.inference_mode():  # builds (and caches) the tap matrices inside inference mode first
        ad(torch.randn(1, h, w, 8, dtype=torch.float64))
    x = torch.randn(3, h, w, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 2 * h, 2 * w, 8, dtype=torch.float64)
    y = ad(x)
    assert y.shape == (3, 2 * h, 2 * w, 8) and y.is_contiguous()
    got = torch.autograd.grad(y, (x, ad.conv.weight, ad.conv.bias), g)
    up = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)
    oracle = F.conv2d(up, ad.conv.weight, ad.conv.bias, padding=1).permute(0, 2, 3, 1)
    want = torch.autograd.grad(oracle, (x, ad.conv.weight, ad.conv.bias), g)
    torch.testing.assert_close(y, oracle, atol=1e-12, rtol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a mixed-precision pass runs and stays close
        yb = ad.float()(x.detach().float())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), oracle.detach().float(), atol=0.1, rtol=0.05)


def test_positional_encoding():
    pos = sine_position_encoding(4, 6, 32)
    assert pos.shape == (4, 6, 32)
    assert pos.abs().max() <= 1.0
    # y half constant along x, x half constant along y
    assert torch.allclose(pos[:, 0, :16], pos[:, 5, :16]) and torch.allclose(pos[0, :, 16:], pos[3, :, 16:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_encoding(2, 2, 30)


# ------------------------------------------------------------------------------------------- loss
def _case():
    """Two images: 3 and 1 GT masks (8x8), padded to M=3."""
    masks = torch.zeros(2, 3, 8, 8)
    masks[0, 0, :4, :4] = 1
    masks[0, 1, 4:, 4:] = 1
    masks[0, 2, :2, 6:] = 1
    masks[1, 0, 2:6, 2:6] = 1
    valid = torch.tensor([[True, True, True], [True, False, False]])
    labels = torch.tensor([[1, 3, 10], [6, -1, -1]])
    return masks, valid, labels


def _perfect(masks, valid, labels, n=5, assign=((0, 1, 2), (3,))):
    """Predictions where query assign[b][g] exactly predicts GT g with its class; others say no-object."""
    b = masks.shape[0]
    pred_masks = torch.full((b, n, 8, 8), -30.0)
    pred_logits = torch.full((b, n, 18), -30.0)
    pred_logits[..., 17] = 30.0
    for i in range(b):
        for g, q in enumerate(assign[i]):
            pred_masks[i, q] = masks[i, g] * 60 - 30
            pred_logits[i, q] = -30.0
            pred_logits[i, q, labels[i, g]] = 30.0
    return {"pred_masks": pred_masks, "pred_logits": pred_logits, "aux": []}


def test_matching_recovers_assignment():
    masks, valid, labels = _case()
    out = _perfect(masks, valid, labels, assign=((4, 0, 2), (1,)))
    m = hungarian_match(out["pred_logits"], out["pred_masks"], labels, masks, valid, W)
    assert m[0][0].tolist() == [4, 0, 2] and m[0][1].tolist() == [0, 1, 2]
    assert m[1][0].tolist() == [1] and m[1][1].tolist() == [0]


def test_perfect_prediction_near_zero_loss_and_swap_invariance():
    masks, valid, labels = _case()
    crit = SetCriterion(17, W)
    a, _ = crit(_perfect(masks, valid, labels), labels, masks, valid)
    assert a["loss"] < 0.05, a
    b, matches = crit(_perfect(masks, valid, labels, assign=((2, 4, 1), (0,))), labels, masks, valid)
    torch.testing.assert_close(a["loss"], b["loss"])
    assert matches[0][0].tolist() == [2, 4, 1]


def test_loss_on_points_and_no_object_weight():
    masks, valid, labels = _case()
    out = _perfect(masks, valid, labels)
    torch.manual_seed(0)
    pts, _ = SetCriterion(17, W, num_points=200)(out, labels, masks, valid)
    rand = {"pred_masks": torch.randn(2, 5, 8, 8) * 5, "pred_logits": torch.randn(2, 5, 18), "aux": []}
    rand_pts, _ = SetCriterion(17, W, num_points=200)(rand, labels, masks, valid)
    assert pts["loss"] < 0.1 * rand_pts["loss"]  # bilinear reads at mask borders keep it above 0
    # a wrong "object" class on an unmatched query costs only with a no-object weight
    out["pred_logits"][0, 3] = 0.0
    with_no, _ = SetCriterion(17, W)(out, labels, masks, valid)
    without, _ = SetCriterion(17, {**W, "no_object": 0.0})(out, labels, masks, valid)
    assert with_no["loss_class"] > 1e-3 and without["loss_class"] < 1e-6


def test_foreground_points_land_inside_each_gt_mask():
    """loss.foreground_points: that fraction of an image's points falls inside its GT masks (evenly per mask,
    read as target 1 by the same nearest rule as the uniform points), padded or empty masks' share stays
    uniform, and 0 keeps the uniform sampler's random stream (same points for the same seed)."""
    from medsight.models.matching import sample_points

    masks = torch.zeros(2, 3, 64, 64, dtype=torch.bool)
    masks[0, 0, 10:12, 20:22] = True  # a 2x2 px lesion: 4 of 4096 pixels
    masks[0, 1, 30:50, 5:60] = True
    masks[1, 0, 0:3, 61:64] = True  # at the corner
    valid = torch.tensor([[True, True, False], [True, False, False]])
    masks[0, 2, :32] = True  # padded slot (valid False): its pixels must not attract points
    pred = torch.zeros(2, 4, 16, 16)
    torch.manual_seed(0)
    _, t = sample_points(pred, masks, 600, foreground=0.5, mask_valid=valid)
    k = 300 // 3  # per mask slot
    assert t.shape == (2, 3, 600)
    assert t[0, 0, :k].all() and t[0, 1, k:2 * k].all() and t[1, 0, :k].all()
    assert t[0, 0].sum() <= k + 5  # the uniform rest hits the 4-pixel lesion ~0.6 times on average
    assert 0.3 < t[0, 2, 2 * k:3 * k].float().mean() < 0.7  # the padded slot's points are uniform (half inside)
    # foreground_box=2: uniform in each mask's bounding box doubled about its centre, clipped to the image
    torch.manual_seed(0)
    pred = torch.zeros(2, 4, 16, 16)
    pred[..., :] = torch.arange(16.0)  # bilinear reads of a ramp give each point's x back
    p, t = sample_points(pred, masks, 600, foreground=0.5, mask_valid=valid, box=2.0)
    x = (p[0, 0, :k] + 0.5) * 4  # in 64 px units (logit pixel centres at 4 * (i + 0.5))
    assert x.min() >= 18 - 1e-3 and x.max() <= 24 + 1e-3  # x box [20, 22) doubled -> [19, 23), ramp-clamped
    assert 0.1 < t[0, 0, :k].float().mean() < 0.45  # a 2x2 object fills a quarter of its doubled box
    corner = t[1, 0, :k].float().mean()
    assert 0.4 < corner  # the corner object's box is clipped by the image: more of it is the object
    torch.manual_seed(1)
    p0, t0 = sample_points(torch.randn(2, 4, 16, 16), masks, 300, foreground=0.0)
    torch.manual_seed(1)
    p1, t1 = sample_points(torch.randn(2, 4, 16, 16), masks, 300)
    torch.testing.assert_close(p0, p1)
    torch.testing.assert_close(t0, t1)
    with pytest.raises(ValueError, match="loss.foreground_points"):
        SetCriterion(17, W, num_points=10, foreground_points=1.0)
    with pytest.raises(ValueError, match="loss.foreground_box"):
        SetCriterion(17, W, num_points=10, foreground_points=0.25, foreground_box=-1.0)


def test_loss_gradients_and_empty_images():
    masks, valid, labels = _case()
    valid[1] = False
    labels[1] = -1
    pm = torch.randn(2, 6, 4, 4, requires_grad=True)  # coarser than GT: GT is downsampled
    pl = torch.randn(2, 6, 18, requires_grad=True)
    losses, matches = SetCriterion(17, W, deep_supervision=True)(
        {"pred_masks": pm, "pred_logits": pl, "aux": [{"pred_masks": pm * 2, "pred_logits": pl}]}, labels, masks, valid)
    losses["loss"].backward()
    assert pm.grad is not None and torch.isfinite(pm.grad).all()
    assert matches[1][0].numel() == 0


def test_pair_losses_agree_with_pairwise():
    x, t = torch.randn(4, 30), (torch.rand(4, 30) > 0.5).float()
    torch.testing.assert_close(torch.diagonal(pairwise_bce(x, t)), sigmoid_bce_loss(x, t))
    torch.testing.assert_close(torch.diagonal(pairwise_dice(x, t)), dice_loss(x, t))


def test_loss_presets():
    from medsight.config import CONFIG_DIR, load_config

    paper = loss_weights(load_config("stage1").loss)
    assert paper == {"class": 2.0, "bce": 5.0, "dice": 5.0, "no_object": 0.1}
    official = loss_weights(load_config("stage1", [str(CONFIG_DIR / "official_code.yaml")]).loss)
    assert official == {"class": 1.0, "bce": 1.0, "dice": 1.0, "no_object": 0.0}
    assert loss_weights(load_config("stage1", overrides=["loss.preset=official_code"]).loss) == official


def test_loss_at_gt_resolution_reads_predictions_like_the_metric():
    """num_points=-1: the predictions at every GT pixel centre, bilinearly, edges clamped (oracle: grid_sample
    at the centres, written here), against the binary GT as it is; a small object below half a mask pixel survives, where the
    area-averaged target of num_points=0 drops below 0.5 everywhere."""
    torch.manual_seed(0)
    pred = torch.randn(2, 3, 8, 8)
    masks = torch.zeros(2, 2, 32, 32, dtype=torch.bool)
    masks[:, 0, 5:7, 9:11] = True  # 2x2 px: a quarter of one 4x4 mask pixel
    masks[:, 1, 10:30, 2:20] = True
    x, t = flatten_for_loss(pred, masks, -1)
    c = (torch.arange(32, dtype=torch.float32) * 2 + 1) / 32 - 1  # pixel centres in [-1, 1]
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].expand(2, 32, 32, 2)
    oracle = F.grid_sample(pred, grid, mode="bilinear", padding_mode="border", align_corners=False).flatten(2)
    torch.testing.assert_close(x, oracle, atol=1e-5, rtol=1e-5)
    assert torch.equal(t, masks.flatten(2).float())
    _, soft = flatten_for_loss(pred, masks, 0)
    assert soft[:, 0].max() < 0.5 and t[:, 0].max() == 1.0
