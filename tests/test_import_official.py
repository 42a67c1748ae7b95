"""`medsight import official`: tiny files in the released layouts (REAL_FORMATS 5a/5b) become a stage-3
export that computes what the released model computes.

Built here: a Region Perceiver `.pt` ({"model", "ema", "optimizer", "steps", "args": Namespace}), an LLM
directory (`model_type: llava_qwen`, two safetensors shards with an index, Qwen3 keys + mm_projector +
token_projection + vision-tower copy + lightweight decoder, a Qwen-markup tokenizer whose added tokens are
the code tokens `[M{g}_{k}]` and which has no `<image>` token) and a UniMed-CLIP-style open_clip `.pt`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medsight.safeload import load_checkpoint
from tests.test_open_clip import oracle_intermediates
from tests.test_perceiver_reference import oracle, released_state

VW, VLAYERS, VPATCH, VGRID = 64, 2, 4, 4  # vision: width 64 (one 64-wide head), 16 px input, 4x4 patches
PDIM, PHEADS, PDH, PN, PSTAGES = 64, 2, 64, 5, 2  # perceiver at the reference's head width 64
GROUPS, CODES, HIDDEN = 4, 2, 32
RIGGED = "[M1_1]"  # the code token the rigged LLM always writes


def vision_pt(path: Path) -> dict:
    g = torch.Generator().manual_seed(3)

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    sd = {"visual.conv1.weight": r(VW, 3, VPATCH, VPATCH), "visual.class_embedding": r(VW),
          "visual.positional_embedding": r(VGRID * VGRID + 1, VW), "visual.proj": r(VW, 16), "logit_scale": r(1)[0]}
    for n in ("ln_pre", "ln_post"):
        sd.update({f"visual.{n}.weight": 1 + r(VW), f"visual.{n}.bias": r(VW)})
    for i in range(VLAYERS):
        p = f"visual.transformer.resblocks.{i}"
        sd.update({f"{p}.ln_1.weight": 1 + r(VW), f"{p}.ln_1.bias": r(VW), f"{p}.ln_2.weight": 1 + r(VW),
                   f"{p}.ln_2.bias": r(VW), f"{p}.attn.in_proj_weight": r(3 * VW, VW), f"{p}.attn.in_proj_bias": r(3 * VW),
                   f"{p}.attn.out_proj.weight": r(VW, VW), f"{p}.attn.out_proj.bias": r(VW),
                   f"{p}.mlp.c_fc.weight": r(4 * VW, VW), f"{p}.mlp.c_fc.bias": r(4 * VW),
                   f"{p}.mlp.c_proj.weight": r(VW, 4 * VW), f"{p}.mlp.c_proj.bias": r(VW)})
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": np.int64(1)}, path)
    return sd


def perceiver_pt(path: Path) -> dict:
    sd = released_state(num_stages=PSTAGES, seed=5, dim=PDIM, heads=PHEADS, dh=PDH, n=PN, c=17)
    full = {f"region_perceiver.{k}": v for k, v in sd.items()}
    ema = {**{k: v + 0.0 for k, v in full.items()}, "image_encoder.conv1.weight": torch.zeros(2)}
    model = {k: torch.zeros_like(v) for k, v in full.items()}  # `ema` must win over `model`
    ns = argparse.Namespace(num_stacks=1, use_self_attn=False, up_sample_mode="conv", num_queries=PN,
                            num_stages=PSTAGES, lr=np.float64(1e-4))
    torch.save({"model": model, "ema": ema, "optimizer": {"state": {}, "param_groups": []},
                "steps": 79280, "args": ns}, path)
    return sd


def released_tokenizer(path: Path):
    """A Qwen-markup BPE tokenizer (no <image> token) with the code tokens added, as the release has."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]+|\n|[^\S\n]+"),
                                             behavior="isolated")
    tok.decoder = decoders.Fuse()
    corpus = ["system\nYou are a helpful assistant.\n", "user\nWhere is the liver?\n", "assistant\nThe liver is here."]
    tok.train_from_iterator(corpus * 3, trainer=trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)
    codes = [f"[M{g}_{k}]" for g in range(GROUPS) for k in range(CODES)]
    fast.add_tokens(codes, special_tokens=True)
    fast.save_pretrained(str(path))
    (path / "added_tokens.json").write_text(json.dumps({c: fast.convert_tokens_to_ids(c) for c in codes}))
    return fast


