"""The embedded synthetic medical dataset (`make data`): small, deterministic, learnable on a CPU.

Run: python -m medsight.data.synthetic [--root data/synthetic] [key=value ...]   (a few seconds)
`key=value` overrides `data.synthetic.*` (the prefix may be omitted) or `data.val_fraction`.

Four modality groups with clearly different appearance (SYNTHETIC_MODALITY_GROUPS):
  CT          noisy grey abdomen: liver (1), left/right kidney (3); liver tumor (10), kidney cyst (13)
  MRI         smooth brain: brain (6); ring-enhancing tumor (10), dark hemorrhage (14)
  X-Ray       chest projection, lungs dark: left/right lung (2), heart (5); lung infection (11)
  Dermoscopy  colour skin in a round field of view: blood vessel (8); skin lesion (12)
Left/right are the patient's (radiological convention: the patient's left is on the image's right).
Organs and lesions vary per case (patient) and drift slightly from slice to slice. Every lesion covers
< 2% of the image. Everything is written in the real formats (see data/README.md):
  biomedparse/<Dataset>/{train,test,train_mask,test_mask}/ + {train,test}.json, biomedparse/meta.json,
  vqa/{train,val,test}.json (LLaVA-Med), omnimedvqa/<group>.json (test images), instruct/{train,val,test}.json
  (grounded LLaVA dialogues), diagseg/{train,val,test}.json, corpus.txt, generator.json (params + version).
The dataset is regenerated only when it is missing or generator.json's params/version differ.
Images and masks are drawn in medsight.data.synthetic_images, the text in medsight.data.synthetic_text.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from medsight.data.synthetic_images import FINDING, GROUPS, TARGET_CLASS, case_params, draw_slice
from medsight.data.synthetic_text import dialogues, lesion_phrase, mcq_item, modality_word, pick_vqa, vqa_items
from medsight.vocab import CLASSES

log = logging.getLogger(__name__)

#: Bump when the generator's output changes for the same params (forces regeneration).
GENERATOR_VERSION = 3
OWNED = ("biomedparse", "vqa", "instruct", "diagseg", "omnimedvqa", "corpus.txt", "generator.json")


# ---------------------------------------------------------------------------------------- splits
def split_cases(cases: list[str], fraction: float, salt: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split of case ids into (kept, held_out) with round(fraction * n) held out (>= 1 when
    fraction > 0 and n >= 2). The same function makes the reader's val split (by case, never by slice)."""
    cases = sorted(set(cases))
    n_out = round(fraction * len(cases))
    if fraction > 0 and len(cases) >= 2:
        n_out = min(max(n_out, 1), len(cases) - 1)
    perm = np.random.default_rng(np.random.SeedSequence([salt, 7919])).permutation(len(cases))
    out = {cases[i] for i in perm[:n_out]}
    return [c for c in cases if c not in out], [c for c in cases if c in out]


def case_of(file_name: str) -> str:
    """Case (patient) id of a BiomedParse file name `{case}_{slice}_{modality}_{site}[...]`.

    A 2D set has no slice index (`dermIS_SSM18_dermoscopy_skin.png`, `benign (46)_ultrasound_breast.png`):
    the token before `{modality}_{site}` is not a number, so every image is its own case."""
    stem = Path(file_name).stem
    parts = stem.split("_")
    if len(parts) >= 4 and parts[-3].isdigit():
        return "_".join(parts[:-3])
    return "_".join(parts[:-2]) if len(parts) >= 3 else stem



# -------------------------------------------------------------------------------------- generator
def generator_params(cfg: Any) -> dict[str, Any]:
    """Everything the output depends on: data.synthetic.* and data.val_fraction."""
    from omegaconf import OmegaConf
    syn = OmegaConf.to_container(cfg.data.synthetic, resolve=True) if not isinstance(cfg.data.synthetic, dict) \
        else dict(cfg.data.synthetic)
    return {"synthetic": syn, "val_fraction": float(cfg.data.val_fraction)}


def is_current(root: Path | str, params: dict[str, Any]) -> bool:
    """True when `root` holds a complete dataset made by this generator version with these params."""
    f = Path(root) / "generator.json"
    if not f.is_file() or not (Path(root) / "biomedparse" / "meta.json").is_file():
        return False
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("version") == GENERATOR_VERSION and saved.get("params") == params


def ensure_synthetic(root: Path | str, cfg: Any = None, force: bool = False) -> bool:
    """Generate the synthetic dataset into `root` unless it is already current. Returns True if written."""
    if cfg is None:
        from medsight.config import load_config
        cfg = load_config("stage1")
    params = generator_params(cfg)
    if not force and is_current(root, params):
        log.info("synthetic dataset in %s is up to date", root)
        return False
    generate(root, params)
    return True


def _png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, compress_level=1)


