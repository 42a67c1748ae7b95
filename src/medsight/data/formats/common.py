"""What every format reader shares: the `Sample` record, the error policy, JSON/field helpers, path maps.

Readers only parse and validate (cheap); images and masks are opened by the DataModule or the checker.
Every problem is a `DataError` naming the file and field; `ErrorPolicy` decides whether it is raised or
logged and counted (data.on_error = raise | skip; the checker collects).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from medsight.data import DataError

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
    images: list[str] = field(default_factory=list)  # several images per sample (PubMedVision); [] = [image]

    @property
    def all_images(self) -> list[str]:
        """Every image of the sample, in `<image>` order (just `image` for single-image records)."""
        return list(self.images) if self.images else [self.image]


@dataclass
class FormatRead:
    """What a distributed-layout reader returns: the samples of one split, the rows dropped by rule (not
    errors: PubMedVision rows with more than 4 images) and the question files read."""

    samples: list[Sample]
    skipped: int = 0
    files: list[str] = field(default_factory=list)


#: Modality names of the distributed files -> the paper's group names, where they differ beyond case.
MODALITY_ALIASES = {
    "us": "ultrasound", "dermatoscopy": "dermoscopy", "mr": "mri", "x-ray": "x-ray", "xray": "x-ray",
    "ct(computed tomography)": "ct", "mr (mag-netic resonance imaging)": "mri",
    "oct (optical coherence tomography": "oct", "fundus photography": "fundus", "microscopy images": "microscopy",
}


def group_index(name: Any, groups: Sequence[str]) -> int:
    """Lenient modality index for eval sets: the group (case-insensitive, aliases above), else "Other", else 0."""
    low = [g.lower() for g in groups]
    key = str(name).strip().lower() if name is not None else ""
    key = key if key in low else MODALITY_ALIASES.get(key, key)
    if key in low:
        return low.index(key)
    return low.index("other") if "other" in low else 0


def split_of_id(rid: Any, val_fraction: float) -> str:
    """Deterministic train/val assignment of a record id (a single file split by id): crc32 of the id."""
    import zlib

    return "val" if zlib.crc32(str(rid).encode()) % 10_000 < round(val_fraction * 10_000) else "train"


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


def record_id(row: Any, key: str, src: str, k: int, types: type | tuple = (str, int),
              as_str: bool = False) -> tuple[Any, str]:
    """The id field `key` of record `k` (checked against `types`; str() with `as_str`) and the record's name
    for messages, "record k (key id)"."""
    rid = _get(row, key, types, src, f"record {k}")
    rid = str(rid) if as_str else rid
    return rid, f"record {k} ({key} {rid})"


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


def _resolve(base: Path, p: str, path_map: PathMap | None = None) -> str:
    """`p` relative to `base`, or absolute (rewritten by `path_map` when one of its prefixes matches)."""
    if path_map is not None:
        p = path_map.apply(p)
    q = Path(p)
    return str(q if q.is_absolute() else base / q)


class PathMap:
    """Rewrites the authors' absolute path prefixes (`--path-map OLD=NEW`, config `data.path_map`).

    Rules are tried longest OLD first; the first OLD that is a prefix of the path (at a folder boundary)
    is replaced by NEW. `explain(path)` says which rule produced a path, for a "file not found" message.
    """

    def __init__(self, rules: Mapping[str, str] | Iterable[tuple[str, str]] | None = None):
        items = list(rules.items()) if isinstance(rules, Mapping) else list(rules or [])
        self.rules = sorted(((str(o).rstrip("/"), str(n).rstrip("/")) for o, n in items), key=lambda r: -len(r[0]))

    @classmethod
    def parse(cls, specs: Sequence[str] | None) -> PathMap:
        """From `OLD=NEW` strings; a spec without '=' is a DataError naming it."""
        rules = []
        for spec in specs or []:
            if "=" not in spec or not spec.split("=", 1)[0]:
                raise DataError(f"--path-map '{spec}' is not of the form OLD=NEW", field="path_map")
            rules.append(tuple(spec.split("=", 1)))
        return cls(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def apply(self, path: str) -> str:
        for old, new in self.rules:
            if path == old or path.startswith(old + "/"):
                return new + path[len(old):]
        return path

    def explain(self, path: str) -> str:
        """' (path map: OLD -> NEW)' for a rewritten path, a hint for an unmapped absolute path, else ''."""
        for old, new in self.rules:
            if path == new or path.startswith(new + "/"):
                return f" (rewritten by path map {old or '/'}={new or '/'})"
        if Path(path).is_absolute():
            tried = ", ".join(f"{o}={n}" for o, n in self.rules) or "none given"
            return f" (no path-map rule matched; rules tried: {tried}; add --path-map OLD=NEW)"
        return ""


def as_path_map(path_map: PathMap | Mapping[str, str] | None) -> PathMap:
    """A PathMap from a PathMap, a {OLD: NEW} mapping (config `data.path_map`) or None."""
    return path_map if isinstance(path_map, PathMap) else PathMap(path_map or {})


def modality_index(name: Any, groups: Sequence[str], src: str, where: str, fld: str = "modality") -> int:
    """Index of a modality group name (case-insensitive); DataError names file and field if unknown."""
    if not isinstance(name, str):
        raise DataError(f"{src}: {where} field '{fld}' is {type(name).__name__}, expected a group name",
                        path=src, field=fld)
    low = [g.lower() for g in groups]
    if name.lower() not in low and MODALITY_ALIASES.get(name.lower()) in low:
        name = MODALITY_ALIASES[name.lower()]
    if name.lower() not in low:
        raise DataError(f"{src}: {where} field '{fld}' has unknown modality group '{name}'; "
                        f"data.modality_groups is {list(groups)}", path=src, field=fld)
    return low.index(name.lower())


def _record_modality(row: dict, groups: Sequence[str], src: str, where: str, fld: str = "modality") -> int:
    if fld not in row and "Other" in groups:  # LLaVA-Med files carry no modality
        return list(groups).index("Other")
    return modality_index(_get(row, fld, str, src, where), groups, src, where, fld)






def vqa_sample(qid: Any, image: str, question: str, answer: Any, answer_type: str, src: str, where: str,
               groups: Sequence[str], modality: Any = None, case: str | None = None) -> Sample:
    """A VQA record of a distributed layout; `qid` keeps its type in extra["qid"] (answers.jsonl ids)."""
    at = str(answer_type).strip().upper()
    if at not in ("CLOSED", "OPEN"):
        raise DataError(f"{src}: {where} field 'answer_type' is {answer_type!r}, expected CLOSED or OPEN", path=src,
                        field="answer_type")
    q = question.replace("<image>\n", "").replace("<image>", "").strip()
    a = str(answer).strip()  # VQA-RAD has non-string answers in some rows
    return Sample(id=str(qid), image=image, modality=group_index(modality, groups), case=case or image, source=src,
                  question=q, answer=a, answer_type=at,
                  conversations=[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
                  extra={"qid": qid})


def closed_by_answer(answer: Any) -> str:
    """answer_type of a set without one (PathVQA, HF copies): yes/no answers are closed."""
    return "CLOSED" if str(answer).strip().lower() in ("yes", "no") else "OPEN"


def read_llava_test(path: Path, groups: Sequence[str], image_folders: Sequence[Path], policy: ErrorPolicy) -> FormatRead:
    """A LLaVA-Med-style test.json; each image is looked up in `image_folders` in order (first existing wins,
    else the first folder, so a missing image is reported there)."""
    from medsight.data.formats.llava import read_vqa

    samples = read_vqa(path, groups, image_folders[0], policy)
    for s in samples:
        rel = s.image[len(str(image_folders[0])) + 1:] if s.image.startswith(str(image_folders[0])) else None
        if rel is not None and not Path(s.image).exists():
            for folder in image_folders[1:]:
                if (folder / rel).exists():
                    s.image = str(folder / rel)
                    break
        s.case = s.image
    return FormatRead(samples, files=[str(path)])


def is_llava_list(rows: Any) -> bool:
    """True for a LLaVA-Med-style list (rows carry `conversations`)."""
    return isinstance(rows, list) and bool(rows) and isinstance(rows[0], dict) and "conversations" in rows[0]


__all__ = ["MASK_TOKEN", "SPLITS", "ErrorPolicy", "FormatRead", "PathLike", "PathMap", "Sample", "as_path_map",
           "closed_by_answer", "group_index", "modality_index", "read_llava_test", "split_of_id", "vqa_sample"]
