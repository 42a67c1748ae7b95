"""VQA-RAD as distributed: `VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/` (or a LLaVA-Med-style
`test.json` + `images/` in the same folder, which wins for the test split).

The split is in `phrase_type`: freeform + para = train, test_freeform + test_para = test (451 QA).
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
    read_llava_test,
    record_id,
    vqa_sample,
)

QUESTION_FILE = "VQA_RAD Dataset Public.json"
IMAGE_FOLDER = "VQA_RAD Image Folder"
PHRASE_TYPES = {"train": ("freeform", "para"), "test": ("test_freeform", "test_para")}


def read_vqa_rad(path: PathLike, split: str = "test", groups: Sequence[str] = ("Other",),
                 policy: ErrorPolicy | None = None, **_: object) -> FormatRead:
    """Items of `split` (train | test; VQA-RAD has no validation split)."""
    policy = policy or ErrorPolicy()
    root = Path(path)
    if split not in PHRASE_TYPES:
        raise DataError(f"{root}: VQA-RAD has splits train and test, not '{split}'", path=root, field="split")
    if split == "test" and (root / "test.json").is_file():
        return read_llava_test(root / "test.json", groups, [root / "images", root / IMAGE_FOLDER, root], policy)
    qfile = root / QUESTION_FILE
    src = str(qfile)
    rows = _load_json(qfile)
    if not isinstance(rows, list):
        raise DataError(f"{src}: expected a JSON list of records", path=src)
    out = []
    for k, row in enumerate(rows):
        try:
            qid, where = record_id(row, "qid", src, k, (int, str))
            phrase = _get(row, "phrase_type", str, src, where)
            if phrase not in PHRASE_TYPES["train"] + PHRASE_TYPES["test"]:
                raise DataError(f"{src}: {where} field 'phrase_type' is '{phrase}', expected one of "
                                f"{PHRASE_TYPES['train'] + PHRASE_TYPES['test']}", path=src, field="phrase_type")
            if phrase not in PHRASE_TYPES[split]:
                continue
            image = _get(row, "image_name", str, src, where)
            if "answer" not in row:
                raise DataError(f"{src}: {where} has no field 'answer'", path=src, field="answer")
            out.append(vqa_sample(qid, str(root / IMAGE_FOLDER / image), _get(row, "question", str, src, where),
                                  row["answer"], _get(row, "answer_type", str, src, where), src, where, groups,
                                  row.get("image_organ")))
        except DataError as e:
            policy(e)
    return FormatRead(out, files=[src])


__all__ = ["read_vqa_rad"]
