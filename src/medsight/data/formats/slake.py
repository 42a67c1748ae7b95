"""SLAKE 1.0 as distributed (and as on HF `BoKelvin/SLAKE`): `{train,validation,test}.json` + `imgs/xmlabN/`.

Rows: {qid, img_id, img_name, question, answer, q_lang, answer_type, modality, location, ...}; both languages
share the images, so English rows only by default (`lang="en"`; "zh" or "all" otherwise). A LLaVA-Med-style
test.json (rows with `conversations`) in the same place is read as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medsight.data import DataError
from medsight.data.formats.common import (
    ErrorPolicy,
    FormatRead,
    PathLike,
    _get,
    _load_json,
    is_llava_list,
    read_llava_test,
    record_id,
    vqa_sample,
)

SPLIT_FILES = {"train": ("train.json",), "val": ("validation.json", "validate.json"), "test": ("test.json",)}


def split_file(root: Path, split: str) -> Path:
    """The question file of `split`; DataError naming the files tried when none exists."""
    if split not in SPLIT_FILES:
        raise DataError(f"{root}: SLAKE has splits {list(SPLIT_FILES)}, not '{split}'", path=root, field="split")
    for name in SPLIT_FILES[split]:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root / SPLIT_FILES[split][0]}: JSON file not found (SLAKE {split} split)",
                    path=root / SPLIT_FILES[split][0])


def read_slake(path: PathLike, split: str = "test", groups: Sequence[str] = ("Other",),
               policy: ErrorPolicy | None = None, lang: str = "en", **_: object) -> FormatRead:
    """Items of `split` (train | val | test) in file order, `lang` rows only (en | zh | all)."""
    policy = policy or ErrorPolicy()
    root = Path(path)
    qfile = split_file(root, split)
    src = str(qfile)
    rows = _load_json(qfile)
    if not isinstance(rows, list):
        raise DataError(f"{src}: expected a JSON list of records", path=src)
    if is_llava_list(rows):
        return read_llava_test(qfile, groups, [root / "imgs", root], policy)
    out = []
    for k, row in enumerate(rows):
        try:
            qid, where = record_id(row, "qid", src, k, int)
            row_lang = _get(row, "q_lang", str, src, where)
            if lang != "all" and row_lang != lang:
                continue
            image = _get(row, "img_name", str, src, where)
            if "answer" not in row:
                raise DataError(f"{src}: {where} has no field 'answer'", path=src, field="answer")
            out.append(vqa_sample(qid, str(root / "imgs" / image), _get(row, "question", str, src, where),
                                  row["answer"], _get(row, "answer_type", str, src, where), src, where, groups,
                                  row.get("modality"), case=image.split("/")[0]))
        except DataError as e:
            policy(e)
    return FormatRead(out, files=[src])


__all__ = ["read_slake", "split_file"]
