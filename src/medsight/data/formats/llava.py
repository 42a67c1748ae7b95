"""LLaVA conversation forms: grounded dialogues with `<mask>` (the synthetic `instruct/`) and LLaVA-Med VQA
(`test.json` lists of {id, image, conversations, answer_type}, as MedSIGHT's eval config expects them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medsight.data import DataError
from medsight.data.formats.common import (
    MASK_TOKEN,
    ErrorPolicy,
    PathLike,
    Sample,
    _get,
    _record_file,
    _record_modality,
    _resolve,
    record_id,
)
from medsight.data.synthetic import case_of


def _check_conversations(conv: Any, src: str, where: str) -> list[dict[str, str]]:
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{src}: {where} field 'conversations' must be a non-empty list", path=src,
                        field="conversations")
    for t, turn in enumerate(conv):
        _get(turn, "value", str, src, f"{where} conversations[{t}]")
        if "from" in turn and not isinstance(turn["from"], str):
            raise DataError(f"{src}: {where} conversations[{t}] field 'from' must be a string", path=src,
                            field="conversations")
    return [{"from": turn.get("from", "human" if t % 2 == 0 else "gpt"), "value": turn["value"]}
            for t, turn in enumerate(conv)]


def read_conversations(path: PathLike, modality_groups: Sequence[str], image_root: PathLike | None = None,
                       policy: ErrorPolicy | None = None) -> list[Sample]:
    """Grounded LLaVA dialogues: {id, image, conversations, mask_files {ann_id: path}, mask_orders [ann_id],
    modality[, mask_classes {ann_id: class id}]}. The i-th `<mask>` across the answers <-> mask_orders[i].
    Paths relative to `image_root` (default: the JSON folder's parent, i.e. the dataset root)."""
    policy = policy or ErrorPolicy()
    path, src, base, rows = _record_file(path, image_root)
    out = []
    for k, row in enumerate(rows):
        try:
            rid, where = record_id(row, "id", src, k, as_str=True)
            image = _get(row, "image", str, src, where)
            conv = _check_conversations(row.get("conversations"), src, where)
            orders = _get(row, "mask_orders", list, src, where, optional=True) or []
            files = _get(row, "mask_files", dict, src, where, optional=True) or {}
            classes = _get(row, "mask_classes", dict, src, where, optional=True) or {}
            n_tok = sum(t["value"].count(MASK_TOKEN) for t in conv if t["from"] != "human")
            if n_tok != len(orders):
                raise DataError(f"{src}: {where} has {n_tok} '{MASK_TOKEN}' in its answers but field 'mask_orders' "
                                f"lists {len(orders)} masks", path=src, field="mask_orders")
            masks = []
            for a in orders:
                if str(a) not in files:
                    raise DataError(f"{src}: {where} field 'mask_orders' names '{a}' which is not in 'mask_files'",
                                    path=src, field="mask_files")
                f = files[str(a)]
                fs = [f] if isinstance(f, str) else f
                if not isinstance(fs, list) or not all(isinstance(x, str) for x in fs):
                    raise DataError(f"{src}: {where} field 'mask_files' entry '{a}' must be a path or list of paths",
                                    path=src, field="mask_files")
                masks.append(tuple(_resolve(base, x) for x in fs))
            labels = [int(classes.get(str(a), 0)) for a in orders]
            out.append(Sample(id=rid, image=_resolve(base, image), modality=_record_modality(row, modality_groups, src, where),
                              case=case_of(image), source=src, masks=masks, labels=labels,
                              ann_ids=[str(a) for a in orders], conversations=conv))
        except DataError as e:
            policy(e)
    return out


def read_vqa(path: PathLike, modality_groups: Sequence[str], image_root: PathLike | None = None,
             policy: ErrorPolicy | None = None) -> list[Sample]:
    """LLaVA-Med VQA: {id, image, conversations [question, answer], answer_type CLOSED|OPEN[, modality]}."""
    policy = policy or ErrorPolicy()
    path, src, base, rows = _record_file(path, image_root)
    out = []
    for k, row in enumerate(rows):
        try:
            rid, where = record_id(row, "id", src, k, as_str=True)
            image = _get(row, "image", str, src, where)
            conv = _check_conversations(row.get("conversations"), src, where)
            if len(conv) < 2:
                raise DataError(f"{src}: {where} field 'conversations' needs a question and an answer", path=src,
                                field="conversations")
            at = _get(row, "answer_type", str, src, where).upper()
            if at not in ("CLOSED", "OPEN"):
                raise DataError(f"{src}: {where} field 'answer_type' is '{at}', expected CLOSED or OPEN", path=src,
                                field="answer_type")
            q = conv[0]["value"].replace("<image>\n", "").replace("<image>", "").strip()
            out.append(Sample(id=rid, image=_resolve(base, image), modality=_record_modality(row, modality_groups, src, where),
                              case=case_of(image), source=src, question=q, answer=conv[1]["value"].strip(),
                              answer_type=at, conversations=conv[:2], extra={"qid": row["id"]}))
        except DataError as e:
            policy(e)
    return out


def vqa_as_conversation(s: Sample) -> Sample:
    """A VQA sample as a non-grounded dialogue (mask_orders [])."""
    conv = s.conversations or [{"from": "human", "value": "<image>\n" + (s.question or "")},
                               {"from": "gpt", "value": s.answer or ""}]
    return Sample(id=s.id, image=s.image, modality=s.modality, case=s.case, source=s.source, conversations=conv,
                  question=s.question, answer=s.answer, answer_type=s.answer_type, images=list(s.images))


__all__ = ["read_conversations", "read_vqa", "vqa_as_conversation"]
