"""Readers for the real dataset formats (SPEC section 6) into one `Sample` record type.

BiomedParse (meta file + COCO-like JSON), LLaVA conversations with `<mask>` (grounded dialogues), LLaVA-Med
VQA, OmniMedVQA multiple choice and DiagSeg. Readers only parse and validate JSON (cheap); images and masks
are opened by the DataModule or the checker. Every problem is a `DataError` naming the file and field;
`ErrorPolicy` decides whether it is raised or logged and counted (data.on_error = raise | skip).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from medsight.data import DataError
from medsight.data.synthetic import case_of, split_cases
from medsight.vocab import CLASSES

log = logging.getLogger(__name__)

PathLike = Union[str, Path]  # noqa: UP007 (runtime alias)
MASK_TOKEN = "<mask>"
SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    """One record of any format. Paths are absolute strings; masks[i] lists files whose union is mask i."""

    id: str
    image: str
    modality: int  # index into data.modality_groups
    case: str  # patient id (splits are by case)
    source: str  # file the record came from (for error messages)
    masks: list[tuple[str, ...]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # BiomedParse class id per mask (0: not given)
    ann_ids: list[str] = field(default_factory=list)  # per mask; mask_orders for dialogues
    question: str | None = None
    answer: str | None = None
    answer_type: str | None = None  # CLOSED | OPEN
    conversations: list[dict[str, str]] | None = None
    options: dict[str, str] | None = None  # OmniMedVQA: {"A": ..., "B": ...}
    extra: dict[str, Any] = field(default_factory=dict)


class ErrorPolicy:
    """on_error = raise | skip | collect. skip logs a warning per problem; collect (the checker) only records."""

    def __init__(self, on_error: str = "raise"):
        if on_error not in ("raise", "skip", "collect"):
            raise ValueError(f"on_error must be raise, skip or collect, got '{on_error}'")
        self.on_error = on_error
        self.problems: list[DataError] = []

    def __call__(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        if self.on_error == "skip":
            log.warning("skipping sample: %s", err)
        self.problems.append(err)

    @property
    def skipped(self) -> int:
        return len(self.problems)


# ------------------------------------------------------------------------------------------ helpers
def _load_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: JSON file not found", path=path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot parse JSON ({e})", path=path) from None


def _record_file(path: PathLike, image_root: PathLike | None) -> tuple[Path, str, Path, list]:
    """(path, its name for messages, the folder image paths are relative to, the JSON list of records).
    Image paths default to being relative to the dataset root (the folder above the JSON's folder)."""
    path = Path(path)
    src = str(path)
    base = Path(image_root) if image_root is not None else path.parent.parent
    rows = _load_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{src}: expected a JSON list of records", path=src)
    return path, src, base, rows


def _get(row: Any, key: str, types: type | tuple, src: str, where: str, optional: bool = False) -> Any:
    """row[key] checked against `types`; DataError names file, record and field."""
    if not isinstance(row, dict):
        raise DataError(f"{src}: {where} is a {type(row).__name__}, expected an object", path=src, field=where)
    if key not in row:
        if optional:
            return None
        raise DataError(f"{src}: {where} has no field '{key}'", path=src, field=key)
    val = row[key]
    if not isinstance(val, types) or (isinstance(val, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        tn = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise DataError(f"{src}: {where} field '{key}' is {type(val).__name__} {val!r:.40}, expected {tn}",
                        path=src, field=key)
    return val


def _resolve(base: Path, p: str) -> str:
    q = Path(p)
    return str(q if q.is_absolute() else base / q)


def modality_index(name: Any, groups: Sequence[str], src: str, where: str, fld: str = "modality") -> int:
    """Index of a modality group name (case-insensitive); DataError names file and field if unknown."""
    if not isinstance(name, str):
        raise DataError(f"{src}: {where} field '{fld}' is {type(name).__name__}, expected a group name",
                        path=src, field=fld)
    low = [g.lower() for g in groups]
    if name.lower() not in low:
        raise DataError(f"{src}: {where} field '{fld}' has unknown modality group '{name}'; "
                        f"data.modality_groups is {list(groups)}", path=src, field=fld)
    return low.index(name.lower())


def _record_modality(row: dict, groups: Sequence[str], src: str, where: str, fld: str = "modality") -> int:
    if fld not in row and "Other" in groups:  # LLaVA-Med files carry no modality
        return list(groups).index("Other")
    return modality_index(_get(row, fld, str, src, where), groups, src, where, fld)


# -------------------------------------------------------------------------------------- BiomedParse
def read_biomedparse(meta_path: PathLike, split: str, modality_groups: Sequence[str], val_fraction: float = 0.15,
                     policy: ErrorPolicy | None = None) -> list[Sample]:
    """Segmentation samples of `split` (train | val | test) from a BiomedParse meta file.

    Meta: {"roots", "mask_roots", "json_paths", "modality_labels"}, one entry per (dataset, split); paths
    relative to the meta file's folder or absolute; a JSON whose name starts with "test" is the test split,
    otherwise train. val = round(val_fraction * cases) training CASES per dataset (deterministic, by case).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    policy = policy or ErrorPolicy()
    meta_path = Path(meta_path)
    src = str(meta_path)
    meta = _load_json(meta_path)
    base = meta_path.parent
    lists = {}
    for k in ("roots", "mask_roots", "json_paths", "modality_labels"):
        lists[k] = _get(meta, k, list, src, "meta")
    n = len(lists["json_paths"])
    for k, v in lists.items():
        if len(v) != n:
            raise DataError(f"{src}: field '{k}' has {len(v)} entries but 'json_paths' has {n}", path=src, field=k)
    out: list[Sample] = []
    for i in range(n):
        jpath = Path(_resolve(base, lists["json_paths"][i]))
        is_test = jpath.stem.lower().startswith("test")
        if (split == "test") != is_test:
            continue
        label = lists["modality_labels"][i]
        if not isinstance(label, int) or not 0 <= label < len(modality_groups):
            policy(DataError(f"{src}: modality_labels[{i}] = {label!r} is not an index into data.modality_groups "
                             f"({len(modality_groups)} groups)", path=src, field="modality_labels"))
            continue
        try:
            samples = _read_coco(jpath, Path(_resolve(base, lists["roots"][i])),
                                 Path(_resolve(base, lists["mask_roots"][i])), label, policy)
        except DataError as e:
            policy(e)
            continue
        if not is_test:
            train_cases, val_cases = split_cases([s.case for s in samples], val_fraction, salt=0)
            keep = set(val_cases if split == "val" else train_cases)
            samples = [s for s in samples if s.case in keep]
        for s in samples:
            s.extra["split"] = split
        out += samples
    return out


def _read_coco(jpath: Path, img_root: Path, mask_root: Path, modality: int, policy: ErrorPolicy) -> list[Sample]:
    """One COCO-like BiomedParse JSON -> samples (images without annotations keep zero masks)."""
    src = str(jpath)
    data = _load_json(jpath)
    images = _get(data, "images", list, src, "top level")
    anns = _get(data, "annotations", list, src, "top level")
    by_image: dict[int, list[tuple[str, int, str]]] = defaultdict(list)
    bad_images: set[int] = set()
    for k, a in enumerate(anns):
        try:
            where = f"annotations[{k}]"
            mask_file = _get(a, "mask_file", str, src, where)
            image_id = _get(a, "image_id", int, src, where)
            cat = _get(a, "category_id", int, src, where)
            aid = a.get("ann_id", a.get("id", k))
            if cat not in CLASSES or cat == 0:
                raise DataError(f"{src}: {where} (mask {mask_file}) field 'category_id' has unknown class id {cat}; "
                                f"BiomedParse ids are 1..{len(CLASSES) - 1}", path=src, field="category_id")
            by_image[image_id].append((_resolve(mask_root, mask_file), cat, str(aid)))
        except DataError as e:
            if isinstance(a, dict) and isinstance(a.get("image_id"), int):
                bad_images.add(a["image_id"])  # drop the whole image, never keep it with a mask missing
            policy(e)
    out = []
    for k, im in enumerate(images):
        try:
            where = f"images[{k}]"
            fname = _get(im, "file_name", str, src, where)
            iid = _get(im, "id", int, src, where)
            if iid in bad_images:
                continue  # its bad annotation was already reported
            ms = by_image.get(iid, [])
            out.append(Sample(id=Path(fname).stem, image=_resolve(img_root, fname), modality=modality,
                              case=case_of(fname), source=src, masks=[(m,) for m, _, _ in ms],
                              labels=[c for _, c, _ in ms], ann_ids=[a for _, _, a in ms]))
        except DataError as e:
            policy(e)
    return out


# ------------------------------------------------------------------------------- conversation forms
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
            where = f"record {k}"
            rid = str(_get(row, "id", (str, int), src, where))
            where = f"record {k} (id {rid})"
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
            where = f"record {k}"
            rid = str(_get(row, "id", (str, int), src, where))
            where = f"record {k} (id {rid})"
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
                              answer_type=at, conversations=conv[:2]))
        except DataError as e:
            policy(e)
    return out


def read_omnimedvqa(path: PathLike, modality_groups: Sequence[str], image_root: PathLike | None = None,
                    policy: ErrorPolicy | None = None) -> list[Sample]:
    """OmniMedVQA multiple choice: {question_id, question, gt_answer, image_path, option_A..option_D[,
    modality_type]}; gt_answer must be one of the options."""
    policy = policy or ErrorPolicy()
    path, src, base, rows = _record_file(path, image_root)
    out = []
    for k, row in enumerate(rows):
        try:
            where = f"record {k}"
            qid = str(_get(row, "question_id", (str, int), src, where))
            where = f"record {k} (question_id {qid})"
            q = _get(row, "question", str, src, where)
            gt = _get(row, "gt_answer", str, src, where)
            image = _get(row, "image_path", str, src, where)
            opts = {c: row[f"option_{c}"] for c in "ABCD" if row.get(f"option_{c}") is not None}
            if len(opts) < 2 or not all(isinstance(v, str) for v in opts.values()):
                raise DataError(f"{src}: {where} needs at least option_A and option_B as strings", path=src,
                                field="option_A")
            if gt not in opts.values():
                raise DataError(f"{src}: {where} field 'gt_answer' '{gt}' is not one of the options", path=src,
                                field="gt_answer")
            mod = _record_modality(row, modality_groups, src, where, "modality_type") if "modality_type" in row \
                else modality_index(path.stem, modality_groups, src, where, "modality_type")
            out.append(Sample(id=qid, image=_resolve(base, image), modality=mod, case=case_of(image), source=src,
                              question=q, answer=gt, answer_type="CHOICE", options=opts))
        except DataError as e:
            policy(e)
    return out


def read_diagseg(path: PathLike, modality_groups: Sequence[str], image_root: PathLike | None = None,
                 policy: ErrorPolicy | None = None) -> list[Sample]:
    """DiagSeg: {qa_id, question, answer (with <mask>), short_answer, image_file, mask_ids, masks [[id, path]],
    answer_type, modality}. A nested mask_ids entry is the union of those masks. Also filled in as a
    one-turn conversation so the instruct task can train on it (ann_ids: "id" or "id1+id2" for unions)."""
    policy = policy or ErrorPolicy()
    path, src, base, rows = _record_file(path, image_root)
    out = []
    for k, row in enumerate(rows):
        try:
            where = f"record {k}"
            qid = str(_get(row, "qa_id", (str, int), src, where))
            where = f"record {k} (qa_id {qid})"
            q = _get(row, "question", str, src, where)
            ans = _get(row, "answer", str, src, where)
            image = _get(row, "image_file", str, src, where)
            mask_ids = _get(row, "mask_ids", list, src, where)
            mlist = _get(row, "masks", list, src, where)
            classes = _get(row, "mask_classes", dict, src, where, optional=True) or {}
            files: dict[str, str] = {}
            for j, m in enumerate(mlist):
                if not (isinstance(m, list) and len(m) == 2 and isinstance(m[1], str)):
                    raise DataError(f"{src}: {where} field 'masks'[{j}] must be [id, path]", path=src, field="masks")
                files[str(m[0])] = _resolve(base, m[1])
            if ans.count(MASK_TOKEN) != len(mask_ids):
                raise DataError(f"{src}: {where} has {ans.count(MASK_TOKEN)} '{MASK_TOKEN}' in field 'answer' but "
                                f"field 'mask_ids' lists {len(mask_ids)} masks", path=src, field="mask_ids")
            masks, ann_ids, labels = [], [], []
            for entry in mask_ids:
                ids = [str(x) for x in (entry if isinstance(entry, list) else [entry])]
                missing = [x for x in ids if x not in files]
                if missing or not ids:
                    raise DataError(f"{src}: {where} field 'mask_ids' names {missing or entry} not listed in 'masks'",
                                    path=src, field="mask_ids")
                masks.append(tuple(files[x] for x in ids))
                ann_ids.append("+".join(ids))
                labels.append(int(classes.get(ids[0], 0)))
            conv = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": ans}]
            out.append(Sample(id=qid, image=_resolve(base, image),
                              modality=_record_modality(row, modality_groups, src, where), case=case_of(image),
                              source=src, masks=masks, labels=labels, ann_ids=ann_ids, question=q, answer=ans,
                              answer_type=str(row.get("answer_type", "OPEN")), conversations=conv,
                              extra={"short_answer": row.get("short_answer")}))
        except DataError as e:
            policy(e)
    return out


def vqa_as_conversation(s: Sample) -> Sample:
    """A VQA sample as a non-grounded dialogue (mask_orders [])."""
    conv = s.conversations or [{"from": "human", "value": "<image>\n" + (s.question or "")},
                               {"from": "gpt", "value": s.answer or ""}]
    return Sample(id=s.id, image=s.image, modality=s.modality, case=s.case, source=s.source, conversations=conv,
                  question=s.question, answer=s.answer, answer_type=s.answer_type)


__all__ = [
    "MASK_TOKEN",
    "ErrorPolicy",
    "Sample",
    "modality_index",
    "read_biomedparse",
    "read_conversations",
    "read_diagseg",
    "read_omnimedvqa",
    "read_vqa",
    "vqa_as_conversation",
]
