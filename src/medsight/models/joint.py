"""The joint model (SPEC sections 1 and 5): frozen vision encoder + frozen Region Perceiver, the v->t and t->v
projectors, and a causal LM whose vocabulary holds the region-code tokens.

Sequence: Qwen chat markup; the `<image>` placeholder in the first user turn expands to [patch tokens;
region tokens] through the v->t projector. Batches are LEFT padded everywhere (training, generation and the
teacher-forced re-forward), with position ids = cumulative attention mask - 1, so a token sees the same
positions whichever way it is batched. Only assistant turns (content + end-of-turn token) are supervised.

The one position rule (training AND inference): a code token's mask comes from the final-layer hidden state
at the position where that code token is the INPUT (its own position). Inference generates greedily, then
runs ONE teacher-forced forward over prompt + answer and reads the states there (`predict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medsight.models.chat import IGNORE, encode_conversation, left_pad
from medsight.models.decode import decode_step
from medsight.models.llm import IMAGE_TOKEN, SYSTEM_PROMPT
from medsight.models.projectors import TextToVision, VisionToText


# -------------------------------------------------------------------------------------- mask loss
def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Dice and BCE (n, H, W) -> (n,), (n,); an empty target contributes 0 to both (SPEC 5). In
    float32: fp16/bf16 mask sums over many pixels overflow or lose precision."""
    logits, target = logits.float(), target.float()
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(1), t, reduction="none").mean(-1)
    nonempty = (t.sum(-1) > 0).to(logits.dtype)
    return dice * nonempty, bce * nonempty


