"""The direct decoding step (models.decode) against Hugging Face's own forward, the oracle: the same logits
step after step from the same prefilled cache, for every layout it claims (Qwen3 with grouped-query attention
and per-head norms, Qwen2 with projection biases, Llama with scaled rotary positions), with left padding and
with LoRA adapters; and a fallback to Hugging Face's forward for what it does not claim."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from medsight.models.decode import direct_step, unsupported
from tests.test_joint import small_joint

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def qwen3(**kw):
    return Qwen3ForCausalLM(Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16, **kw))


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2))  # q/k/v projections with biases


def llama():
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=4, rope_scaling={
        "rope_type": "linear", "factor": 2.0}))


def with_lora(lm):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapters an effect
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return peft.get_base_model()


def prefill(lm, ids, mask):
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=lm.config)
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]
    return logits, cache, pos[:, -1:]


def left_padded(batch: int, length: int, pads: list[int]):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, SMALL["vocab_size"], (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
        ids[i, :p] = 0
    return ids, mask


@pytest.mark.parametrize("build", [qwen3, qwen2, llama, lambda: with_lora(qwen3())],
                         ids=["qwen3", "qwen2-bias", "llama-linear-rope", "qwen3-lora"])
@pytest.mark.parametrize("pads", [[0], [0, 3, 7]], ids=["batch1", "left-padded"])
@torch.no_grad()
def test_direct_step_gives_hugging_faces_logits(build, pads):
    torch.manual_seed(0)
    lm = build().eval()
    step = direct_step(lm)
    assert step is not None, unsupported(lm)
    ids, mask = left_padded(len(pads), 12, pads)
    ref_logits, ref_cache, pos = prefill(lm, ids, mask)
    logits, cache, _ = prefill(lm, ids, mask)
    padded = any(pads)
    for _ in range(10):
        nxt = ref_logits.argmax(-1)
        mask = torch.cat([mask, mask.new_ones(len(pads), 1)], 1)
        pos = pos + 1
        ref_logits = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=ref_cache,
                        use_cache=True).logits[:, -1]
        logits = step(nxt, pos, mask if padded else None, cache)
        assert logits.shape == ref_logits.shape
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for layer in range(lm.config.num_hidden_layers):  # the caches grew alike
        torch.testing.assert_close(cache.layers[layer].keys, ref_cache.layers[layer].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.layers[layer].values, ref_cache.layers[layer].values, atol=1e-5, rtol=1e-5)


def test_what_it_does_not_claim_falls_back_to_hugging_face():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    assert "gpt2" in unsupported(gpt2) and direct_step(gpt2) is None
    sliding = qwen3(use_sliding_window=True, sliding_window=8, max_window_layers=0).eval()
    assert unsupported(sliding) == "sliding-window attention" and direct_step(sliding) is None
    training = qwen3().train()
    assert "training" in unsupported(training)


def test_generate_decodes_the_same_tokens_either_way(tmp_path):
    """MedSightLM.generate with the direct step and with Hugging Face's forward: the same greedy tokens for a
    padded batch of prompts of different lengths, and for one prompt alone (no mask)."""
    model, cfg = small_joint(tmp_path)
    model.eval()
    feats, regions = model.encode_images(torch.randn(3, 3, cfg.data.image_size, cfg.data.image_size))
    convs = [[{"from": "human", "value": "<image>\n" + q}] for q in
             ("Is there a tumor?", "Describe this image in detail, region by region.", "Where is the liver?")]
    assert direct_step(model.causal_lm()) is not None
    _, direct = model.generate(feats, regions, convs, max_new_tokens=12)
    model.direct_decode = False
    _, hf = model.generate(feats, regions, convs, max_new_tokens=12)
    assert direct == hf and all(len(g) > 0 for g in direct)
    _, hf_alone = model.generate(feats[1:2], regions[1:2], convs[1:2], max_new_tokens=12)
    model.direct_decode = True
    _, direct_alone = model.generate(feats[1:2], regions[1:2], convs[1:2], max_new_tokens=12)
    assert direct_alone == hf_alone and len(direct_alone[0]) > 0
