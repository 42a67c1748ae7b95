"""The joint model (src/medsight/models/joint.py) and its export/inference (src/medsight/model.py), on small
random modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsight.config import load_config
from medsight.models import stage1_components
from medsight.models.chat import IGNORE
from medsight.models.joint import dice_bce
from medsight.models.phases import PHASES, row_masked_params, set_phase
from medsight.vocab import code_token

CORPUS = ["Is there a tumor in the liver?", "yes", "no", "Segment the liver.", "Sure, the liver is at <mask>.",
          "Describe this image.", "the liver and the kidney"] * 5
CODES = [code_token(g, k) for g in range(4) for k in range(4)]
SMALL = ["data.image_size=32", "vision.width=32", "vision.depth=1", "vision.patch_size=8", "perceiver.dim=32",
         "perceiver.num_queries=4", "perceiver.num_stages=1", "perceiver.heads=2", "perceiver.head_dim=16",
         "llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2", "llm.num_kv_heads=1", "llm.intermediate_size=64",
         "codebook.num_codes=4"]


def small_cfg(tmp_path, *overrides):
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS) + "\n")
    return load_config("stage3", overrides=[f"data.root={tmp_path}", *SMALL, *overrides])


def small_joint(tmp_path, *overrides):
    from medsight.model import build_joint

    torch.manual_seed(0)
    cfg = small_cfg(tmp_path, *overrides)
    comps = stage1_components(cfg)
    return build_joint(cfg, comps["vision"], comps["perceiver"], CODES, tmp_path / "tok"), cfg


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    return small_joint(tmp_path_factory.mktemp("joint"))[0]


def conv(answer: str, question: str = "Segment the liver.") -> list[dict]:
    return [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]


def test_sequence_left_padded_with_image_tokens(joint):
    convs = [conv("yes"), conv("Sure, the liver is at [C0_1] and [C1_2].", "Describe this image.")]
    tok = joint.tokenize(convs)
    b, t = tok["input_ids"].shape
    assert (tok["attention_mask"][:, -1] == 1).all() and (tok["attention_mask"][0, 0] == 0)  # left padding
    k = (-(-4 // joint.patch_pool)) ** 2 + 4  # pooled 4x4 patch grid (ceil mode) + 4 region tokens
    emb = torch.randn(b, k, 32)
    inp = joint.build_inputs(tok["input_ids"], tok["attention_mask"], emb, tok["labels"])
    assert inp["inputs_embeds"].shape == (b, t - 1 + k, 32)
    for i in range(b):
        img = (inp["token_ids"][i] == -1).nonzero().squeeze(1)
        assert len(img) == k and (img.diff() == 1).all()
        assert torch.equal(inp["inputs_embeds"][i, img], emb[i])
        assert (inp["labels"][i, img] == IGNORE).all()
        real = inp["attention_mask"][i].bool()
        assert torch.equal(inp["position_ids"][i, real], torch.arange(int(real.sum())))  # same positions padded or not
    assert int((inp["labels"] != IGNORE).sum()) == int((tok["labels"] != IGNORE).sum())


def test_code_states_gathered_at_own_positions(joint):
    """Hand-built batch: 2, 0 and 3 codes; states come from the exact positions where the code is the input."""
    ids = [joint.code_ids[i].item() for i in range(5)]
    pad = joint.tokenizer.pad_token_id
    token_ids = torch.tensor([[pad, 7, ids[0], 8, ids[1], 9],
                              [pad, pad, 7, 8, 9, 10],
                              [ids[2], ids[3], 5, ids[4], 6, 7]])
    hidden = torch.arange(3 * 6 * 2, dtype=torch.float).view(3, 6, 2)
    states, valid, cids = joint.code_states(hidden, token_ids)
    assert states.shape == (3, 3, 2)
    assert valid.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert torch.equal(states[0, :2], hidden[0, [2, 4]]) and torch.equal(states[2], hidden[2, [0, 1, 3]])
    assert (states[1] == 0).all() and cids[0, :2].tolist() == ids[:2] and cids[2].tolist() == ids[2:5]
    s0, v0, _ = joint.code_states(hidden[1:2], token_ids[1:2])  # a batch without any code
    assert s0.shape == (1, 0, 2) and v0.shape == (1, 0)


def test_dice_bce_empty_target_is_zero():
    logits = torch.randn(3, 8, 8)
    target = torch.zeros(3, 8, 8)
    target[1, :4] = 1
    dice, bce = dice_bce(logits, target)
    assert dice[0] == 0 and bce[0] == 0 and dice[2] == 0 and bce[2] == 0 and dice[1] > 0 and bce[1] > 0


def test_forward_ce_plus_mask_loss_zero_code_samples(joint):
    set_phase(joint, "instruct")
    convs = [conv("Sure, the liver is at [C0_1]."), conv("no", "Is there a tumor in the liver?"),
             conv("the liver [C0_1] and the kidney [C2_3].", "Describe this image.")]
    tok = joint.tokenize(convs)
    feats, regions = joint.encode_images(torch.randn(3, 3, 32, 32))
    masks = torch.zeros(3, 2, 32, 32)
    masks[0, 0, :8] = masks[2, 0, 8:16] = masks[2, 1, 16:] = 1
    valid = torch.tensor([[True, False], [False, False], [True, True]])
    out = joint(tok["input_ids"], tok["attention_mask"], tok["labels"], feats, regions, masks, valid)
    assert out["code_total"] == 3 and out["mask_loss"] > 0
    assert torch.allclose(out["loss"], out["ce"] + joint.mask_loss_weight * out["mask_loss"])
    out["loss"].backward()
    assert joint.projector_t2v.net[0].weight.grad.abs().sum() > 0  # mask loss reaches the t->v projector
    joint.zero_grad()
    out = joint(tok["input_ids"][1:2], tok["attention_mask"][1:2], tok["labels"][1:2], feats[1:2], regions[1:2],
                masks[1:2], valid[1:2])
    assert out["mask_loss"] == 0 and out["code_total"] == 0
    out["loss"].backward()


def test_generation_matches_full_forward_and_reforward_rule(joint):
    """Greedy KV-cache decoding == argmax of full teacher-forced forwards; the re-forward's code states are the
    training forward's states at the same positions, whether batched (padded) or alone."""
    joint.eval()
    feats, regions = joint.encode_images(torch.randn(2, 3, 32, 32))
    prompts = [conv("")[:1], [{"from": "human", "value": "<image>\nDescribe this image. Is there a tumor?"}]]
    prompt, gen = joint.generate(feats, regions, prompts, max_new_tokens=5)
    for i in range(2):
        seq = prompt["input_ids"][i][prompt["attention_mask"][i].bool()].tolist()
        for t in gen[i]:
            ids = torch.tensor([seq])
            inp = joint.build_inputs(ids, torch.ones_like(ids), joint.image_embeddings(feats[i:i + 1], regions[i:i + 1]))
            logits = joint.causal_lm().get_output_embeddings()(joint.hidden_states(inp)[:, -1])
            assert int(logits.argmax(-1)) == t
            seq.append(t)
    # one position rule: training forward vs inference re-forward on the same text
    convs = [conv("Sure, the liver is at [C0_1] and [C3_0]."), conv("no", "Is there a tumor in the liver?")]
    tok = joint.tokenize(convs)
    inp = joint.build_inputs(tok["input_ids"], tok["attention_mask"], joint.image_embeddings(feats, regions), tok["labels"])
    batched, valid, _ = joint.code_states(joint.hidden_states(inp), inp["token_ids"])
    alone = joint.tokenize(convs[:1])
    inp1 = joint.build_inputs(alone["input_ids"], alone["attention_mask"], joint.image_embeddings(feats[:1], regions[:1]))
    single, _, _ = joint.code_states(joint.hidden_states(inp1), inp1["token_ids"])
    assert valid[0].all() and torch.allclose(batched[0], single[0], atol=1e-5)
    joint.train()