def dice_score(pred: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dice of binary masks (..., H, W) -> (...,), (2|P&G| + eps) / (|P| + |G| + eps) (SPEC section 7)."""
    p, g = pred.flatten(-2).float(), gt.flatten(-2).float()
    return (2 * (p * g).sum(-1) + eps) / (p.sum(-1) + g.sum(-1) + eps)


# ------------------------------------------------------------------------------------ joint model
@dataclass
class Prediction:
    """One answer: generated text and ids, and per emitted code its name, mask logits and class logits."""

    text: str
    token_ids: list[int]
    codes: list[str]
    mask_logits: torch.Tensor  # (M, h, w)
    class_logits: torch.Tensor  # (M, C + 1)
    image_index: list[int] = field(default_factory=list)  # per code: the image it was decoded on ([] = all 0)


class MedSightLM(nn.Module):
    """Vision encoder + Region Perceiver (both frozen) + projectors + causal LM with code tokens.

    Submodule names are the export's component names: `vision`, `perceiver`, `projector_v2t`,
    `projector_t2v`, `llm`.
    """

    def __init__(self, vision: nn.Module, perceiver: nn.Module, llm: nn.Module, tokenizer, code_tokens: list[str],
                 code_ids: list[int], d_enc: int, d_perc: int, separate_projectors: bool = False,
                 mask_loss_weight: float = 1.0, max_length: int | None = None, patch_pool: int = 1,
                 patch_pool_mode: str = "avg", system_prompt: str | None = SYSTEM_PROMPT) -> None:
        super().__init__()
        hidden = llm.config.hidden_size
        self.vision, self.perceiver, self.llm = vision, perceiver, llm
        self.projector_v2t = VisionToText(d_enc, d_perc, hidden, separate=separate_projectors)
        self.projector_t2v = TextToVision(hidden, d_perc)
        self.tokenizer = tokenizer
        self.code_tokens = list(code_tokens)
        self.mask_loss_weight = mask_loss_weight
        self.max_length = max_length
        self.patch_pool, self.patch_pool_mode = patch_pool, patch_pool_mode
        self.system_prompt = system_prompt or None
        self.image_dropout = 0.0  # training-time only: set_dropout
        # False: the reference's prompt (no "<|im_start|>assistant\n"; the model writes it, stripped after)
        self.generation_prompt = True
        self.sampling: dict[str, float] | None = None  # {"temperature", "repetition_penalty"}; None: greedy
        self.direct_decode = True  # cached steps through models.decode where the LLM's layout allows
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if tokenizer is not None else -1
        self.register_buffer("code_ids", torch.as_tensor(code_ids, dtype=torch.long), persistent=False)
        self._row_hooks: list[Any] = []
        self._row_params: list[nn.Parameter] = []
        self._tok_cache: dict[str, tuple[list[int], list[int]]] = {}

    # ----------------------------------------------------------------------------- pieces
    def causal_lm(self) -> nn.Module:
        """The Hugging Face causal LM (through a peft wrapper when LoRA is on)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def is_code(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(ids, self.code_ids)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen stage-1 outputs: patch features (B, H', W', D) and region tokens (B, N, d)."""
        feats, _ = self.vision(images)
        regions = self.perceiver(feats)["queries"]
        return feats, regions

    def image_embeddings(self, feats: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """[patch tokens; region tokens] in LLM space (B, P + R, h); P = (H'/patch_pool) x (W'/patch_pool)."""
        if self.patch_pool > 1:
            k = self.patch_pool
            pool = F.max_pool2d if self.patch_pool_mode == "max" else F.avg_pool2d
            feats = pool(feats.permute(0, 3, 1, 2), k, ceil_mode=True).permute(0, 2, 3, 1)  # (B, H'/k, W'/k, D)
        emb = self.projector_v2t(feats.flatten(1, 2), regions)
        return F.dropout(emb, self.image_dropout, self.training) if self.image_dropout else emb

    def set_dropout(self, attention: float, image: float) -> None:
        """Training-time regularisation from the running config (a phase loaded from an earlier export keeps
        that export's weights, not its dropout): attention dropout in every LLM attention layer (the Qwen/Llama
        families read `attention_dropout` at each forward) and dropout on the projected image tokens."""
        self.image_dropout = float(image)
        self.causal_lm().config.attention_dropout = float(attention)
        for m in self.llm.modules():
            if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
                m.attention_dropout = float(attention)

    def tokenize(self, conversations: list[list[dict]], generation_prompt: bool = False) -> dict[str, torch.Tensor]:
        """Left-padded input_ids, attention_mask, labels for a list of conversations (memoised per text)."""
        seqs, labs = [], []
        for conv in conversations:
            key = repr((conv, generation_prompt))
            if key not in self._tok_cache:
                self._tok_cache[key] = encode_conversation(self.tokenizer, conv, generation_prompt, self.max_length,
                                                             self.system_prompt)
            ids, lab = self._tok_cache[key]
            seqs.append(ids)
            labs.append(lab)
        ids, mask = left_pad(seqs, self.tokenizer.pad_token_id)
        labels, _ = left_pad(labs, IGNORE)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def build_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                     labels: torch.Tensor | None = None,
                     image_counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Expand each `<image>` id into its image's P + R embeddings, keeping left padding.

        Without `image_counts`: image_embeds (B, K, h), one `<image>` per sample at most. With it (B,):
        image_embeds (N, K, h) for N = sum(image_counts) images in sample order, and sample b's k-th `<image>`
        takes its k-th image (the counts must match). Returns inputs_embeds (B, L, h), attention_mask (B, L),
        position_ids (B, L), labels (B, L) and token_ids (B, L) (-1 at image positions, pad id on padding)."""
        b, t = input_ids.shape
        k = image_embeds.shape[1]
        is_img = input_ids == self.image_token_id  # (B, T)
        if image_counts is None and (is_img.sum(1) > 1).any():
            raise ValueError("each sample may hold one <image> placeholder (pass image_counts for several)")
        if image_counts is not None and not torch.equal(is_img.sum(1).cpu(), torch.as_tensor(image_counts).cpu()):
            raise ValueError(f"<image> placeholders per sample {is_img.sum(1).tolist()} differ from the images "
                             f"given {torch.as_tensor(image_counts).tolist()}")
        width = torch.where(is_img, k, 1)
        ends = width.cumsum(1)  # (B, T) exclusive end in the expanded sequence
        length = int(ends[:, -1].max()) if t else 0
        starts = ends - width + (length - ends[:, -1:])  # shift right: left padding
        # the <image> placeholder needs no embedding row (imported vocabularies have none for it)
        tok_embeds = self.causal_lm().get_input_embeddings()(input_ids.masked_fill(is_img, 0))  # (B, T, h)
        embeds = tok_embeds.new_zeros(b, length, tok_embeds.shape[-1])
        mask = attention_mask.new_zeros(b, length)
        out_labels = input_ids.new_full((b, length), IGNORE)
        token_ids = input_ids.new_full((b, length), self.tokenizer.pad_token_id if self.tokenizer else 0)
        bi, ti = (~is_img).nonzero(as_tuple=True)
        pos = starts[bi, ti]
        embeds[bi, pos] = tok_embeds[bi, ti]
        mask[bi, pos] = attention_mask[bi, ti]
        token_ids[bi, pos] = input_ids[bi, ti]
        if labels is not None:
            out_labels[bi, pos] = labels[bi, ti]
        bi, ti = is_img.nonzero(as_tuple=True)  # row-major: sample by sample, placeholders in text order
        if len(bi):
            pos = starts[bi, ti, None] + torch.arange(k, device=input_ids.device)  # (n, K)
            src = bi if image_counts is None else torch.arange(len(bi), device=input_ids.device)
            embeds[bi[:, None], pos] = image_embeds[src].to(embeds.dtype)
            mask[bi[:, None], pos] = 1
            token_ids[bi[:, None], pos] = -1
        position_ids = (mask.cumsum(1) - 1).clamp_min(0)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids,
                "labels": out_labels, "token_ids": token_ids}

    def hidden_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final-layer hidden states (B, L, h) (after the final norm, as the lm_head sees them)."""
        out = self.causal_lm().model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                                     position_ids=inputs["position_ids"], use_cache=False)
        return out.last_hidden_state

    def code_states(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states at each code token's own position, in order: (B, M, h), validity (B, M) and the code
        ids (B, M) (M = most codes in any sample; samples may have none)."""
        is_code = self.is_code(token_ids)  # (B, L)
        counts = is_code.sum(1)
        m = int(counts.max()) if is_code.numel() else 0
        b = hidden.shape[0]
        states = hidden.new_zeros(b, m, hidden.shape[-1])
        valid = torch.zeros(b, m, dtype=torch.bool, device=hidden.device)
        ids = token_ids.new_full((b, m), -1)
        bi, ti = is_code.nonzero(as_tuple=True)
        rank = (is_code.cumsum(1) - 1)[bi, ti]
        states[bi, rank] = hidden[bi, ti]
        valid[bi, rank] = True
        ids[bi, rank] = token_ids[bi, ti]
        return states, valid, ids

    def code_image_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Per code (B, M), in code order (as code_states): the sample-local index of the image whose
        `<image>` block last precedes it (0 when none does). token_ids (B, L) as build_inputs returns them."""
        img = token_ids == -1
        start = img & ~torch.cat([img.new_zeros(img.shape[0], 1), img[:, :-1]], 1)  # first position of a block
        before = (start.long().cumsum(1) - 1).clamp_min(0)  # (B, L)
        is_code = self.is_code(token_ids)
        m = int(is_code.sum(1).max()) if is_code.numel() else 0
        out = token_ids.new_zeros(token_ids.shape[0], m)
        bi, ti = is_code.nonzero(as_tuple=True)
        out[bi, (is_code.long().cumsum(1) - 1)[bi, ti]] = before[bi, ti]
        return out

    def decode_masks_on(self, states: torch.Tensor, valid: torch.Tensor, image_of_code: torch.Tensor,
                        feats: torch.Tensor, first_image: torch.Tensor) -> dict[str, torch.Tensor]:
        """decode_masks where sample b's codes may belong to different images: the codes of each (sample,
        image) pair are decoded together on that image's features (feats (N, H', W', D); the image of code
        (b, m) is feats[first_image[b] + image_of_code[b, m]]). Returns pred_masks (B, M, h', w') and
        pred_logits (B, M, C + 1) in code order (zeros where not valid)."""
        b, m = valid.shape
        pairs = sorted({(i, int(image_of_code[i, j])) for i, j in valid.nonzero().tolist()})
        if not pairs:
            dec = self.decode_masks(states[:0], feats[:0])
            return {"pred_masks": dec["pred_masks"].new_zeros(b, m, *dec["pred_masks"].shape[2:]),
                    "pred_logits": dec["pred_logits"].new_zeros(b, m, dec["pred_logits"].shape[-1])}
        width = max(int((valid[i] & (image_of_code[i] == k)).sum()) for i, k in pairs)
        rows = states.new_zeros(len(pairs), width, states.shape[-1])  # (R, M', h) codes of one image per row
        where = []
        for r, (i, k) in enumerate(pairs):
            js = (valid[i] & (image_of_code[i] == k)).nonzero().squeeze(1)
            rows[r, : len(js)] = states[i, js]
            where.append((i, js))
        idx = torch.as_tensor([int(first_image[i]) + k for i, k in pairs], device=feats.device)
        dec = self.decode_masks(rows, feats[idx])
        masks = dec["pred_masks"].new_zeros(b, m, *dec["pred_masks"].shape[2:])
        logits = dec["pred_logits"].new_zeros(b, m, dec["pred_logits"].shape[-1])
        for r, (i, js) in enumerate(where):
            masks[i, js] = dec["pred_masks"][r, : len(js)]
            logits[i, js] = dec["pred_logits"][r, : len(js)]
        return {"pred_masks": masks, "pred_logits": logits}

    def decode_masks(self, states: torch.Tensor, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Code hidden states (B, M, h) -> t->v -> perceiver decode on each image's features:
        pred_masks (B, M, h', w') logits and pred_logits (B, M, C + 1)."""
        weight = next(self.projector_t2v.parameters())
        queries = self.projector_t2v(states.to(weight.dtype))  # (B, M, d); a bf16 LLM beside fp32 projectors
        out = self.perceiver(feats.to(queries.dtype), queries=queries)
        return {"pred_masks": out["pred_masks"], "pred_logits": out["pred_logits"]}

    # ----------------------------------------------------------------------------- training
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                feats: torch.Tensor, regions: torch.Tensor, masks: torch.Tensor | None = None,
                mask_valid: torch.Tensor | None = None,
                image_counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Teacher-forced loss: CE over supervised tokens + mask_loss_weight x (Dice + BCE) of the masks
        decoded at code positions, the i-th code paired with the i-th mask of `mask_orders`. With
        `image_counts` (B,), feats/regions hold every sample's images in order (see build_inputs) and each
        code's mask is decoded on the image whose `<image>` last precedes it."""
        inputs = self.build_inputs(input_ids, attention_mask, self.image_embeddings(feats, regions), labels,
                                   image_counts)
        hidden = self.hidden_states(inputs)  # (B, L, h)
        target = inputs["labels"][:, 1:]
        sel = target != IGNORE
        logits = self.causal_lm().get_output_embeddings()(hidden[:, :-1][sel])  # (n, V) supervised only
        tgt = target[sel]
        ce = F.cross_entropy(logits.float(), tgt) if len(tgt) else hidden.sum() * 0
        out = {"ce": ce}
        with torch.no_grad():
            hit = logits.argmax(-1) == tgt
            code = self.is_code(tgt)
            out["token_acc"] = hit.float().mean() if len(tgt) else ce.new_zeros(())
            out["code_correct"], out["code_total"] = (hit & code).sum(), code.sum()
        mask_loss = ce.new_zeros(())
        if masks is not None and mask_valid is not None and masks.shape[1] > 0:
            states, valid, _ = self.code_states(hidden, inputs["token_ids"])
            m = min(states.shape[1], masks.shape[1])
            pair = valid[:, :m] & mask_valid[:, :m]  # (B, m) code i <-> mask i
            rows = pair.any(1)
            if pair.any() and image_counts is None:
                dec = self.decode_masks(states[rows, :m], feats[rows])["pred_masks"]  # (b, m, h', w')
            elif pair.any():
                counts = torch.as_tensor(image_counts, device=feats.device)
                first = counts.cumsum(0) - counts
                img_of = self.code_image_index(inputs["token_ids"])[:, :m]
                dec = self.decode_masks_on(states[rows, :m], valid[rows, :m], img_of[rows], feats,
                                           first[rows])["pred_masks"]  # (b, m, h', w')
            if pair.any():
                gt = masks[rows, :m].to(dec.dtype)
                if gt.shape[-2:] != dec.shape[-2:]:
                    dec = F.interpolate(dec, size=gt.shape[-2:], mode="bilinear", align_corners=False)
                p = pair[rows]
                dice, bce = dice_bce(dec[p], gt[p])
                mask_loss = (dice + bce).mean()
                out["mask_dice"] = dice_score(dec[p].detach() > 0, gt[p] > 0.5).mean()
        if not torch.is_tensor(mask_loss) or mask_loss.grad_fn is None:
            # keep every trainable projector in the graph (DDP expects each parameter to get a gradient)
            # (through the module's forward, not its parameters: FSDP2 only gathers weights inside forward)
            weight = next(self.projector_t2v.parameters())
            mask_loss = mask_loss + 0.0 * self.projector_t2v(hidden[:, :1].to(weight.dtype)).sum()
        out["mask_loss"] = mask_loss
        out["loss"] = ce + self.mask_loss_weight * mask_loss
        return out

    # ---------------------------------------------------------------------------- inference
    def stop_ids(self) -> list[int]:
        """End-of-turn ids that stop generation (eos and <|im_end|> where the vocabulary has it)."""
        ids = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        return sorted(i for i in ids if i is not None and i != self.tokenizer.unk_token_id)

    @torch.no_grad()
    def generate(self, feats: torch.Tensor, regions: torch.Tensor, conversations: list[list[dict]],
                 max_new_tokens: int = 48,
                 image_counts: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """Greedy decoding (deterministic) with a KV cache; with `self.sampling` the reference's sampling
        (repetition penalty on the generated ids, then temperature). Returns the tokenised prompts and the
        generated ids per sample (up to and including the end-of-turn token). image_counts: as in build_inputs."""
        from transformers import DynamicCache

        lm = self.causal_lm()
        prompt = self.tokenize(conversations, generation_prompt=self.generation_prompt)
        prompt = {k: v.to(feats.device) for k, v in prompt.items()}
        inputs = self.build_inputs(prompt["input_ids"], prompt["attention_mask"], self.image_embeddings(feats, regions),
                                   image_counts=image_counts)
        stop = torch.as_tensor(self.stop_ids(), device=feats.device)
        cache = DynamicCache(config=lm.config)
        logits = lm(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                    position_ids=inputs["position_ids"], cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        mask, pos = inputs["attention_mask"], inputs["position_ids"][:, -1:]
        step = decode_step(lm, direct=self.direct_decode)
        padded = not bool(mask.all())  # new tokens are never padding: decided once
        b = len(conversations)
        done = torch.zeros(b, dtype=torch.bool, device=feats.device)
        generated: list[list[int]] = [[] for _ in range(b)]
        for _ in range(max_new_tokens):
            nxt = self._next_token(logits, generated)  # (B,)
            for i in range(b):
                if not done[i]:
                    generated[i].append(int(nxt[i]))
            done |= torch.isin(nxt, stop)
            if done.all():
                break
            if padded:
                mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
            pos = pos + 1
            logits = step(nxt, pos, mask if padded else None, cache)
        return prompt, generated

    def _next_token(self, logits: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        """Greedy argmax, or the reference's sampling: HF-style repetition penalty over the ids generated so
        far (the prompt is embeddings there), temperature, multinomial draw."""
        if not self.sampling:
            return logits.argmax(-1)
        logits = logits.float().clone()
        penalty = float(self.sampling.get("repetition_penalty", 1.0))
        for i, ids in enumerate(generated):
            if ids and penalty != 1.0:
                idx = torch.as_tensor(sorted(set(ids)), device=logits.device)
                row = logits[i, idx]
                logits[i, idx] = torch.where(row < 0, row * penalty, row / penalty)
        probs = (logits / max(float(self.sampling.get("temperature", 1.0)), 1e-5)).softmax(-1)
        return torch.multinomial(probs, 1).squeeze(1)

    def answer_text(self, ids: list[int]) -> str:
        """The decoded answer without stop tokens; without a generation prompt also without the
        "<|im_start|>assistant\n" the model writes first."""
        stop_ids = set(self.stop_ids())
        text = self.tokenizer.decode([t for t in ids if t not in stop_ids], skip_special_tokens=False)
        if not self.generation_prompt:
            for head in ("<|im_start|>assistant\n", "assistant\n"):
                if text.startswith(head):
                    return text[len(head):]
        return text

    @torch.no_grad()
    def predict(self, feats: torch.Tensor, regions: torch.Tensor, conversations: list[list[dict]],
                max_new_tokens: int = 48, image_counts: torch.Tensor | None = None) -> list[Prediction]:
        """Generate, then ONE teacher-forced forward over prompt + answer; decode a mask for each emitted
        code from the hidden state at its own position (the training rule). With image_counts (several
        images per sample, see build_inputs) each code is decoded on the image whose `<image>` last precedes
        it and Prediction.image_index says which."""
        prompt, generated = self.generate(feats, regions, conversations, max_new_tokens, image_counts)
        n_prompt = self.is_code(prompt["input_ids"]).sum(1).tolist()  # codes already in the prompt (history)
        rows = [i for i, g in enumerate(generated) if bool(self.is_code(torch.as_tensor(g, dtype=torch.long,
                                                                                           device=feats.device)).any())]
        found: dict[int, tuple] = {}
        if rows:  # the teacher-forced re-forward, only for answers that emitted codes
            seqs = [[int(t) for t, a in zip(prompt["input_ids"][i].tolist(), prompt["attention_mask"][i].tolist()) if a]
                    + generated[i] for i in rows]
            ids, am = left_pad(seqs, self.tokenizer.pad_token_id)
            if image_counts is None:
                inputs = self.build_inputs(ids.to(feats.device), am.to(feats.device),
                                           self.image_embeddings(feats[rows], regions[rows]))
            else:
                counts = torch.as_tensor(image_counts, device=feats.device)
                first = (counts.cumsum(0) - counts).tolist()
                sel = torch.as_tensor([first[i] + k for i in rows for k in range(int(counts[i]))], device=feats.device)
                inputs = self.build_inputs(ids.to(feats.device), am.to(feats.device),
                                           self.image_embeddings(feats[sel], regions[sel]), image_counts=counts[rows])
            states, valid, code_ids = self.code_states(self.hidden_states(inputs), inputs["token_ids"])
            img_of = self.code_image_index(inputs["token_ids"])
            if image_counts is None:
                decoded = self.decode_masks(states, feats[rows])
            else:
                local = counts[rows].cumsum(0) - counts[rows]
                decoded = self.decode_masks_on(states, valid, img_of, feats[sel], local)
            for r, i in enumerate(rows):
                j = valid[r].nonzero().squeeze(1)[n_prompt[i]:]  # this answer's codes, in order
                found[i] = (self.tokenizer.convert_ids_to_tokens(code_ids[r][j].tolist()),
                            decoded["pred_masks"][r][j], decoded["pred_logits"][r][j], img_of[r][j].tolist())
        preds = []
        for i, gen in enumerate(generated):
            text = self.answer_text(gen)
            if i in found:
                preds.append(Prediction(text, gen, *found[i]))
            else:
                preds.append(Prediction(text, gen, [], feats.new_zeros(0, 1, 1), feats.new_zeros(0, 1)))
        return preds

    # ------------------------------------------------------------------------------ state io
    def llm_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Export components of the LLM: `llm` (plain causal-LM state dict: base weights incl. the resized
        embeddings) and, with LoRA, `llm_adapter` (LoRA weights + the code-token embedding rows + lm_head)."""
        if not hasattr(self.llm, "get_base_model"):
            return {"llm": self.llm.state_dict()}
        from peft import get_peft_model_state_dict

        base = {}
        for k, v in self.llm.get_base_model().state_dict().items():
            if "lora_" in k:
                continue
            base[k.replace(".base_layer.", ".")] = v
        adapter = {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.llm).items()}
        lm = self.causal_lm()
        adapter["code_rows.embed_tokens"] = lm.get_input_embeddings().weight[self.code_ids]
        adapter["lm_head.weight"] = lm.get_output_embeddings().weight
        return {"llm": base, "llm_adapter": adapter}

    def load_llm_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of `llm_state` (strict: any missing or unexpected key is an error naming it)."""
        base = states["llm"]
        if hasattr(self.llm, "get_base_model"):
            raise RuntimeError("load the base weights before wrapping the LLM with LoRA")
        _strict_load(self.llm, base, "llm")
        if "llm_adapter" in states:
            raise RuntimeError("call apply_lora(...) then load_adapter_state(...) for the adapter")

    def load_adapter_state(self, adapter: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        lora = {k[len("lora."):]: v for k, v in adapter.items() if k.startswith("lora.")}
        want = {k for k in self.llm.state_dict() if "lora_" in k}
        res = set_peft_model_state_dict(self.llm, lora)
        if res.unexpected_keys:
            raise RuntimeError(f"llm_adapter: unexpected keys {res.unexpected_keys[:8]}")
        missing = {k.replace(".default", "") for k in want} - set(lora)
        if missing:
            raise RuntimeError(f"llm_adapter: missing LoRA weights {sorted(missing)[:8]}")
        lm = self.causal_lm()
        with torch.no_grad():
            lm.get_input_embeddings().weight[self.code_ids] = adapter["code_rows.embed_tokens"]
            lm.get_output_embeddings().weight.copy_(adapter["lm_head.weight"])


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shape = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        raise RuntimeError(f"component '{name}': missing {missing[:8]}, unexpected {unexpected[:8]}, "
                           f"shape mismatches {sorted(shape)[:8]}")
    module.load_state_dict(state, strict=True)


def joint_components(cfg) -> dict[str, Any]:
    """Parts of the joint model for `medsight.inspect` (built on the current default device, e.g. meta):
    vision, perceiver, llm (with the code tokens added), projector_v2t, projector_t2v, code_tokens (count)."""
    from medsight.models import stage1_components
    from medsight.models.llm import add_code_tokens, build_llm
    from medsight.vocab import code_token

    comps = stage1_components(cfg)
    llm, tok = build_llm(cfg, None, device=str(torch.get_default_device()))
    codes = [code_token(g, k) for g in range(cfg.codebook.num_groups) for k in range(cfg.codebook.num_codes)]
    add_code_tokens(llm, tok, codes)
    h = llm.config.hidden_size
    return {**comps, "llm": llm,
            "projector_v2t": VisionToText(comps["vision"].out_dim, cfg.perceiver.dim, h, cfg.llm.separate_projectors),
            "projector_t2v": TextToVision(h, cfg.perceiver.dim), "code_tokens": len(codes)}


__all__ = [
    "MedSightLM",
    "Prediction",
    "dice_bce",
    "dice_score",
    "joint_components",
]
