"""Vision backbones by name: shapes, select_layer, the unknown-name error, Hugging Face directory round trips,
and the paper-scale encoder/perceiver sizes via `python -m medsight.inspect` (meta device)."""

from __future__ import annotations

import json

import pytest
import torch

from medsight.config import load_config
from medsight.models.backbones import VISION_BACKBONES, build_vision


def cfg_for(*overrides):
    return load_config("stage1", overrides=["data.image_size=32", *overrides])


@pytest.mark.parametrize("arch, batch", [("conv", 1), ("conv", 3), ("vit", 2)])
def test_tiny_shapes(arch, batch):
    enc = build_vision(cfg_for("vision.name=tiny", f"vision.tiny_arch={arch}", "vision.width=32", "vision.depth=2",
                               "vision.patch_size=8"))
    feats, pooled = enc(torch.randn(batch, 3, 32, 32))
    assert (enc.out_dim, enc.grid) == (32, 4)
    assert feats.shape == (batch, 4, 4, 32) and pooled.shape == (batch, 32)


def test_select_layer_picks_block():
    cfg = cfg_for("vision.width=32", "vision.depth=3", "vision.select_layer=-2")
    enc = build_vision(cfg)
    x = torch.randn(2, 3, 32, 32)
    h = enc.stem(x).permute(0, 2, 3, 1)
    for blk in enc.blocks[:2]:
        h = blk(h)
    torch.testing.assert_close(enc(x)[0], h)
    with pytest.raises(ValueError, match="select_layer"):
        build_vision(cfg_for("vision.width=32", "vision.depth=3", "vision.select_layer=-4"))(x)


def test_unknown_backbone():
    with pytest.raises(ValueError, match=r"unknown backbone 'nope'; choose from \["):
        build_vision(cfg_for("vision.name=nope"))
    assert {"tiny", "hf", "clip-vit-l14-336"} <= set(VISION_BACKBONES)


def test_hf_needs_a_directory(tmp_path):
    with pytest.raises(ValueError, match="vision.path"):
        build_vision(cfg_for("vision.name=hf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_vision(cfg_for("vision.name=hf", f"vision.path={tmp_path}"))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_directory_round_trip(tmp_path, kind):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 32, "patch_size": 8}
    model = (CLIPVisionModel(CLIPVisionConfig(**common)) if kind == "clip"
             else SiglipVisionModel(SiglipVisionConfig(**common)))
    model.save_pretrained(tmp_path)
    enc = build_vision(cfg_for("vision.name=hf", f"vision.path={tmp_path}", "vision.select_layer=-1"))
    x = torch.randn(2, 3, 32, 32)
    feats, pooled = enc(x)
    assert (enc.out_dim, enc.grid) == (32, 4)
    assert feats.shape == (2, 4, 4, 32) and pooled.shape == (2, 32)
    # the weights really came from the directory, and -1 is the last block before post-layernorm
    torch.testing.assert_close(enc.model.state_dict(), model.state_dict())
    model.eval()
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    if kind == "clip":  # CLIP's last_hidden_state is the last block's output (post-LN only on the pooled CLS)
        got = feats.detach()
    else:  # SigLIP applies post_layernorm to last_hidden_state; our features are taken before it
        with torch.no_grad():
            got = getattr(model, "vision_model", model).post_layernorm(feats)
        ref = ref.clone()
    tokens = ref[:, 1:] if kind == "clip" else ref
    torch.testing.assert_close(got, tokens.reshape(2, 4, 4, 32), atol=1e-5, rtol=1e-4)


def test_clip_l14_336_architecture():
    with torch.device("meta"):
        enc = build_vision(load_config("stage1", overrides=["vision.name=clip-vit-l14-336", "data.image_size=336"]))
    c = enc.model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (1024, 24, 16, 4096)
    assert (c.patch_size, c.image_size, c.hidden_act) == (14, 336, "quick_gelu")
    assert (enc.out_dim, enc.grid) == (1024, 24)


def test_inspect_paper_scale(capsys):
    from medsight.config import CONFIG_DIR
    from medsight.inspect import main

    main(["stage1", str(CONFIG_DIR / "paper.yaml")])
    sizes = json.loads(capsys.readouterr().out)
    assert set(sizes) >= {"vision", "perceiver"}
    assert 100e6 <= sizes["perceiver"] <= 106e6
    assert 300e6 <= sizes["vision"] <= 306e6  # CLIP ViT-L/14 vision tower
