"""LLM backbones, tokenizers and code tokens (src/medsight/models/llm.py)."""

from __future__ import annotations

import pytest
import torch

from medsight.config import load_config
from medsight.models.chat import IGNORE, encode_conversation
from medsight.models.llm import (
    LLM_BACKBONES,
    SYSTEM_PROMPT,
    add_code_tokens,
    build_llm,
    init_code_embeddings,
    qwen3_8b_config,
    train_tiny_tokenizer,
)
from medsight.vocab import code_token

CORPUS = ["Is there a tumor in the liver?", "Yes, there is a tumor in the liver.", "Segment the left kidney.",
          "Sure, the left kidney is at <mask>.", "What organ is shown in this image?", "liver and kidney", "no"] * 5
CODES = [code_token(g, k) for g in range(4) for k in range(32)]


@pytest.fixture(scope="module")
def tiny_tok():
    return train_tiny_tokenizer(CORPUS, 256)


def _cfg(tmp_path, *overrides):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    return load_config("stage3", overrides=[f"data.root={tmp_path}", *overrides])


def test_unknown_backbone_names_choices(tmp_path):
    cfg = _cfg(tmp_path, "llm.name=gpt9")
    with pytest.raises(ValueError, match=r"unknown backbone 'gpt9'; choose from \['hf', 'qwen3-8b', 'tiny'\]"):
        build_llm(cfg)
    assert set(LLM_BACKBONES) == {"tiny", "hf", "qwen3-8b"}


def test_tiny_tokenizer_chat_markup_and_cache(tmp_path):
    cfg = _cfg(tmp_path)
    model, tok = build_llm(cfg, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()  # cached in the run directory
    assert model.config.model_type == "qwen3" and model.config.hidden_size == cfg.llm.hidden_size
    for special in ("<|im_start|>", "<|im_end|>", "<image>", "<|endoftext|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\nIs there a tumor?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>\nIs there a tumor?<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert "input_ids" in enc  # transformers 5: a dict
    ids = tok.encode("Yes, there is a tumor in the liver.", add_special_tokens=False)
    assert tok.decode(ids) == "Yes, there is a tumor in the liver."  # exact round trip
    assert len(ids) <= 10  # closed corpus -> one token per word
    _, tok2 = build_llm(cfg, tmp_path / "tok")  # reloaded from the cache, same vocabulary
    assert tok2.get_vocab() == tok.get_vocab()


def _check_one_id(tok):
    for name in CODES:
        assert len(tok.encode(name, add_special_tokens=False)) == 1, name
    in_context = "the liver[C0_3] and the kidney [C3_31].[C2_0][C2_1]"
    pieces = tok.convert_ids_to_tokens(tok.encode(in_context, add_special_tokens=False))
    assert [p for p in pieces if p.startswith("[C")] == ["[C0_3]", "[C3_31]", "[C2_0]", "[C2_1]"]


def test_code_tokens_one_id_each_tiny(tiny_tok):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tiny_tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    ids = add_code_tokens(model, tiny_tok, CODES)
    assert len(set(ids)) == len(CODES) == 128
    assert model.get_input_embeddings().num_embeddings >= len(tiny_tok) > max(ids)
    _check_one_id(tiny_tok)
    assert add_code_tokens(model, tiny_tok, CODES) == ids  # idempotent


def test_code_tokens_one_id_each_byte_level_bpe():
    """A real byte-level BPE vocabulary (GPT-2/Qwen style), trained here: no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS + ["[C0_1] C0 _ [ ] 31 3_1"] * 5,
                            trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                special_tokens=["<|endoftext|>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    assert len(tok.encode("[C0_3]", add_special_tokens=False)) > 1  # split before adding
    tok.add_tokens(CODES, special_tokens=True)
    _check_one_id(tok)


def test_assistant_only_labels(tiny_tok):
    conv = [{"from": "human", "value": "<image>\nIs there a tumor in the liver?"}, {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": "Segment the liver."}, {"from": "gpt", "value": "the liver"}]
    ids, labels = encode_conversation(tiny_tok, conv)
    supervised = tiny_tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert supervised == "Yes<|im_end|>the liver<|im_end|>"
    assert SYSTEM_PROMPT in tiny_tok.decode(ids)
    assert all(lab == IGNORE or lab == i for i, lab in zip(ids, labels))


def test_hf_backbone_loads_local_dir_offline(tmp_path, tiny_tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path / "qwen2"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tiny_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(d)
    tiny_tok.save_pretrained(d)
    cfg = _cfg(tmp_path, "llm.name=hf", f"llm.path={d}")
    model, tok = build_llm(cfg)
    assert model.config.model_type == "qwen2" and tok.chat_template and tok.padding_side == "left"
    with pytest.raises(ValueError, match="needs llm.path"):
        build_llm(_cfg(tmp_path, "llm.name=hf"))


def test_qwen3_8b_shape_on_meta(tmp_path):
    cfg = _cfg(tmp_path, "llm.name=qwen3-8b")
    with torch.device("meta"):
        model, tok = build_llm(cfg, device="meta")
        add_code_tokens(model, tok, [code_token(g, k) for g in range(18) for k in range(32)])
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.rope_parameters["rope_theta"], c.tie_word_embeddings) == \
        (4096, 36, 32, 8, 128, 12288, 1e6, False)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 8.19e9) < 0.02e9, n
    assert model.get_input_embeddings().num_embeddings == qwen3_8b_config()["vocab_size"] + 576


@pytest.mark.parametrize("tied", [False, True])
def test_code_embedding_init_keeps_heads_consistent(tiny_tok, tied):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = train_tiny_tokenizer(CORPUS, 256)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         tie_word_embeddings=tied))
    ids = add_code_tokens(model, tok, CODES)
    vec = torch.randn(len(ids), 32) * 5
    init_code_embeddings(model, ids, vec)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) == tied
    cos = torch.nn.functional.cosine_similarity(head[ids], vec, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)  # same directions in lm_head
    other = head[: min(ids)].norm(dim=-1).mean()
    assert torch.allclose(head[ids].norm(dim=-1).mean(), other, rtol=1e-3)  # logits of ordinary size
    if not tied:
        assert torch.equal(emb[ids], vec)  # input rows: the projected code embeddings themselves


def test_inspect_stage3_paper_scale_on_meta():
    """`python -m medsight.inspect stage3 stages/configs/paper.yaml`: Qwen3-8B + projectors + 576 code tokens."""
    from medsight.config import CONFIG_DIR
    from medsight.inspect import component_sizes

    sizes = component_sizes(load_config("stage3", [str(CONFIG_DIR / "paper.yaml")]))
    assert abs(sizes["llm"] - 8.2e9) < 0.05e9
    assert sizes["projector_v2t"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert abs(sizes["projector_t2v"] - 21.0e6) < 0.05e6
    assert sizes["code_tokens"] == 576
