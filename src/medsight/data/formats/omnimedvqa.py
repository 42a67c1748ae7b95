"""OmniMedVQA multiple choice: the synthetic per-modality files and the distributed open-access layout."""

from __future__ import annotations

from collections.abc import Sequence

from medsight.data import DataError
from medsight.data.formats.common import (
    ErrorPolicy,
    PathLike,
    Sample,
    _get,
    _record_file,
    _record_modality,
    _resolve,
    modality_index,
)
from medsight.data.synthetic import case_of


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