def _train_step(model, phase):
    set_phase(model, phase)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    convs = [conv("Sure, the liver is at [C0_1]."), conv("the liver [C2_3].", "Describe this image.")]
    tok = model.tokenize(convs)
    feats, regions = model.encode_images(torch.randn(2, 3, 32, 32))
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, 0, :8] = 1
    out = model(tok["input_ids"], tok["attention_mask"], tok["labels"], feats, regions, masks, torch.ones(2, 1, dtype=torch.bool))
    out["loss"].backward()
    opt.step()
    opt.zero_grad()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}, before


def test_phase_trainable_sets(tmp_path):
    model, _ = small_joint(tmp_path)
    names = lambda: {n for n, p in model.named_parameters() if p.requires_grad}
    set_phase(model, "align")
    assert names() == {n for n, _ in model.named_parameters() if n.startswith("projector_v2t.")}
    set_phase(model, "instruct")
    assert names() == {n for n, _ in model.named_parameters() if n.startswith(("llm.", "projector_"))}
    # ground: t->v projector + the code tokens' rows of the input embedding and the (untied) lm_head, nothing else
    changed, before = _train_step(model, "ground")
    emb_name, head_name = "llm.model.embed_tokens.weight", "llm.lm_head.weight"
    assert names() == {n for n, _ in model.named_parameters() if n.startswith("projector_t2v.")} | {emb_name, head_name}
    assert changed - {emb_name, head_name} <= {n for n in changed if n.startswith("projector_t2v.")}
    rows = torch.zeros(model.causal_lm().get_input_embeddings().num_embeddings, dtype=torch.bool)
    rows[model.code_ids] = True
    for n in (emb_name, head_name):
        w = dict(model.named_parameters())[n]
        assert torch.equal(w[~rows], before[n][~rows]), f"{n}: a non-code row moved"
    assert not torch.equal(dict(model.named_parameters())[emb_name][rows], before[emb_name][rows])
    assert {id(p) for p in row_masked_params(model)} == {id(dict(model.named_parameters())[n]) for n in (emb_name, head_name)}
    assert not any(n.startswith(("vision.", "perceiver.")) for n in changed)
    assert set(PHASES) == {"align", "ground", "instruct", "instruct+lora"}