def llm_dir(path: Path, drop: str | None = None) -> dict[str, torch.Tensor]:
    """The released LLM directory; returns the Qwen3 tensors (bf16, as released)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path.mkdir(parents=True)
    tok = released_tokenizer(path)
    fields = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=True, hidden_act="silu",
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    lm = Qwen3ForCausalLM(Qwen3Config(**fields, rope_theta=1e6))
    state = {k: v.detach().to(torch.bfloat16) for k, v in lm.state_dict().items()}
    # rig: the residual stream carries a large e_0 and the code token's output row reads it, so greedy
    # decoding always writes RIGGED (the logits stay those of a plain Qwen3 over the same tensors)
    for i in range(2):
        state[f"model.layers.{i}.self_attn.o_proj.bias"][0] = 30.0
    code_id = tok.convert_tokens_to_ids(RIGGED)
    state["lm_head.weight"][code_id, 0] = 50.0
    g = torch.Generator().manual_seed(1)
    extra = {"model.mm_projector.0.weight": torch.randn(HIDDEN, VW, generator=g) * 0.1,
             "model.mm_projector.0.bias": torch.zeros(HIDDEN), "model.mm_projector.2.weight": torch.randn(
                 HIDDEN, HIDDEN, generator=g) * 0.1, "model.mm_projector.2.bias": torch.zeros(HIDDEN),
             "model.token_projection.0.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.1,
             "model.token_projection.0.bias": torch.zeros(HIDDEN),
             "model.token_projection.2.weight": torch.randn(PDIM, HIDDEN, generator=g) * 0.1,
             "model.token_projection.2.bias": torch.zeros(PDIM),
             "model.vision_tower.vision_tower.region_perceiver.region_queries": torch.zeros(1, PN, PDIM),
             "model.mask_decoder.from_code.0.weight": torch.zeros(4, 4)}
    extra = {k: v.to(torch.bfloat16) for k, v in extra.items()}
    keys = sorted({**state, **extra})
    if drop:
        keys.remove(drop)
    everything = {**state, **extra}
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: everything[k].contiguous() for k in ks}, str(path / name))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    cfg = {**fields, "model_type": "llava_qwen", "architectures": ["RegSegForCausalLM"], "rope_theta": 1e6,
           "torch_dtype": "bfloat16", "mm_vision_select_layer": -2, "mm_hidden_size": VW,
           "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "/data/aofei/CLIP/unimed.pt", "use_sep_proj": False,
           "mm_patch_merge_type": "flat"}
    (path / "config.json").write_text(json.dumps(cfg))
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {"root": root, "vision": vision_pt(root / "unimed.pt"), "perceiver": perceiver_pt(root / "0079280.pt"),
            "llm": llm_dir(root / "medsight_full_instruct")}


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory):
    from medsight.interop.official import import_official

    out = tmp_path_factory.mktemp("imported") / "export"
    r = released["root"]
    report = import_official(r / "0079280.pt", r / "medsight_full_instruct", r / "unimed.pt", out, max_new_tokens=3)
    return out, report


def test_import_report_and_self_contained_export(imported, released):
    from medsight.export import load_component, read_export_config, read_meta

    out, report = imported
    meta = read_meta(out)
    assert meta["code_tokens"] == [f"[M{g}_{k}]" for g in range(GROUPS) for k in range(CODES)]
    assert report["vocab_rows_added"] == 0 and report["perceiver_entry"] == "ema"
    assert set(report["llm_unused"]) == {"model.vision_tower.vision_tower.region_perceiver.region_queries",
                                         "model.mask_decoder.from_code.0.weight"}
    assert report["select_layer"] == {"reference": -2, "hidden_states_index": -2}
    assert report["modality_groups"][:4] == ["CT (amos22)", "MRI (amos22)", "Ultrasound (BreastUS)",
                                             "Ultrasound (CAMUS)"] and report["placeholder_groups"] == []
    assert sorted(meta["components"]) == ["llm", "perceiver", "projector_t2v", "projector_v2t", "vision"]
    cfg = read_export_config(out)
    assert (cfg.perceiver.variant, cfg.data.preprocess, cfg.llm.generation_prompt) == ("reference", "clip", False)
    assert cfg.vision.path == "vision_config" and (out / "vision_config" / "config.json").is_file()
    assert cfg.llm.system_prompt == "You are a helpful assistant." and not (out / "_vision_converted").exists()
    text = (out / "config.yaml").read_text() + (out / "llm" / "config.json").read_text()
    assert str(released["root"]) not in text  # nothing points back at the released files
    assert load_component(out, "llm")["model.embed_tokens.weight"].dtype == torch.bfloat16  # kept as released
    assert len(json.loads((out / "llm.safetensors.index.json").read_text())["weight_map"]) == len(released["llm"])


def test_imported_parts_compute_the_released_model(imported, released):
    """LLM logits == a plain Qwen3 over the same shards; perceiver == the released forward; vision features
    == open_clip block -2; no vocabulary row added."""
    from transformers import AutoConfig, Qwen3Config, Qwen3ForCausalLM

    from medsight.model import load_joint

    out, _ = imported
    model, _, meta = load_joint(out)
    src = released["root"] / "medsight_full_instruct"
    raw = json.loads((src / "config.json").read_text())
    plain_dir = released["root"] / "plain_qwen3"  # the same shards beside a plain Qwen3 config
    plain_dir.mkdir(exist_ok=True)
    Qwen3Config(**{k: raw[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "attention_bias", "rope_theta")}
                ).save_pretrained(plain_dir)
    for f in src.glob("model*"):
        (plain_dir / f.name).write_bytes(f.read_bytes())
    plain = Qwen3ForCausalLM.from_pretrained(plain_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[1, 5, 9, 30, meta["code_ids"][3], 2]])
    with torch.no_grad():
        ours = model.causal_lm()(input_ids=ids).logits
        ref = plain(input_ids=ids).logits
    assert ours.shape == ref.shape == (1, 6, raw["vocab_size"])
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref)
    assert AutoConfig.from_pretrained(str(out / "llm")).model_type == "qwen3"

    feats = torch.randn(2, VGRID, VGRID, PDIM)
    q = torch.randn(2, 3, PDIM)
    with torch.no_grad():
        for queries in (None, q):
            got = model.perceiver(feats, queries)
            masks, cls, tokens, _ = oracle(released["perceiver"], feats, queries, num_stages=PSTAGES, heads=PHEADS,
                                           dh=PDH)
            for a, b in ((got["pred_masks"], masks), (got["pred_logits"], cls), (got["queries"], tokens)):
                assert (a - b).abs().max().item() <= 1e-3
        images = torch.randn(1, 3, VGRID * VPATCH, VGRID * VPATCH)
        vfeats, _ = model.vision(images)
        blocks = oracle_intermediates_at(released["vision"], images)
    torch.testing.assert_close(vfeats.reshape(1, -1, VW), blocks[-2][:, 1:], atol=1e-4, rtol=1e-4)


def oracle_intermediates_at(sd, images):
    import tests.test_open_clip as oc

    saved = (oc.WIDTH, oc.LAYERS, oc.HEADS, oc.PATCH, oc.GRID)
    oc.WIDTH, oc.LAYERS, oc.HEADS, oc.PATCH, oc.GRID = VW, VLAYERS, 1, VPATCH, VGRID
    try:
        return oracle_intermediates(sd, images)
    finally:
        oc.WIDTH, oc.LAYERS, oc.HEADS, oc.PATCH, oc.GRID = saved


def test_load_answer_and_predict_carry_released_code_names(imported, tmp_path, capsys):
    from PIL import Image

    import medsight
    from medsight.cli import main

    out, _ = imported
    model = medsight.load(out)
    image = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)  # non-square: centre crop
    ans = model.answer(image, "Where is the liver?")
    assert ans["text"] == RIGGED * 3 and [r["code"] for r in ans["regions"]] == [RIGGED] * 3
    for r in ans["regions"]:
        assert r["mask"].shape == (20, 30)
        assert not r["mask"][:, :5].any() and not r["mask"][:, 25:].any()  # outside the centre crop
    Image.fromarray(image).save(tmp_path / "scan.png")
    assert main(["predict", "--export", str(out), "--image", str(tmp_path / "scan.png"), "--question",
                 "Where is the liver?", "--out", str(tmp_path / "pred")]) == 0
    answer = json.loads((tmp_path / "pred" / "answer.json").read_text())
    assert [r["code"] for r in answer["regions"]] == [RIGGED] * 3


def test_reference_chat_format(imported):
    """System prompt, the reference template, no generation prompt; `<image>` is one placeholder id that
    needs no embedding row."""
    import medsight

    out, _ = imported
    lm = medsight.load(out).model
    enc = lm.tokenize([[{"from": "human", "value": "<image>\nWhere?"}]], generation_prompt=lm.generation_prompt)
    text = lm.tokenizer.decode(enc["input_ids"][0].tolist(), skip_special_tokens=False)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhere?<|im_end|>\n"
    assert lm.image_token_id >= lm.causal_lm().get_input_embeddings().num_embeddings
    assert lm.answer_text(lm.tokenizer.encode("<|im_start|>assistant\nYes<|im_end|>")) == "Yes"


def test_refusals_name_the_problem(released, tmp_path):
    from medsight.data import DataError
    from medsight.interop.official import group_names, import_official

    r = released["root"]
    perceiver_pt(tmp_path / "stacked.pt")
    bad = load_checkpoint(tmp_path / "stacked.pt")
    bad["args"].num_stacks, bad["args"].use_self_attn = 2, True
    torch.save(bad, tmp_path / "stacked.pt")
    with pytest.raises(DataError, match="num_stacks=2, use_self_attn=True"):
        import_official(tmp_path / "stacked.pt", r / "medsight_full_instruct", r / "unimed.pt", tmp_path / "o1")

    llm_dir(tmp_path / "llm_missing", drop="model.token_projection.2.weight")
    with pytest.raises(DataError, match="model.token_projection.2.weight"):
        import_official(r / "0079280.pt", tmp_path / "llm_missing", r / "unimed.pt", tmp_path / "o2")

    names, placeholders = group_names(18, "4=Fundus,17=Other")
    assert names[:5] == ["CT (amos22)", "MRI (amos22)", "Ultrasound (BreastUS)", "Ultrasound (CAMUS)", "Fundus"]
    assert names[9] == "Dermoscopy (UWaterlooSkinCancer)" and names[17] == "Other" and 5 in placeholders


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def test_pickle_that_would_run_code_is_refused(released, tmp_path):
    from medsight.interop.official import import_official
    from medsight.safeload import UnsafePickleError

    _RunsCode.marker = str(tmp_path / "ran")
    torch.save({"model": {}, "args": _RunsCode()}, tmp_path / "evil.pt")
    r = released["root"]
    with pytest.raises(UnsafePickleError, match="evil.pt.*system"):
        import_official(tmp_path / "evil.pt", r / "medsight_full_instruct", r / "unimed.pt", tmp_path / "o")
    assert not (tmp_path / "ran").exists()


def test_import_cli_user_error_is_one_line(released, tmp_path, capsys):
    from medsight.cli import main

    _RunsCode.marker = str(tmp_path / "ran")
    torch.save({"model": {}, "args": _RunsCode()}, tmp_path / "evil.pt")
    r = released["root"]
    assert main(["import", "official", "--perceiver", str(tmp_path / "evil.pt"), "--llm",
                 str(r / "medsight_full_instruct"), "--vision", str(r / "unimed.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medsight: error:") and "evil.pt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ran").exists()


def test_coding_new_data_uses_the_exports_code_names():
    """Grounded data coded for an imported export carries the released names, not the [C..] pattern."""
    from medsight.codes import code_namer, code_record
    from medsight.data.readers import Sample

    names = [f"[M{g}_{k}]" for g in range(GROUPS) for k in range(CODES)]
    rec = Sample(id="r", image="/d/a.png", modality=1, case="a", source="x", ann_ids=["7"])
    row = {"id": "r", "conversations": [{"from": "human", "value": "<image>\nSegment"},
                                        {"from": "gpt", "value": "Liver <mask>."}], "mask_orders": ["7"]}
    out = code_record("instruct", row, rec, {("/d/a.png", "7"): (1, 1)}, code_namer(names, CODES))
    assert out["conversations"][1]["value"] == "Liver [M1_1]." and out["codes"] == ["[M1_1]"]


@pytest.mark.slow  # ~30 s: a short instruct phase on the synthetic data
def test_stage3_fine_tunes_an_imported_export(released, synthetic_root, tmp_path):
    """stage3.init_from_joint: the instruct phase starts from the imported weights and keeps its format."""
    import medsight
    from medsight.cli import main as cli
    from medsight.export import load_component, read_export_config
    from stages.stage3 import main

    r = released["root"]  # group names as the fine-tuning data spells them (--groups)
    out = tmp_path / "imported"
    assert cli(["import", "official", "--perceiver", str(r / "0079280.pt"), "--llm", str(r / "medsight_full_instruct"),
                "--vision", str(r / "unimed.pt"), "--out", str(out), "--groups", "CT,MRI,X-Ray,Dermoscopy",
                "--max-new-tokens", "2"]) == 0
    main([f"data.root={synthetic_root}", f"out_root={tmp_path}", "run_name=ft", f"stage3.init_from_joint={out}",
          "stage3.phases=[instruct]", "stage3.instruct.max_steps=2", "stage3.val_batches=1", "stage3.test_batches=1",
          "stage3.max_new_tokens=2", "data.batch_size=2", "data.eval_batch_size=2", "trainer.accelerator=cpu",
          "trainer.enable_progress_bar=false"])
    final = tmp_path / "ft" / "stage3" / "export"
    cfg = read_export_config(final)
    assert (cfg.perceiver.variant, cfg.llm.generation_prompt, cfg.data.preprocess) == ("reference", False, "clip")
    before, after = load_component(out, "llm"), load_component(final, "llm")
    assert after["lm_head.weight"].dtype == torch.bfloat16
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the LLM trained
    assert torch.equal(load_component(out, "perceiver")["query_embed"], load_component(final, "perceiver")["query_embed"])
    assert [r["code"] for r in medsight.load(final).answer(np.zeros((16, 16, 3), np.uint8), "Where?")["regions"]]


def test_reference_sampling_settings(imported):
    """stage3.do_sample: HF-style repetition penalty over the generated ids, temperature, a draw."""
    import medsight

    lm = medsight.load(imported[0]).model
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    assert lm._next_token(logits, [[0]]).tolist() == [0]  # greedy when sampling is off
    lm.sampling = {"temperature": 1e-4, "repetition_penalty": 10.0}
    assert lm._next_token(logits, [[0]]).tolist() == [2]  # 2.0 / 10 < 0.5: the repeated token loses
    lm.sampling = {"temperature": 1e-4, "repetition_penalty": 1.0}
    assert lm._next_token(logits, [[0]]).tolist() == [0]


def test_released_codebook_assigns_codes_like_the_reference(released, tmp_path):
    """--codebook keeps the stage-2 quantiser; codes assigned with it = the nearest L2-normalised row of the
    image's group codebook to the L2-normalised to_code(query) (the reference's hard assignment)."""
    import torch.nn.functional as F

    from medsight.codes import assign_codes
    from medsight.interop.official import import_official
    from medsight.interop.reference_codebook import load_reference_quantizer
    from medsight.regions import Regions

    r = released["root"]
    g = torch.Generator().manual_seed(7)
    e = 16
    stage2 = load_checkpoint(r / "0079280.pt")  # our own test file
    quant = {f"quantizer.codebooks.{k}.embedding.weight": torch.randn(CODES, e, generator=g) for k in range(GROUPS)}
    quant.update({f"region_perceiver.to_code.{i}.{p}": torch.randn(*shape, generator=g) * 0.3
                  for i, shapes in ((0, {"weight": (PDIM, PDIM), "bias": (PDIM,)}),
                                    (2, {"weight": (PDIM,), "bias": (PDIM,)}), (3, {"weight": (e, PDIM), "bias": (e,)}),
                                    (5, {"weight": (e,), "bias": (e,)})) for p, shape in shapes.items()})
    quant.update({"modality_predictor.weight": torch.randn(GROUPS, VW, generator=g), "modality_predictor.bias":
                  torch.zeros(GROUPS), "quantizer.codebooks.0.ema_usage": torch.ones(CODES)})
    stage2["model"] = {**stage2["ema"], **quant}
    del stage2["ema"]
    torch.save(stage2, tmp_path / "0035673.pt")
    out = tmp_path / "export"
    import_official(r / "0079280.pt", r / "medsight_full_instruct", r / "unimed.pt", out,
                    codebook=tmp_path / "0035673.pt")
    q = load_reference_quantizer(out)
    queries = torch.randn(5, PDIM, generator=g)
    regions = [Regions(image=f"/d/{i}.png", id=str(i), group=i % GROUPS, split="train", pooled=torch.zeros(VW),
                       queries=queries[i:i + 1], pred_idx=torch.zeros(1, dtype=torch.long), labels=torch.ones(1),
                       ann_ids=["1"], is_union=torch.zeros(1, dtype=torch.bool)) for i in range(5)]
    got = assign_codes(q, regions)

    def to_code(x):  # Linear GELU LayerNorm Linear GELU LayerNorm, from the released tensors
        def w(i, p):
            return quant[f"region_perceiver.to_code.{i}.{p}"]
        h = F.layer_norm(F.gelu(x @ w(0, "weight").T + w(0, "bias")), (PDIM,), w(2, "weight"), w(2, "bias"))
        return F.layer_norm(F.gelu(h @ w(3, "weight").T + w(3, "bias")), (e,), w(5, "weight"), w(5, "bias"))

    for i, reg in enumerate(regions):
        book = F.normalize(quant[f"quantizer.codebooks.{reg.group}.embedding.weight"], dim=-1)
        want = int(torch.cdist(F.normalize(to_code(queries[i:i + 1]), dim=-1), book).argmin())
        assert got[(reg.image, "1")] == (reg.group, want)
