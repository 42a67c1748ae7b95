"""The text side of the joint model (SPEC section 5): LLaVA-style turns -> chat messages, one conversation
rendered with the tokenizer's chat template into (input_ids, labels) with only assistant turns supervised
(content + end-of-turn token; everything else IGNORE), and the left padding every batch uses.
"""

from __future__ import annotations

import torch

from medsight.models.llm import SYSTEM_PROMPT

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(conversation: list[dict], system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """LLaVA turns [{"from": "human"|"gpt", "value"}] -> chat messages with a system prompt."""
    msgs = [{"role": "system", "content": system}] if system else []
    for turn in conversation:
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"conversation turn with unknown speaker {turn.get('from')!r}")
        msgs.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return msgs


def encode_conversation(tokenizer, conversation: list[dict], generation_prompt: bool = False,
                        max_length: int | None = None, system: str | None = SYSTEM_PROMPT) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation rendered with the tokenizer's chat template. Labels keep the
    tokens of assistant contents plus the end-of-turn token that follows each; everything else is -100.
    `generation_prompt=True` renders the prompt for the next assistant turn (no labels needed)."""
    msgs = to_messages(conversation, system)
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    spans, pos = [], 0
    for m in msgs:
        start = text.find(m["content"], pos)
        if start < 0:
            raise ValueError(f"chat template dropped a message: {m['content'][:60]!r}")
        pos = start + len(m["content"])
        if m["role"] == "assistant":
            spans.append((start, pos))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    specials = set(tokenizer.all_special_ids)
    for a, b in spans:
        inside = [j for j, (s, e) in enumerate(offsets) if s < b and e > a]
        for j in inside:
            labels[j] = ids[j]
        nxt = (inside[-1] + 1) if inside else next((j for j, (s, _) in enumerate(offsets) if s >= b), len(ids))
        if nxt < len(ids) and ids[nxt] in specials:  # the end-of-turn token (<|im_end|>, <|eot_id|>)
            labels[nxt] = ids[nxt]
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) left-padded ids and attention mask."""
    t = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, t - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, t - len(s):] = 1
    return ids, mask


__all__ = [
    "IGNORE",
    "ROLES",
    "encode_conversation",
    "left_pad",
    "to_messages",
]