def test_lora_instruct_save_reload_equal(tmp_path):
    from medsight.model import MedSight, load_joint, save_joint
    from medsight.models.phases import apply_lora

    model, cfg = small_joint(tmp_path, "llm.lora.enabled=true", "llm.lora.r=4")
    lo = cfg.llm.lora
    apply_lora(model, lo.r, lo.alpha, lo.dropout, list(lo.target_modules))
    counts = set_phase(model, "instruct+lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and not any("base_layer" in n for n in trainable)
    assert counts["code_rows"] == len(CODES) * 32
    changed, _ = _train_step(model, "instruct+lora")
    assert any("lora_B" in n for n in changed) and any("embed_tokens" in n for n in changed)
    save_joint(model, tmp_path / "export", cfg, {"phase": "instruct"})
    assert (tmp_path / "export" / "llm_adapter.safetensors").is_file()
    loaded, _, meta = load_joint(tmp_path / "export")
    assert meta["lora"]["r"] == 4
    a, b = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert set(a) == set(b)
    for n, w in a.items():
        assert torch.equal(w, b[n]), n
    emb = lambda m: m.causal_lm().get_input_embeddings().weight[m.code_ids]
    assert torch.equal(emb(model), emb(loaded))
    assert torch.equal(model.causal_lm().lm_head.weight, loaded.causal_lm().lm_head.weight)
    ms = MedSight.load(tmp_path / "export")
    out = ms.answer(np.zeros((40, 50, 3), np.uint8), "Segment the liver.")
    assert isinstance(out["text"], str) and isinstance(out["regions"], list)


def test_full_export_answer_format(tmp_path):
    """medsight.load on a (random) full export: strict load, answer structure, masks at the input size."""
    import medsight
    from medsight.model import preprocess, regions_of, save_joint
    from medsight.models.joint import Prediction

    model, cfg = small_joint(tmp_path)
    save_joint(model, tmp_path / "export", cfg)
    ms = medsight.load(tmp_path / "export")
    for n, p in model.state_dict().items():
        assert torch.equal(p, ms.model.state_dict()[n]), n
    outs = ms.answer_batch([np.full((48, 40, 3), 120, np.uint8), np.zeros((32, 32, 3), np.uint8)], ["Describe this image.", "no"])
    assert len(outs) == 2 and all(set(o) == {"text", "regions"} for o in outs)
    pred = Prediction("the liver [C0_1]", [], ["[C0_1]"], torch.randn(1, 8, 8), torch.randn(1, 18))
    (r,) = regions_of(pred, (48, 40))
    assert set(r) == {"code", "class_name", "score", "box", "area", "image_index", "mask"}
    assert r["mask"].shape == (48, 40) and r["mask"].dtype == bool and 0 <= r["score"] <= 1
    assert r["area"] == int(r["mask"].sum()) and r["image_index"] == 0
    assert r["code"] == "[C0_1]" and r["class_name"] not in (None, "background")
    if r["mask"].any():
        x0, y0, x1, y1 = r["box"]
        assert r["mask"][y0:y1, x0:x1].sum() == r["mask"].sum()
    # multi-turn: the history is part of the prompt (same as a hand-built conversation through predict)
    img = np.full((48, 40, 3), 120, np.uint8)
    history = [{"from": "human", "value": "Describe this image."}, {"from": "gpt", "value": outs[0]["text"]}]
    follow = ms.answer(img, "Is there a tumor?", history=history)
    assert ms.answer([img], "Is there a tumor?", history=history)["text"] == follow["text"]
    x = preprocess([img], cfg.data.image_size, cfg.data.mean, cfg.data.std)
    conv = [{"from": "human", "value": "<image>\nDescribe this image."}, history[1],
            {"from": "human", "value": "Is there a tumor?"}]
    assert ms.model.predict(*ms.model.encode_images(x), [conv], ms.max_new_tokens)[0].text == follow["text"]
    with pytest.raises(ValueError, match="history is supported for one image, got 2"):
        ms.answer([img, img], "Compare them.", history=history)
    with pytest.raises(Exception, match="missing"):
        (tmp_path / "export" / "projector_t2v.safetensors").unlink()
        medsight.load(tmp_path / "export")


def test_region_schema_box_area_image_index():
    """A hand-made mask (rows 2-3, columns 1-5 of 8 x 8): box [x0, y0, x1, y1) end-exclusive, area, index."""
    from medsight.model import regions_of
    from medsight.models.joint import Prediction

    logits = torch.full((1, 8, 8), -5.0)
    logits[0, 2:4, 1:6] = 5.0
    pred = Prediction("[C1_0]", [], ["[C1_0]"], logits, torch.tensor([[0.0, 3.0] + [0.0] * 16]))
    (r,) = regions_of(pred, (8, 8), image_index=2)
    assert (r["box"], r["area"], r["image_index"], r["code"]) == ([1, 2, 6, 4], 10, 2, "[C1_0]")
    assert r["score"] == pytest.approx(float(torch.sigmoid(torch.tensor(5.0))))
    empty = Prediction("[C1_0]", [], ["[C1_0]"], torch.full((1, 8, 8), -5.0), torch.zeros(1, 18))
    (e,) = regions_of(empty, (8, 8))
    assert (e["box"], e["area"], e["score"]) == (None, 0, 0.0)


def test_conversation_history_rules():
    from medsight.model import conversation

    assert conversation("Q?") == [{"from": "human", "value": "<image>\nQ?"}]
    h = [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "yes [C0_1]"}]
    assert conversation("B?", h) == [{"from": "human", "value": "<image>\nA?"}, h[1], {"from": "human", "value": "B?"}]
    assert h[0]["value"] == "A?"  # the caller's history is not modified
    for bad, match in (([h[0]], "ends with a human turn"), ([h[1], h[0]], "alternate"),
                       ([{"from": "human", "text": "x"}, h[1]], "turn 0")):
        with pytest.raises(ValueError, match=match):
            conversation("B?", bad)


def test_inference_imports_no_lightning():
    import subprocess
    import sys

    code = "import sys, medsight, medsight.model; medsight.model.MedSight; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_set_dropout_reaches_every_attention_layer_and_image_tokens(tmp_path):
    """Dropout comes from the running config even when the weights come from an earlier phase's export: it
    changes training outputs (not eval ones) and every attention layer reads the new rate."""
    model, _ = small_joint(tmp_path)
    model.set_dropout(attention=0.3, image=0.5)
    attn = [m for m in model.llm.modules() if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float)]
    assert attn and all(m.attention_dropout == 0.3 for m in attn)
    assert model.causal_lm().config.attention_dropout == 0.3
    feats, regions = model.encode_images(torch.randn(2, 3, 32, 32))
    model.eval()
    a, b = model.image_embeddings(feats, regions), model.image_embeddings(feats, regions)
    assert torch.equal(a, b)
    model.train()
    c = model.image_embeddings(feats, regions)
    assert (c == 0).float().mean() > 0.3 and not torch.equal(a, c)
    model.set_dropout(attention=0.0, image=0.0)
    assert torch.equal(model.image_embeddings(feats, regions), a)
