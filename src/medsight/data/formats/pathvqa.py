"""PathVQA as distributed: the `pvqa` root with `qas/<split>/<split>_qa.pkl` and `images/<split>/<name>.jpg`.

A pickle row is {"image": "val_0261" (no extension), "question", "answer"}; ids are `pathvqa_<split>_<index>`;
yes/no answers are closed. The pickles are read by `medsight.safeload.load_data_pickle` (plain containers and
scalars only: a pickle naming any class or function is refused before anything in it runs). A LLaVA-Med-style
`test.json` in the root wins for the test split (images in `images/test/`).
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
    closed_by_answer,
    read_llava_test,
    vqa_sample,
)

SPLITS = ("train", "val", "test")


def read_pathvqa(path: PathLike, split: str = "test", groups: Sequence[str] = ("Other",),
                 policy: ErrorPolicy | None = None, **_: object) -> FormatRead:
    """Items of `split` (train | val | test) in pickle order."""
    from medsight.safeload import load_data_pickle

    policy = policy or ErrorPolicy()
    root = Path(path)
    if split not in SPLITS:
        raise DataError(f"{root}: PathVQA has splits {list(SPLITS)}, not '{split}'", path=root, field="split")
    images = root / "images" / split
    if split == "test" and (root / "test.json").is_file():
        return read_llava_test(root / "test.json", groups, [images, root / "images", root], policy)
    qfile = root / "qas" / split / f"{split}_qa.pkl"
    src = str(qfile)
    rows = load_data_pickle(qfile)
    if not isinstance(rows, list):
        raise DataError(f"{src}: expected a list of question records, got {type(rows).__name__}", path=src)
    out = []
    for k, row in enumerate(rows):
        try:
            where = f"record {k}"
            image = _get(row, "image", str, src, where)
            if "answer" not in row:
                raise DataError(f"{src}: {where} has no field 'answer'", path=src, field="answer")
            name = image if Path(image).suffix.lower() in (".jpg", ".jpeg", ".png") else image + ".jpg"
            out.append(vqa_sample(f"pathvqa_{split}_{k}", str(images / name), _get(row, "question", str, src, where),
                                  row["answer"], closed_by_answer(row["answer"]), src, where, groups, "Pathology",
                                  case=name))
        except DataError as e:
            policy(e)
    return FormatRead(out, files=[src])


__all__ = ["read_pathvqa"]
