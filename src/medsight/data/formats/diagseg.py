"""DiagSeg: the diagnosis + segmentation test set (`SegVQA_Diagnostic_test_vqa.json` and the synthetic form)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medsight.data import DataError
from medsight.data.formats.common import (
    MASK_TOKEN,
    ErrorPolicy,
    FormatRead,
    PathLike,
    PathMap,
    Sample,
    _get,
    _record_file,
    _record_modality,
    _resolve,
    record_id,
)
from medsight.data.synthetic import case_of


def read_diagseg(path: PathLike, modality_groups: Sequence[str], image_root: PathLike | None = None,
                 policy: ErrorPolicy | None = None, path_map: PathMap | None = None) -> list[Sample]:
    """DiagSeg: {qa_id, question, answer (with <mask>), short_answer, image_file, mask_ids, masks [[id, path]],
    answer_type, modality}. A nested mask_ids entry is the union of those masks. Also filled in as a
    one-turn conversation so the instruct task can train on it (ann_ids: "id" or "id1+id2" for unions)."""
    policy = policy or ErrorPolicy()
    path, src, base, rows = _record_file(path, image_root)
    out = []
    for k, row in enumerate(rows):
        try:
            qid, where = record_id(row, "qa_id", src, k, as_str=True)
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
                files[str(m[0])] = _resolve(base, m[1], path_map)
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
            out.append(Sample(id=qid, image=_resolve(base, image, path_map),
                              modality=_record_modality(row, modality_groups, src, where), case=case_of(image),
                              source=src, masks=masks, labels=labels, ann_ids=ann_ids, question=q, answer=ans,
                              answer_type=str(row.get("answer_type", "OPEN")), conversations=conv,
                              extra={"short_answer": row.get("short_answer"), "qid": row["qa_id"],
                                     "modality_name": row.get("modality"), "row": row}))
        except DataError as e:
            policy(e)
    return out



def read_diagseg_file(path: PathLike, split: str = "test", groups: Sequence[str] = ("Other",),
                      policy: ErrorPolicy | None = None, path_map: PathMap | None = None,
                      **_: object) -> FormatRead:
    """The distributed DiagSeg JSON (`SegVQA_Diagnostic_test_vqa.json`): absolute `image_file` and mask paths
    of the authors' disk (rewrite them with `path_map`), relative ones against the JSON's folder. The whole
    file is the test split."""
    path = Path(path)
    if split != "test":
        raise DataError(f"{path}: the DiagSeg file is a test set only, not '{split}'", path=path, field="split")
    return FormatRead(read_diagseg(path, groups, path.parent, policy, path_map), files=[str(path)])
