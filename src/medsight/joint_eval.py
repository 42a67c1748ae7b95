"""Generation-based metrics of the joint model on a split of the synthetic/instruction data (stage 3's
per-phase validation and final test metrics): VQA closed accuracy and open recall, code-token accuracy and
grounded Dice, DiagSeg recall and Dice. `medsight.evaluate` scores prediction FILES by the official protocols;
this module runs the model on the DataModule's batches directly.
"""

from __future__ import annotations

import re

import torch

from medsight.joint_data import CodedText, FeatureCache
from medsight.models.joint import dice_score
from medsight.multi_image import image_prompt

NAMES_TARGET = re.compile(r"\b(segment|where is) the\b", re.IGNORECASE)  # "Segment the liver.", "Where is the heart?"


def _masks_at(pred_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(M, h, w) logits -> (M, H, W) bool at the target size (bilinear, logit > 0)."""
    if pred_logits.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.bool)
    up = torch.nn.functional.interpolate(pred_logits[None].float(), size=size, mode="bilinear", align_corners=False)
    return up[0] > 0


@torch.no_grad()
def evaluate(model, features: FeatureCache, cfg, split: str, coded: CodedText, phase: str | None = None,
             max_batches: int | None = None) -> dict[str, float]:
    """Generation-based metrics on `split` (fractions in [0, 1]), with greedy decoding:
    - VQA: closed accuracy and open recall (medsight.metrics.vqa, official protocol; `_strict` too);
    - grounding dialogues: teacher-forced code-token accuracy; grounded Dice = mean Dice of the masks decoded
      from GENERATED codes, on turns whose question names the target ("Segment the X", "Where is the X"),
      the i-th emitted mask against the i-th mask of that turn (a missing one scores 0);
    - DiagSeg (test, or phase None): diagnosis recall and Dice (medsight.metrics.diagseg: mean over emitted
      masks per item, items with a target but no emitted mask score 0).
    `phase` picks what is meaningful after it (align: VQA; ground: grounding; instruct/None: all)."""
    from medsight.data.datamodule import MedicalDataModule
    from medsight.metrics.diagseg import diagnosis_recall, item_dice
    from medsight.metrics.vqa import answer_kind, score_vqa

    was_training = model.training
    model.eval()
    new = int(cfg.stage3.max_new_tokens)
    res: dict[str, float] = {}

    def batches(dm):
        for i, b in enumerate(getattr(dm, f"{split}_dataloader")()):
            if max_batches is not None and i >= max_batches:
                return
            yield b

    if phase in (None, "align", "instruct"):
        items = []
        for b in batches(MedicalDataModule(cfg, "vqa")):
            counts = b.get("image_counts")  # several images per sample: one <image> each
            feats, regions = features(model, b["images"] if counts is not None else b["image"])
            ns = [1] * len(b["question"]) if counts is None else counts.tolist()
            convs = [[{"from": "human", "value": image_prompt(q, n)}] for q, n in zip(b["question"], ns)]
            for p, a, t in zip(model.predict(feats, regions, convs, new, image_counts=counts), b["answer"],
                               b["answer_type"]):
                items.append((answer_kind(t), a, p.text))
        for proto in ("official", "strict"):
            sc = score_vqa(items, proto)
            sfx = "" if proto == "official" else "_strict"
            res[f"closed_accuracy{sfx}"], res[f"open_recall{sfx}"] = sc.closed_accuracy / 100, sc.open_recall / 100
    if phase in (None, "ground", "instruct"):
        correct = total = 0
        dices: list[float] = []
        for b in batches(MedicalDataModule(cfg, "instruct", sources=("instruct",))):
            convs, keep = coded.conversations(b)
            counts = b.get("image_counts")  # several images per sample (PubMedVision-style rows)
            feats, regions = features(model, b["images"] if counts is not None else b["image"])
            tok = model.tokenize(convs)
            out = model(tok["input_ids"], tok["attention_mask"], tok["labels"], feats, regions, image_counts=counts)
            first = list(range(len(convs))) if counts is None else (counts.cumsum(0) - counts).tolist()
            correct, total = correct + int(out["code_correct"]), total + int(out["code_total"])
            prompts, rows, targets = [], [], []
            for i, conv in enumerate(convs):
                seen = 0
                for j in range(1, len(conv), 2):
                    n = int(model.is_code(torch.as_tensor(model.tokenizer.encode(conv[j]["value"],
                                                                                 add_special_tokens=False))).sum())
                    if n and keep[i] and NAMES_TARGET.search(conv[j - 1]["value"]) and \
                            (counts is None or int(counts[i]) == 1):
                        prompts.append(conv[:j])
                        rows.append(i)
                        targets.append(b["masks"][i, seen:seen + n] > 0.5)
                        break
                    seen += n
            if prompts:
                sel = [first[i] for i in rows]
                preds = model.predict(feats[sel], regions[sel], prompts, new)
                for p, gt in zip(preds, targets):
                    em = _masks_at(p.mask_logits, tuple(gt.shape[-2:]))
                    for k in range(len(gt)):
                        dices.append(float(dice_score(em[k], gt[k])) if k < len(em) else 0.0)
        res["code_accuracy"] = correct / max(total, 1)
        res["grounded_dice"] = sum(dices) / max(len(dices), 1)
    if phase is None:
        dm = MedicalDataModule(cfg, "instruct", sources=("diagseg",))
        short = {s.id: s.extra.get("short_answer") or "" for s in dm.dataset(split).samples}
        recalls, dice_items = [], []
        for b in batches(dm):
            feats, regions = features(model, b["image"])
            convs = [[c[0]] for c in b["conversations"]]
            for i, p in enumerate(model.predict(feats, regions, convs, new)):
                recalls.append(diagnosis_recall(p.text, short[b["id"][i]]))
                gts = [m.numpy() > 0.5 for m, v in zip(b["masks"][i], b["mask_valid"][i]) if v]
                if gts:
                    em = list(_masks_at(p.mask_logits, tuple(b["masks"].shape[-2:])).numpy())
                    d = item_dice(em, gts)
                    dice_items.append(0.0 if d is None else d)
        res["diagseg_recall"] = sum(recalls) / max(len(recalls), 1)
        res["diagseg_dice"] = sum(dice_items) / max(len(dice_items), 1)
    model.train(was_training)
    return res
