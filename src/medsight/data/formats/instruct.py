"""The authors' grounded instruction JSON (`Seg_instruct_63k_updated.json`, `Instruct_71k_1104_updated.json`).

Rows: {id (int for grounded dialogues, str for the PubMedVision rows mixed in), image (an absolute path of the
authors' disk, or a list), conversations (from human|assistant|gpt) with `[M{g}_{k}]` code tokens already in
the text, mask_files {"<ann_id>": "<abs mask path>"} or null, mask_orders [int ann_id] (the i-th code <-> the
i-th mask), mask_codes?}. mask_files keys are strings and mask_orders ints: matched by str(id). Rewrite the
authors' prefixes with `path_map`. One file, split into train/val by a hash of the id; split "all" = all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsight.data import DataError
from medsight.data.formats.common import (
    MASK_TOKEN,
    ErrorPolicy,
    FormatRead,
    PathLike,
    PathMap,
    Sample,
    _get,
    _resolve,
    group_index,
)
from medsight.data.formats.pubmedvision import SPLITS, ImageRows

CODE_RE = re.compile(r"\[M\d+_\d+\]")


def read_instruct(path: PathLike, split: str = "all", groups: Sequence[str] = ("Other",),
                  policy: ErrorPolicy | None = None, path_map: PathMap | None = None,
                  val_fraction: float = 0.01, image_root: PathLike | None = None, codes: str = "recode",
                  **_: Any) -> FormatRead:
    """Rows of `split` (all | train | val) as dialogues with masks in mask_orders order.

    codes="recode" (default): the authors' `[M..]` tokens of a grounded row become `<mask>` (the i-th <-> the
    i-th mask of mask_orders), so stage 2 assigns OUR codes from the masks like any grounded dialogue;
    "as_coded": the text is kept with the authors' tokens (for a model imported with their codebook).
    Either way extra["coded_conversations"] holds the authors' text."""
    if codes not in ("recode", "as_coded"):
        raise DataError(f"{path}: codes must be recode or as_coded, got '{codes}'", path=str(path), field="codes")
    policy = policy or ErrorPolicy()
    path = Path(path)
    if split not in SPLITS:
        raise DataError(f"{path}: instruction-JSON splits are {list(SPLITS)}, not '{split}'", path=path,
                        field="split")
    rows = ImageRows(path, split, val_fraction, image_root, path_map, policy)
    out, src, base = [], rows.src, rows.base
    for row, rid, where, files, turns in rows:
        try:
            mask_files = _get(row, "mask_files", (dict, type(None)), src, where, optional=True) or {}
            orders = _get(row, "mask_orders", (list, type(None)), src, where, optional=True) or []
            masks = []
            for o in orders:
                if not isinstance(o, (int, str)) or str(o) not in mask_files:
                    raise DataError(f"{src}: {where} field 'mask_orders' names {o!r}, which is not a key of "
                                    f"'mask_files' ({sorted(mask_files)[:5]})", path=src, field="mask_orders")
                mf = mask_files[str(o)]
                if not isinstance(mf, str):
                    raise DataError(f"{src}: {where} field 'mask_files'['{o}'] must be a path", path=src,
                                    field="mask_files")
                masks.append((_resolve(base, mf, path_map),))
            n_codes = sum(len(CODE_RE.findall(t["value"])) for t in turns if t["from"] != "human")
            coded = [dict(t) for t in turns]
            if codes == "recode" and masks:
                if n_codes != len(masks):
                    raise DataError(f"{src}: {where} has {n_codes} code tokens in its answers but 'mask_orders' "
                                    f"lists {len(masks)} masks", path=src, field="mask_orders")
                for t in turns:
                    if t["from"] != "human":
                        t["value"] = CODE_RE.sub(MASK_TOKEN, t["value"])
            out.append(Sample(id=str(rid), image=files[0], images=files if len(files) > 1 else [],
                              modality=group_index(row.get("modality"), groups), case=str(rid), source=src,
                              masks=masks, labels=[0] * len(masks), ann_ids=[str(o) for o in orders],
                              conversations=turns,
                              extra={"qid": rid, "n_codes": n_codes, "mask_codes": row.get("mask_codes"),
                                     "coded_conversations": coded}))
        except DataError as e:
            policy(e)
    return FormatRead(out, skipped=rows.skipped, files=[src])


__all__ = ["CODE_RE", "read_instruct"]
