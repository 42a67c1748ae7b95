"""BiomedParse (D_seg): a meta file {roots, mask_roots, json_paths, modality_labels} over COCO-like JSONs.

Also reads the reference's `BiomedParse_meta.json`, whose paths are the authors' absolute ones: pass a
`path_map` (`--path-map OLD=NEW`, `data.path_map`) to rewrite their prefixes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from medsight.data import DataError
from medsight.data.formats.common import (
    SPLITS,
    ErrorPolicy,
    PathLike,
    PathMap,
    Sample,
    _get,
    _load_json,
    _resolve,
)
from medsight.data.synthetic import case_of, split_cases
from medsight.vocab import CLASSES


def read_biomedparse(meta_path: PathLike, split: str, modality_groups: Sequence[str], val_fraction: float = 0.15,
                     policy: ErrorPolicy | None = None, path_map: PathMap | None = None) -> list[Sample]:
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
        jpath = Path(_resolve(base, lists["json_paths"][i], path_map))
        is_test = jpath.stem.lower().startswith("test")
        if (split == "test") != is_test:
            continue
        label = lists["modality_labels"][i]
        if not isinstance(label, int) or not 0 <= label < len(modality_groups):
            policy(DataError(f"{src}: modality_labels[{i}] = {label!r} is not an index into data.modality_groups "
                             f"({len(modality_groups)} groups)", path=src, field="modality_labels"))
            continue
        try:
            samples = _read_coco(jpath, Path(_resolve(base, lists["roots"][i], path_map)),
                                 Path(_resolve(base, lists["mask_roots"][i], path_map)), label, policy, path_map)
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


def _read_coco(jpath: Path, img_root: Path, mask_root: Path, modality: int, policy: ErrorPolicy,
               path_map: PathMap | None = None) -> list[Sample]:
    """One COCO-like BiomedParse JSON -> samples (images without annotations keep zero masks)."""
    src = str(jpath)
    if not jpath.is_file() and path_map is not None:
        raise DataError(f"{src}: JSON file not found{path_map.explain(src)}", path=src)
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


__all__ = ["read_biomedparse"]
