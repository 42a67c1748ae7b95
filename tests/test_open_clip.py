"""`medsight convert open-clip`: the converted CLIPVisionModel computes open_clip's block outputs.

The oracle is a plain-torch forward of open_clip's VisionTransformer over the open_clip state dict
(conv1 -> class token + positional embedding -> ln_pre -> resblocks of x + attn(ln_1(x)),
x + mlp(ln_2(x)) with nn.MultiheadAttention's packed in_proj and QuickGELU), written from reading
open_clip's `transformer.py`; `forward_intermediates` returns every block's output (NLD).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsight.cli import main
from medsight.config import load_config
from medsight.data import DataError
from medsight.interop.open_clip import convert_open_clip
from medsight.models.backbones import build_vision, load_hf_vision

WIDTH, LAYERS, HEADS, PATCH, GRID = 32, 3, 2, 4, 3  # head width 16


def open_clip_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    def ln(p, d=WIDTH):
        return {p + ".weight": 1 + r(d, s=0.1), p + ".bias": r(d, s=0.1)}

    sd = {"visual.conv1.weight": r(WIDTH, 3, PATCH, PATCH), "visual.class_embedding": r(WIDTH),
          "visual.positional_embedding": r(GRID * GRID + 1, WIDTH), **ln("visual.ln_pre"), **ln("visual.ln_post"),
          "visual.proj": r(WIDTH, 16)}
    for i in range(LAYERS):
        p = f"visual.transformer.resblocks.{i}"
        sd.update({**ln(p + ".ln_1"), **ln(p + ".ln_2"), p + ".attn.in_proj_weight": r(3 * WIDTH, WIDTH),
                   p + ".attn.in_proj_bias": r(3 * WIDTH), p + ".attn.out_proj.weight": r(WIDTH, WIDTH),
                   p + ".attn.out_proj.bias": r(WIDTH), p + ".mlp.c_fc.weight": r(4 * WIDTH, WIDTH),
                   p + ".mlp.c_fc.bias": r(4 * WIDTH), p + ".mlp.c_proj.weight": r(WIDTH, 4 * WIDTH),
                   p + ".mlp.c_proj.bias": r(WIDTH)})
    # UniMed-CLIP's text tower and temperature: ignored by the conversion
    sd.update({"text_encoder.transformer.embeddings.word_embeddings.weight": r(10, 8), "logit_scale": torch.tensor(4.6)})
    return sd


def oracle_intermediates(sd: dict, images: torch.Tensor) -> list[torch.Tensor]:
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    x = F.conv2d(images, sd["visual.conv1.weight"], stride=PATCH)  # (B, W, g, g)
    b = x.shape[0]
    x = x.reshape(b, WIDTH, -1).permute(0, 2, 1)  # (B, g*g, W)
    cls = sd["visual.class_embedding"].expand(b, 1, WIDTH)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = ln(x, "visual.ln_pre")
    outs = []
    hd = WIDTH // HEADS
    for i in range(LAYERS):
        p = f"visual.transformer.resblocks.{i}"
        h = ln(x, p + ".ln_1")
        qkv = h @ sd[p + ".attn.in_proj_weight"].T + sd[p + ".attn.in_proj_bias"]
        q, k, v = (t.reshape(b, -1, HEADS, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        a = ((q @ k.transpose(-1, -2)) / hd ** 0.5).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(b, -1, WIDTH) @ sd[p + ".attn.out_proj.weight"].T + sd[p + ".attn.out_proj.bias"]
        x = x + a
        h = ln(x, p + ".ln_2") @ sd[p + ".mlp.c_fc.weight"].T + sd[p + ".mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ sd[p + ".mlp.c_proj.weight"].T + sd[p + ".mlp.c_proj.bias"]
        outs.append(x)
    return outs


def test_converted_clip_matches_open_clip_blocks(tmp_path):
    sd = open_clip_state()
    ckpt = tmp_path / "unimed.pt"
    # the released layout: {"state_dict": {"module.visual...": ...}, "optimizer": ..., "epoch": numpy scalar}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": np.int64(3),
                "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(1e-4)}]}}, ckpt)
    report = convert_open_clip(ckpt, tmp_path / "clip", model="ViT-L-14-336-quickgelu", head_width=16)
    assert report["hidden_act"] == "quick_gelu"
    assert (report["hidden_size"], report["num_hidden_layers"], report["num_attention_heads"],
            report["patch_size"], report["image_size"]) == (WIDTH, LAYERS, HEADS, PATCH, GRID * PATCH)
    assert set(report["ignored_keys"]) == {"text_encoder.transformer.embeddings.word_embeddings.weight",
                                           "logit_scale", "visual.proj"}
    assert json.loads((tmp_path / "clip" / "medsight_convert.json").read_text())["hidden_act"] == "quick_gelu"

    hf = load_hf_vision(tmp_path / "clip").eval()
    images = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
    with torch.no_grad():
        hidden = hf(pixel_values=images, output_hidden_states=True).hidden_states
        ref = oracle_intermediates(sd, images)
    assert len(hidden) == LAYERS + 1
    for i in range(LAYERS):  # open_clip intermediate [i] == HF hidden_states[i + 1]
        assert (hidden[i + 1] - ref[i]).abs().max().item() <= 1e-4

    # vision.name=hf reads it; select_layer -2 = the penultimate block's patch tokens
    cfg = load_config("stage1", overrides=["vision.name=hf", f"vision.path={tmp_path / 'clip'}",
                                           f"data.image_size={GRID * PATCH}", "vision.select_layer=-2"])
    enc = build_vision(cfg).eval()
    with torch.no_grad():
        feats, pooled = enc(images)
    assert feats.shape == (2, GRID, GRID, WIDTH)
    torch.testing.assert_close(feats.reshape(2, -1, WIDTH), ref[-2][:, 1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, ref[-2][:, 0], atol=1e-4, rtol=1e-4)


def test_unmapped_key_is_an_error_naming_it(tmp_path):
    sd = open_clip_state()
    sd["visual.attn_pool.query"] = torch.zeros(4, WIDTH)  # an open_clip feature medsight does not convert
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(DataError, match="visual.attn_pool.query"):
        convert_open_clip(tmp_path / "bare.pt", tmp_path / "out", head_width=16)
    with pytest.raises(DataError, match="unknown open_clip model"):
        convert_open_clip(tmp_path / "bare.pt", tmp_path / "out", model="ViT-X")


def test_convert_cli(tmp_path, capsys):
    torch.save(open_clip_state(), tmp_path / "bare.pt")  # a bare state dict without module.
    assert main(["convert", "open-clip", str(tmp_path / "bare.pt"), "--out", str(tmp_path / "clip"),
                 "--model", "ViT-B-16", "--head-width", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hidden_act"] == "gelu" and out["ignored_keys"] == 3
    assert (tmp_path / "clip" / "config.json").is_file()
    assert main(["convert", "open-clip", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2
