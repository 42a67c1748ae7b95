"""PubMedVision as distributed (`PubMedVision_Alignment_VQA.json`, `..._InstructionTuning_VQA.json`).

Rows: {id (str), image: [paths] (always a list, relative to the JSON's folder, the PubMedVision root),
conversations [{from human|gpt, value}], modality?, body_part?}. Rows with more than MAX_IMAGES images are
dropped, as the reference does, and counted (`skipped`, not an error). The first human turn has no `<image>`:
one `<image>\\n` per image is put in front of it (the reference strips and re-inserts them the same way when
the count is wrong). One file, split into train/val by a hash of the id (`split_of_id`); split "all" = all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsight.data import DataError
from medsight.data.formats.common import (
    ErrorPolicy,
    FormatRead,
    PathLike,
    PathMap,
    Sample,
    _get,
    _load_json,
    _resolve,
    group_index,
    record_id,
    split_of_id,
)

MAX_IMAGES = 4
IMAGE_TOKEN = "<image>"
SPLITS = ("all", "train", "val")


def image_list(row: dict, src: str, where: str) -> list[str]:
    """`image` as a list of strings (a single string is one image)."""
    image = _get(row, "image", (str, list), src, where)
    images = [image] if isinstance(image, str) else image
    if not images or not all(isinstance(x, str) for x in images):
        raise DataError(f"{src}: {where} field 'image' must be a path or a non-empty list of paths", path=src,
                        field="image")
    return images


def conversation_turns(row: dict, n_images: int, src: str, where: str) -> list[dict[str, str]]:
    """Turns as {from: human|gpt, value} ("assistant" -> "gpt") with exactly one `<image>` per image."""
    conv = _get(row, "conversations", list, src, where)
    if len(conv) < 2:
        raise DataError(f"{src}: {where} field 'conversations' needs a question and an answer", path=src,
                        field="conversations")
    turns = []
    for t, turn in enumerate(conv):
        value = _get(turn, "value", str, src, f"{where} conversations[{t}]")
        role = _get(turn, "from", str, src, f"{where} conversations[{t}]")
        if role not in ("human", "gpt", "assistant"):
            raise DataError(f"{src}: {where} conversations[{t}] field 'from' is '{role}', expected human, gpt or "
                            "assistant", path=src, field="from")
        turns.append({"from": "gpt" if role == "assistant" else role, "value": value})
    if turns[0]["from"] != "human":
        raise DataError(f"{src}: {where} conversations[0] must be the human turn", path=src, field="conversations")
    if sum(t["value"].count(IMAGE_TOKEN) for t in turns) != n_images:
        for t in turns:
            t["value"] = t["value"].replace(IMAGE_TOKEN, "").strip()
        turns[0]["value"] = f"{IMAGE_TOKEN}\n" * n_images + turns[0]["value"]
    return turns


class ImageRows:
    """The row walk PubMedVision and the instruction JSON share: iterating gives (row, id, where, image files,
    turns) for the rows of `split`; a bad row goes to `policy`; rows with more than MAX_IMAGES images are
    counted in `skipped` and left out."""

    def __init__(self, path: Path, split: str, val_fraction: float, image_root: PathLike | None,
                 path_map: PathMap | None, policy: ErrorPolicy) -> None:
        self.path, self.split, self.val_fraction, self.path_map, self.policy = path, split, val_fraction, path_map, policy
        self.src = str(path)
        self.base = Path(image_root) if image_root is not None else path.parent
        self.rows = _load_json(path)
        if not isinstance(self.rows, list):
            raise DataError(f"{self.src}: expected a JSON list of records", path=self.src)
        self.skipped = 0

    def __iter__(self):
        src = self.src
        for k, row in enumerate(self.rows):
            try:
                rid, where = record_id(row, "id", src, k)
                if self.split != "all" and split_of_id(rid, self.val_fraction) != self.split:
                    continue
                images = image_list(row, src, where)
                if len(images) > MAX_IMAGES:
                    self.skipped += 1
                    continue
                files = [_resolve(self.base, x, self.path_map) for x in images]
                turns = conversation_turns(row, len(files), src, where)
            except DataError as e:
                self.policy(e)
                continue
            yield row, rid, where, files, turns


def read_pubmedvision(path: PathLike, split: str = "all", groups: Sequence[str] = ("Other",),
                      policy: ErrorPolicy | None = None, path_map: PathMap | None = None,
                      val_fraction: float = 0.01, image_root: PathLike | None = None, **_: Any) -> FormatRead:
    """Rows of `split` (all | train | val) with <= MAX_IMAGES images, as dialogues with `images`."""
    policy = policy or ErrorPolicy()
    path = Path(path)
    if split not in SPLITS:
        raise DataError(f"{path}: PubMedVision splits are {list(SPLITS)}, not '{split}'", path=path, field="split")
    rows = ImageRows(path, split, val_fraction, image_root, path_map, policy)
    out, src = [], rows.src
    for row, rid, _where, files, turns in rows:
        try:
            q = turns[0]["value"].replace(IMAGE_TOKEN, "").strip()
            out.append(Sample(id=str(rid), image=files[0], images=files, modality=group_index(row.get("modality"), groups),
                              case=str(rid), source=src, conversations=turns, question=q, answer=turns[1]["value"],
                              answer_type="OPEN", extra={"qid": rid, "body_part": row.get("body_part")}))
        except DataError as e:
            policy(e)
    return FormatRead(out, skipped=rows.skipped, files=[src])


__all__ = ["MAX_IMAGES", "ImageRows", "conversation_turns", "image_list", "read_pubmedvision"]
