"""Several images in one question: `MedSight.answer([img1, img2, ...], question)`.

As the reference's chat does: every `<image>` is stripped from the question and one `<image>\\n` per image is
put in front (a question that already holds exactly one `<image>` per image keeps them where they are). Each
image gets its own patch and region tokens; a code's mask is decoded on the image whose `<image>` last
precedes it, at that image's size, and each region says which (`image_index`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medsight.models.llm import IMAGE_TOKEN

MAX_IMAGES = 6  # the reference chat's limit


def image_prompt(question: str, n_images: int) -> str:
    """The question with exactly one `<image>` per image (prepended unless already so)."""
    if question.count(IMAGE_TOKEN) == n_images:
        return question
    return f"{IMAGE_TOKEN}\n" * n_images + question.replace(IMAGE_TOKEN, "").strip()


@torch.no_grad()
def answer_images(ms: Any, images: Sequence[np.ndarray], question: str) -> dict[str, Any]:
    """One answer about `images` (1..MAX_IMAGES (H, W, 3) uint8 arrays): {"text", "regions"}, each region with
    `image_index` (the image its mask is on) and its mask at that image's size."""
    from medsight.model import preprocess_for, regions_of
    from medsight.models.joint import Prediction

    images = list(images)
    if not 1 <= len(images) <= MAX_IMAGES:
        raise ValueError(f"answer takes 1 to {MAX_IMAGES} images, got {len(images)}")
    x, crops = preprocess_for(ms.cfg, images)  # (N, 3, S, S); crops: what each image's model input covers
    feats, regions = ms.model.encode_images(x.to(ms.device))
    conv = [[{"from": "human", "value": image_prompt(question, len(images))}]]
    counts = torch.tensor([len(images)], device=feats.device)
    pred = ms.model.predict(feats, regions, conv, ms.max_new_tokens, image_counts=counts)[0]
    where = pred.image_index or [0] * len(pred.codes)
    out: list[dict | None] = [None] * len(pred.codes)
    for k in sorted(set(where)):
        js = [j for j, v in enumerate(where) if v == k]
        sub = Prediction(pred.text, pred.token_ids, [pred.codes[j] for j in js], pred.mask_logits[js],
                         pred.class_logits[js])
        for j, region in zip(js, regions_of(sub, np.asarray(images[k]).shape[:2], crops[k], image_index=k)):
            out[j] = region
    return {"text": pred.text, "regions": out}


__all__ = ["MAX_IMAGES", "answer_images", "image_prompt"]
