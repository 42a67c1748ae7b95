"""Exports describe themselves: stages 2 and 3 take the architecture from the export they start from."""

from __future__ import annotations

import json
import time

import pytest

from medsight.config import ConfigError, load_config

SMALL_LLM = ["llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2", "llm.num_kv_heads=1",
             "llm.intermediate_size=64"]
FAST3 = ["stage3.align.max_steps=1", "stage3.ground.max_steps=1", "stage3.instruct.max_steps=2",
         "stage3.val_batches=1", "stage3.test_batches=1", "stage3.max_new_tokens=4"]
RUN = ["data.batch_size=4", "data.eval_batch_size=8", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]


def tiny_clip_dir(path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     patch_size=8, image_size=32, hidden_act="quick_gelu")).save_pretrained(path)
    return path


def test_explicit_contradiction_names_both_values(tmp_path):
    from medsight.export import save_export
    from medsight.handoff import explicit_keys, inherit_from_export
    from medsight.models import stage1_components

    s1 = load_config("stage1", overrides=["vision.width=32", "vision.depth=1", "perceiver.dim=32", "perceiver.heads=2",
                                          "perceiver.head_dim=16", "data.image_size=64", "vision.select_layer=-2"])
    save_export(tmp_path / "e", s1, stage1_components(s1))
    cfg = load_config("stage2", overrides=["perceiver.dim=32"])
    changed = inherit_from_export(cfg, tmp_path / "e", explicit_keys([], ["perceiver.dim=32"]))
    assert (cfg.vision.width, cfg.vision.select_layer, cfg.data.image_size) == (32, -2, 64)
    assert "vision.width" in changed and "perceiver.dim" not in changed
    overlay = tmp_path / "o.yaml"
    overlay.write_text("vision:\n  select_layer: -1\n")
    cfg = load_config("stage2", overlays=[str(overlay)], overrides=["data.image_size=128"])
    with pytest.raises(ConfigError) as err:
        inherit_from_export(cfg, tmp_path / "e", explicit_keys([str(overlay)], ["data.image_size=128"]))
    msg = str(err.value)
    assert f"vision.select_layer: export -2 vs overlay {overlay} -1" in msg
    assert "data.image_size: export 64 vs command line 'data.image_size=128' 128" in msg


@pytest.mark.slow  # ~22 s on a shared 2-core CPU
def test_hf_stage1_then_stage2_and_stage3_without_overrides(synthetic_root, tmp_path):
    """stage 1 with vision.name=hf vision.path=... data.image_size=32; stages 2 and 3 repeat none of it."""
    from medsight.export import read_export_config, read_meta
    from stages.stage1 import main as stage1
    from stages.stage2 import main as stage2
    from stages.stage3 import main as stage3

    clip = tiny_clip_dir(tmp_path / "clip")
    common = [f"data.root={synthetic_root}", f"out_root={tmp_path}", "run_name=hf", *RUN]
    t0 = time.time()
    stage1([*common, "trainer.fast_dev_run=true", "vision.name=hf", f"vision.path={clip}", "data.image_size=32",
            "vision.select_layer=-2", "perceiver.dim=32", "perceiver.heads=2", "perceiver.head_dim=16",
            "perceiver.num_queries=4"])
    stage2([*common, "trainer.fast_dev_run=true", "codebook.num_codes=4", "codebook.code_dim=16"])
    stage3([*common, *SMALL_LLM, *FAST3])
    run = tmp_path / "hf"
    for stage in ("stage2", "stage3"):
        cfg = read_export_config(run / stage / "export")
        assert (cfg.vision.name, cfg.vision.path, cfg.vision.select_layer, cfg.data.image_size) == (
            "hf", str(clip), -2, 32), stage
        assert (cfg.perceiver.dim, cfg.perceiver.num_queries) == (32, 4)
    assert read_export_config(run / "stage3" / "export").codebook.num_codes == 4
    assert len(read_meta(run / "stage3" / "export")["code_tokens"]) == 4 * 4
    assert json.loads((run / "stage3" / "metrics.json").read_text())["wall_time_s"] > 0
    assert time.time() - t0 < 120
    # an explicit contradiction at a later stage fails naming both values
    with pytest.raises(ConfigError, match=r"data.image_size: export 32 vs command line 'data.image_size=64' 64"):
        stage2([*common, "trainer.fast_dev_run=true", "data.image_size=64"])