def generate(root: Path | str, params: dict[str, Any]) -> dict[str, Any]:
    """Write the whole dataset into `root` (owned subfolders are replaced). Returns summary stats."""
    root = Path(root)
    syn = params["synthetic"]
    size, n_cases, n_slices = int(syn["image_size"]), int(syn["cases_per_group"]), int(syn["slices_per_case"])
    root.mkdir(parents=True, exist_ok=True)
    (root / "generator.json").unlink(missing_ok=True)  # written last: marks a complete dataset
    for name in OWNED:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    bp = root / "biomedparse"
    categories = [{"id": i, "name": n, "supercategory": "abnormal" if 10 <= i <= 14 else "normal"}
                  for i, n in CLASSES.items()]
    meta: dict[str, list] = {"roots": [], "mask_roots": [], "json_paths": [], "modality_labels": []}
    sets: dict[str, dict[str, list]] = {k: {"train": [], "val": [], "test": []} for k in ("vqa", "instruct", "diagseg")}
    mcq: dict[str, list] = {g.name: [] for g in GROUPS}
    corpus: dict[str, None] = {}
    img_id = ann_id = 0
    stats = {"images": 0, "masks": 0, "lesions": 0, "max_lesion_fraction": 0.0, "lesion_free_images": 0}
    bar = tqdm(total=len(GROUPS) * n_cases * n_slices, desc="synthetic", disable=None, file=sys.stderr)
    for gi, group in enumerate(GROUPS):
        cases = [f"{group.prefix}{c:03d}" for c in range(n_cases)]
        train_cases, test_cases = split_cases(cases, float(syn["test_fraction"]), salt=int(syn["seed"]) * 31 + gi)
        _, val_cases = split_cases(train_cases, params["val_fraction"], salt=0)
        split_of = {c: "test" for c in test_cases} | {c: "train" for c in train_cases} | {c: "val" for c in val_cases}
        coco = {s: {"info": {"description": f"{group.dataset} (medsight synthetic)", "version": GENERATOR_VERSION},
                    "images": [], "annotations": [], "categories": categories} for s in ("train", "test")}
        for s in ("train", "test", "train_mask", "test_mask"):
            (bp / group.dataset / s).mkdir(parents=True, exist_ok=True)
        for ci, case in enumerate(cases):
            crng = np.random.default_rng(np.random.SeedSequence([int(syn["seed"]), gi, ci]))
            lesion_free = bool(crng.random() < float(syn["lesion_free_fraction"]))
            p = case_params(group, crng, lesion_free)
            bsplit = "test" if case in test_cases else "train"
            for z in range(n_slices):
                srng = np.random.default_rng(np.random.SeedSequence([int(syn["seed"]), gi, ci, z, 1]))
                t = (z / max(n_slices - 1, 1)) - 0.5
                rgb, objs = draw_slice(group, p, t, srng, size)
                stem = f"{case}_{z}_{group.modality}_{group.site}"
                _png(bp / group.dataset / bsplit / f"{stem}.png", (rgb * 255 + 0.5).astype(np.uint8))
                img_id += 1
                coco[bsplit]["images"].append({"file_name": f"{stem}.png", "height": size, "width": size, "id": img_id})
                anns: list[tuple[str, int]] = []
                for target, m in objs:
                    ann_id += 1
                    mask_file = f"{stem}_{target.replace(' ', '+')}.png"
                    _png(bp / group.dataset / f"{bsplit}_mask" / mask_file, m.astype(np.uint8) * 255)
                    ys, xs = np.nonzero(m)
                    cls = TARGET_CLASS[target]
                    sents = [f"{target} in {group.site} {group.modality}", target]
                    coco[bsplit]["annotations"].append({
                        "mask_file": mask_file, "area": int(m.sum()), "iscrowd": 0, "image_id": img_id,
                        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                        "category_id": cls, "id": ann_id, "slice_ratio": round(z / max(n_slices - 1, 1), 4),
                        "file_name": f"{stem}.png", "split": bsplit,
                        "sentences": [{"raw": s, "sent": s.lower(), "sent_id": ann_id * 10 + k} for k, s in enumerate(sents)],
                        "sent_ids": [ann_id * 10 + k for k in range(len(sents))], "ann_id": ann_id, "ref_id": ann_id,
                    })
                    for s in sents:
                        corpus[s] = None
                    anns.append((target, ann_id))
                    stats["masks"] += 1
                    if cls >= 10:
                        stats["lesions"] += 1
                        stats["max_lesion_fraction"] = max(stats["max_lesion_fraction"], float(m.mean()))
                stats["images"] += 1
                lesions = [t for t, _ in anns if t in FINDING]
                stats["lesion_free_images"] += not lesions
                rel_img = f"biomedparse/{group.dataset}/{bsplit}/{stem}.png"
                rel_mask = {a: f"biomedparse/{group.dataset}/{bsplit}_mask/{stem}_{t.replace(' ', '+')}.png" for t, a in anns}
                cls_of = {a: TARGET_CLASS[t] for t, a in anns}
                split = split_of[case]
                trng = np.random.default_rng(np.random.SeedSequence([int(syn["seed"]), gi, ci, z, 2]))
                # VQA (LLaVA-Med form)
                for k, (q, a, at) in enumerate(pick_vqa(vqa_items(group, lesions, trng), int(syn["vqa_per_image"]), trng)):
                    sets["vqa"][split].append({
                        "id": f"{stem}-vqa{k}", "image": rel_img,
                        "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
                        "answer_type": at, "modality": group.name})
                    corpus[q] = corpus[a] = None
                # grounded dialogues (LLaVA conversation form)
                for k, (turns, ids) in enumerate(dialogues(group, anns, lesions, trng, int(syn["instruct_per_image"]))):
                    conv = []
                    for ti, (q, a) in enumerate(turns):
                        conv += [{"from": "human", "value": ("<image>\n" if ti == 0 else "") + q}, {"from": "gpt", "value": a}]
                        corpus[q] = corpus[a.replace(" <mask>", "")] = None
                    sets["instruct"][split].append({
                        "id": f"{stem}-ins{k}", "image": rel_img, "conversations": conv,
                        "mask_files": {str(i): rel_mask[i] for i in ids}, "mask_orders": [str(i) for i in ids],
                        "mask_classes": {str(i): cls_of[i] for i in ids}, "modality": group.name})
                # DiagSeg (diagnose, then segment)
                mw = modality_word(group)
                q = [f"What abnormality is present in this {mw} image? Please segment it.",
                     f"Can you diagnose this {mw} image and segment the finding?"][int(trng.integers(0, 2))]
                les_ids = {t: a for t, a in anns if t in FINDING}
                if set(les_ids) == {"left lung infection", "right lung infection"}:
                    answer, short = "There is an infection in both lungs <mask>.", "infection"
                    mask_ids: list = [[les_ids["left lung infection"], les_ids["right lung infection"]]]
                elif les_ids:
                    answer = "There is " + " and ".join(f"{lesion_phrase(t)} <mask>" for t in les_ids) + "."
                    short = " and ".join(FINDING[t][0] for t in les_ids)
                    mask_ids = list(les_ids.values())
                else:
                    answer, short, mask_ids = "No abnormality is found in this image.", "no abnormality", []
                sets["diagseg"][split].append({
                    "qa_id": f"{stem}-dx", "question": q, "answer": answer, "short_answer": short,
                    "image_file": rel_img, "mask_ids": mask_ids,
                    "masks": [[a, rel_mask[a]] for a in les_ids.values()],
                    "mask_classes": {str(a): cls_of[a] for a in les_ids.values()},
                    "answer_type": "OPEN", "modality": group.name})
                corpus[q] = corpus[answer.replace(" <mask>", "")] = corpus[short] = None
                # OmniMedVQA-style multiple choice (test images only)
                if bsplit == "test":
                    for k in range(int(syn["mcq_per_image"])):
                        mq, gt, opts = mcq_item(group, lesions, trng, k)
                        mcq[group.name].append({
                            "question_id": f"{stem}-mc{k}", "question": mq, "gt_answer": gt, "image_path": rel_img,
                            **{f"option_{'ABCD'[i]}": o for i, o in enumerate(opts)}, "modality_type": group.name})
                        corpus[mq] = None
                        for o in opts:
                            corpus[o] = None
                bar.update(1)
        for s in ("train", "test"):
            (bp / group.dataset / f"{s}.json").write_text(json.dumps(coco[s]))
            meta["roots"].append(f"{group.dataset}/{s}")
            meta["mask_roots"].append(f"{group.dataset}/{s}_mask")
            meta["json_paths"].append(f"{group.dataset}/{s}.json")
            meta["modality_labels"].append(gi)
    bar.close()
    (bp / "meta.json").write_text(json.dumps(meta, indent=1))
    for name, by_split in sets.items():
        (root / name).mkdir(exist_ok=True)
        for s, rows in by_split.items():
            (root / name / f"{s}.json").write_text(json.dumps(rows, indent=0))
    (root / "omnimedvqa").mkdir(exist_ok=True)
    for g, rows in mcq.items():
        (root / "omnimedvqa" / f"{g}.json").write_text(json.dumps(rows, indent=0))
    (root / "corpus.txt").write_text("\n".join(corpus) + "\n")
    stats["lesion_share"] = stats["lesions"] / max(stats["masks"], 1)
    (root / "generator.json").write_text(json.dumps({"version": GENERATOR_VERSION, "params": params,
                                                     "stats": stats}, indent=1))
    return stats


# --------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """`python -m medsight.data.synthetic [--root DIR] [--force] [key=value ...]`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data/synthetic")
    ap.add_argument("--force", action="store_true", help="regenerate even when up to date")
    ap.add_argument("overrides", nargs="*", help="data.synthetic.* (prefix optional) or data.val_fraction")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from medsight.config import load_config
    ov = [o if o.startswith("data.") else f"data.synthetic.{o}" for o in args.overrides]
    cfg = load_config("stage1", overrides=ov)
    t0 = time.perf_counter()
    written = ensure_synthetic(args.root, cfg, force=args.force)
    if written:
        stats = json.loads((Path(args.root) / "generator.json").read_text())["stats"]
        log.info("wrote synthetic dataset to %s in %.1f s: %s", args.root, time.perf_counter() - t0, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
