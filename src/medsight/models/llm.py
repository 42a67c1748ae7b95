"""Language models by name (SPEC sections 2 and 5): `tiny`, `hf`, `qwen3-8b`; the tiny tokenizer; code tokens.

LLM_BACKBONES maps `llm.name` to a factory `(cfg, tokenizer_dir, device) -> (causal LM, tokenizer)`:
- `tiny`: a Qwen3 causal LM built from cfg.llm (random weights) with a BPE tokenizer trained offline on the
  dataset's text corpus (`<data.root>/corpus.txt`) and cached in `tokenizer_dir`. The corpus is a closed,
  small vocabulary, so BPE ends up with one token per word (what the prototype's word-level vocabulary did)
  and still falls back to sub-words on unseen words.
- `hf`: any local Hugging Face causal-LM directory (`llm.path`: Qwen3, Qwen2, Llama, ...) with its own
  tokenizer and chat template, loaded offline.
- `qwen3-8b`: the Qwen3-8B architecture (SPEC section 2), weights from `llm.path` when given, else random
  (or no weights at all on the meta device, for `medsight.inspect`).

Code tokens `[C{g}_{k}]` (SPEC section 4) are added as special tokens (each exactly one id) by
`add_code_tokens`, which also resizes the embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

log = logging.getLogger("medsight")

IMAGE_TOKEN = "<image>"
IM_START, IM_END, PAD_TOKEN, UNK_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>"
SYSTEM_PROMPT = "You are a medical assistant."

#: Qwen chat markup (SPEC section 5); used by the tiny tokenizer. `hf` tokenizers keep their own template.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# pieces: words with their leading space, single digits, punctuation runs, newlines, other white space
_PRETOKENIZE = r" ?[A-Za-z]+| ?[0-9]| ?[^A-Za-z0-9\s]+|\n|[^\S\n]+"


# --------------------------------------------------------------------------------------- tokenizer
def train_tiny_tokenizer(corpus: list[str], vocab_size: int):
    """Train a BPE tokenizer on `corpus` lines with Qwen chat markup special tokens; returns a
    transformers PreTrainedTokenizerFast with the Qwen chat template. Decoding reproduces the text exactly
    (tokens carry their own leading space; `Fuse` decoder)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN, UNK_TOKEN]
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1,
                                  show_progress=False)
    fixed = [f"system\n{SYSTEM_PROMPT}\n", "user\n", "assistant\n"]  # the chat template's own text
    tok.train_from_iterator(fixed * 4 + list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
        extra_special_tokens=[IM_START, IMAGE_TOKEN], chat_template=QWEN_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, padding_side="left", model_max_length=1 << 20,
    )


def tiny_tokenizer(cfg: DictConfig, cache_dir: Path | str | None):
    """The tiny tokenizer: loaded from `cache_dir` when cached there, else trained on the corpus and saved."""
    from transformers import PreTrainedTokenizerFast

    if cache_dir is not None and (Path(cache_dir) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(cache_dir), local_files_only=True)
    corpus_path = Path(cfg.data.root) / "corpus.txt"
    if not corpus_path.is_file():
        raise FileNotFoundError(f"the tiny tokenizer trains on {corpus_path}, which is missing: run make data first")
    lines = [ln for ln in corpus_path.read_text().splitlines() if ln.strip()]
    tok = train_tiny_tokenizer(lines, cfg.llm.vocab_size)
    if cache_dir is not None:
        tok.save_pretrained(str(cache_dir))
    log.info("trained the tiny tokenizer on %s: %d tokens", corpus_path, len(tok))
    return tok


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    """A saved tokenizer directory (offline), left padding (generation pads on the left)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    return tok


def _prepare_tokenizer(tok):
    """Every tokenizer gets `<image>` as one special token, a pad token and left padding."""
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


# ------------------------------------------------------------------------------------------ models
def _qwen3(cfg_kwargs: dict, device: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**cfg_kwargs)
    with torch.device(device):
        return Qwen3ForCausalLM(config)


def build_tiny(cfg: DictConfig, tokenizer_dir: Path | str | None, device: str = "cpu"):
    """Small random Qwen3 (cfg.llm.hidden_size, num_layers, ...) + the tiny tokenizer."""
    llm = cfg.llm
    tok = _prepare_tokenizer(tiny_tokenizer(cfg, tokenizer_dir))
    model = _qwen3(dict(
        vocab_size=len(tok), hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        head_dim=llm.hidden_size // llm.num_heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=llm.tie_word_embeddings,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    ), device)
    return model, tok


def build_hf(cfg: DictConfig, tokenizer_dir: Path | str | None, device: str = "cpu"):
    """Any local causal-LM directory (`llm.path`) with its tokenizer; offline; remote code only if asked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not cfg.llm.path:
        raise ValueError("llm.name=hf needs llm.path (a local Hugging Face model directory)")
    path, trc = str(cfg.llm.path), bool(cfg.llm.trust_remote_code)
    tok = _prepare_tokenizer(load_tokenizer(tokenizer_dir if _has_tokenizer(tokenizer_dir) else path, trc))
    if device == "meta":
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trc)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trc)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=trc,
                                                     dtype=torch.float32)
    return model, tok


