"""OmniMedVQA multiple choice: the synthetic per-modality files and the distributed open-access layout."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from medsight.data import DataError
from medsight.data.formats.common import (
    ErrorPolicy,
    FormatRead,
    PathLike,
    Sample,
    _get,
    _load_json,
    _record_file,
    _record_modality,
    _resolve,
    group_index,
    modality_index,
    record_id,
)
from medsight.data.synthetic import case_of

log = logging.getLogger(__name__)


def _question(row: dict, src: str, where: str) -> tuple[str, str, str, dict[str, str]]:
    """(question, gt_answer, image_path, {letter: option}) of one multiple-choice row; two to four options,
    the ground truth one of them."""
    q = _get(row, "question", str, src, where)
    gt = _get(row, "gt_answer", str, src, where)
    image = _get(row, "image_path", str, src, where)
    opts = {c: row[f"option_{c}"] for c in "ABCD" if row.get(f"option_{c}") is not None}
    if len(opts) < 2 or not all(isinstance(v, str) for v in opts.values()):
        raise DataError(f"{src}: {where} needs at least option_A and option_B as strings", path=src, field="option_A")
    if gt not in opts.values():
        raise DataError(f"{src}: {where} field 'gt_answer' '{gt}' is not one of the options", path=src,
                        field="gt_answer")
    return q, gt, image, opts


def read_omnimedvqa(path: PathLike, modality_groups: Sequence[str], image_root: PathLike | None = None,
                    policy: ErrorPolicy | None = None) -> list[Sample]:
    """OmniMedVQA multiple choice: {question_id, question, gt_answer, image_path, option_A..option_D[,
    modality_type]}; gt_answer must be one of the options."""
    policy = policy or ErrorPolicy()
    path, src, base, rows = _record_file(path, image_root)
    out = []
    for k, row in enumerate(rows):
        try:
            qid, where = record_id(row, "question_id", src, k, as_str=True)
            q, gt, image, opts = _question(row, src, where)
            mod = _record_modality(row, modality_groups, src, where, "modality_type") if "modality_type" in row \
                else modality_index(path.stem, modality_groups, src, where, "modality_type")
            out.append(Sample(id=qid, image=_resolve(base, image), modality=mod, case=case_of(image), source=src,
                              question=q, answer=gt, answer_type="CHOICE", options=opts))
        except DataError as e:
            policy(e)
    return out



# ------------------------------------------------------------------------- the distributed layout
#: The exact open-access `modality_type` strings (typos included) -> the paper's modality names.
OMNI_MODALITIES = {
    "CT(Computed Tomography)": "CT",
    "MR (Mag-netic Resonance Imaging)": "MRI",
    "X-Ray": "X-Ray",
    "ultrasound": "Ultrasound",
    "OCT (Optical Coherence Tomography": "OCT",
    "Fundus Photography": "Fundus",
    "Microscopy Images": "Microscopy",
    "Dermoscopy": "Dermoscopy",
}
ALL_MODALITIES = ("CT", "MRI", "X-Ray", "Ultrasound", "OCT", "Fundus", "Microscopy", "Dermoscopy")
#: The 7 the paper reports: every open-access modality but Dermoscopy.
PAPER_MODALITIES = tuple(m for m in ALL_MODALITIES if m != "Dermoscopy")


def question_files(root: Path) -> list[Path]:
    """`QA_information/Open-access/*.json` (the authors' regrouped `Modality_*.json` only when nothing else is
    there, so a folder holding both is not counted twice)."""
    folder = root / "QA_information" / "Open-access"
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (OmniMedVQA root must hold QA_information/ and Images/)",
                        path=folder)
    files = sorted(folder.glob("*.json"))
    official = [f for f in files if not f.name.startswith("Modality_")]
    if not files:
        raise DataError(f"{folder}: no question files (*.json)", path=folder)
    if official and len(official) < len(files):
        log.info("%s: ignoring the authors' regrouped Modality_*.json next to the official files", folder)
    return official or files


def read_omnimedvqa_root(path: PathLike, split: str = "test", groups: Sequence[str] = ("Other",),
                         policy: ErrorPolicy | None = None, modalities: Sequence[str] | str = "all",
                         **_: object) -> FormatRead:
    """Every open-access item of `modalities` ("all", "paper" = the 7 reported, or names from ALL_MODALITIES),
    grouped by the exact `modality_type` (or `modality`, as one `Chest CT Scan.json` row is keyed) string.
    Samples carry extra["modality_group"] and extra["row"] (the raw item, for the scorer)."""
    policy = policy or ErrorPolicy()
    root = Path(path)
    if split != "test":
        raise DataError(f"{root}: OmniMedVQA is a test set only, not '{split}'", path=root, field="split")
    wanted = set(ALL_MODALITIES if modalities == "all" else PAPER_MODALITIES if modalities == "paper"
                 else modalities)
    unknown = wanted - set(ALL_MODALITIES)
    if unknown:
        raise DataError(f"unknown OmniMedVQA modalities {sorted(unknown)}; choose from {list(ALL_MODALITIES)}",
                        field="modalities")
    out, files = [], []
    for qfile in question_files(root):
        src = str(qfile)
        files.append(src)
        try:
            rows = _load_json(qfile)
        except DataError as e:
            policy(e)
            continue
        if not isinstance(rows, list):
            policy(DataError(f"{src}: expected a JSON list of records", path=src))
            continue
        for k, row in enumerate(rows):
            try:
                qid, where = record_id(row, "question_id", src, k)
                key = "modality_type" if isinstance(row, dict) and "modality_type" in row else "modality"
                mtype = _get(row, key, str, src, where)
                if mtype not in OMNI_MODALITIES:
                    raise DataError(f"{src}: {where} field '{key}' is '{mtype}', not one of the open-access "
                                    f"modality_type strings {list(OMNI_MODALITIES)}", path=src, field=key)
                group = OMNI_MODALITIES[mtype]
                if group not in wanted:
                    continue
                q, gt, image, opts = _question(row, src, where)
                out.append(Sample(id=str(qid), image=str(root / image), modality=group_index(group, groups),
                                  case=image, source=src, question=q, answer=gt, answer_type="CHOICE", options=opts,
                                  extra={"qid": qid, "modality_group": group, "row": row}))
            except DataError as e:
                policy(e)
    return FormatRead(out, files=files)