def qwen3_8b_config() -> dict:
    """Qwen3-8B (SPEC section 2)."""
    return dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, rms_norm_eps=1e-6,
                tie_word_embeddings=False, eos_token_id=151645, pad_token_id=151643, bos_token_id=None)


def build_qwen3_8b(cfg: DictConfig, tokenizer_dir: Path | str | None, device: str = "cpu"):
    """Qwen3-8B shape; weights and tokenizer from `llm.path` when given (no tokenizer on the meta device
    without a path: `medsight.inspect` only counts parameters)."""
    if cfg.llm.path and device != "meta":
        model, tok = build_hf(cfg, tokenizer_dir, device)
        return model, tok
    model = _qwen3(qwen3_8b_config(), device)
    tok = None
    if _has_tokenizer(tokenizer_dir) or cfg.llm.path:
        tok = _prepare_tokenizer(load_tokenizer(tokenizer_dir if _has_tokenizer(tokenizer_dir) else cfg.llm.path,
                                                bool(cfg.llm.trust_remote_code)))
    elif device != "meta":
        raise ValueError("llm.name=qwen3-8b needs llm.path (a local Qwen3-8B directory with its tokenizer)")
    return model, tok


def _has_tokenizer(d: Path | str | None) -> bool:
    return d is not None and (Path(d) / "tokenizer_config.json").is_file()


LLM_BACKBONES: dict[str, Callable] = {"tiny": build_tiny, "hf": build_hf, "qwen3-8b": build_qwen3_8b}


def build_llm(cfg: DictConfig, tokenizer_dir: Path | str | None = None, device: str = "cpu"):
    """(causal LM, tokenizer) for `cfg.llm.name`. `tokenizer_dir`: a saved tokenizer to reuse (the run
    directory's cache or an export's `tokenizer/`), else the backbone's own."""
    name = cfg.llm.name
    if name not in LLM_BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose from {sorted(LLM_BACKBONES)}")
    return LLM_BACKBONES[name](cfg, tokenizer_dir, device)


def list_llms() -> list[str]:
    return sorted(LLM_BACKBONES)


# ------------------------------------------------------------------------------------- code tokens
def add_code_tokens(model: torch.nn.Module, tokenizer, code_tokens: list[str]) -> list[int]:
    """Add the stage-2 code names as special tokens (one id each) and resize the embeddings to fit.
    Returns their ids in `code_tokens` order (modality-major: [C0_0], [C0_1], ...). Idempotent."""
    if tokenizer is not None:
        missing = [t for t in code_tokens if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids(list(code_tokens))
        for name, i in zip(code_tokens, ids):
            enc = tokenizer.encode(name, add_special_tokens=False)
            if enc != [i]:
                raise RuntimeError(f"code token {name} encodes to {enc}, not one id")
        # rows up to the last code id: a tokenizer-only placeholder (<image>) after them needs no row
        size = max(ids) + 1 if ids else 0
    else:  # meta-device inspection without a tokenizer: the new rows go after the existing vocabulary
        size = model.get_input_embeddings().num_embeddings + len(code_tokens)
        ids = list(range(size - len(code_tokens), size))
    if size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(size, mean_resizing=False)
    return list(ids)


@torch.no_grad()
def init_code_embeddings(model: torch.nn.Module, code_ids: list[int], vectors: torch.Tensor) -> None:
    """Initialise the code tokens' embedding rows (SPEC section 4b).

    Input rows = `vectors` (the stage-2 code embeddings W_m(codebook) pushed through the v->t projector,
    i.e. points in the space image tokens live in). Output rows: an untied lm_head gets the same directions
    rescaled to the mean norm of its other rows, so the first code logits are of ordinary size; a tied
    matrix gets that rescaled version for both roles (one tensor cannot be both).
    """
    ids = torch.as_tensor(code_ids, dtype=torch.long)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    other = torch.ones(emb.shape[0], dtype=torch.bool)
    other[ids] = False
    v = vectors.to(emb.dtype).to(emb.device)

    def rescaled(weight: torch.Tensor) -> torch.Tensor:
        target = weight[other].float().norm(dim=-1).mean()
        return (v.float() / v.float().norm(dim=-1, keepdim=True).clamp_min(1e-6) * target).to(weight.dtype)

    if tied:
        emb[ids] = rescaled(emb)
        return
    emb[ids] = v
    if out is not None:
        out.weight[ids] = rescaled(out.weight)


__all__ = [
    "IMAGE_TOKEN",
    "LLM_BACKBONES",
    "QWEN_CHAT_TEMPLATE",
    "SYSTEM_PROMPT",
    "add_code_tokens",
    "build_llm",
    "init_code_embeddings",
    "list_llms",
    "load_tokenizer",
    "qwen3_8b_config",
    "tiny_tokenizer",
    "train_tiny_tokenizer",
]
