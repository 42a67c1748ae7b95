"""Region codes (SPEC section 4, "what the codebook is for"): the code token each ground-truth mask gets.

For every image, its GT masks are matched to the frozen perceiver's N final region queries (Hungarian, the
stage-1 cost); each matched query is quantised with the codebook of the image's modality group and named
`[C{group}_{index}]`. Instruction and DiagSeg files are rewritten with every `<mask>` replaced by its code
(in `mask_orders` / `mask_ids` order; a nested DiagSeg entry, the union of several masks, gets the code of the
query that best matches the union mask under the same cost). Originals are never touched. A report says how
consistent the codes are per class (the paper's semantic-consistency analysis: top-3 codes per class).

    python -m medsight.codes --export checkpoints/default/stage2/export --data data/synthetic --out DIR
        [--stage1 checkpoints/default/stage1/export] [key=value ...]      (about a minute on a CPU)

`make stage2` runs the same assignment at its end (into checkpoints/<run>/stage2/coded/), reusing the
perceiver outputs it computed once for training.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsight.data.readers import MASK_TOKEN, SPLITS, Sample
from medsight.regions import Regions, encode_regions
from medsight.vocab import CLASSES, code_token

log = logging.getLogger("medsight")

KINDS = ("instruct", "diagseg")  # rewritten record sets


def code_names(num_groups: int, num_codes: int) -> list[str]:
    """`[C{m}_{k}]` for every code, modality-major (the order of code_embeddings rows)."""
    return [code_token(g, k) for g in range(num_groups) for k in range(num_codes)]



# ------------------------------------------------------------------------------------ which targets
def read_records(dm: Any, kinds: Sequence[str] = KINDS) -> dict[tuple[str, str], list[Sample]]:
    """Parsed instruction / DiagSeg records per (kind, split) through the data layer's readers (missing
    files are skipped with a note)."""
    from medsight.data.readers import read_conversations, read_diagseg

    out = {}
    for kind in kinds:
        reader = {"instruct": read_conversations, "diagseg": read_diagseg}[kind]
        fmt = dict(dm.cfg.data.get("formats") or {}).get(kind)
        if fmt:  # a distributed layout (data.formats): its grounded records, with <mask> where codes go
            for split in SPLITS:
                recs = [r for r in dm._read_format(fmt, kind, dm.path_of(kind), split) if r.masks]
                if recs:
                    out[(kind, split)] = recs
            continue
        for split in SPLITS:
            f = dm.path_of(kind) / f"{split}.json"
            if not f.is_file():
                log.info("codes: no %s, skipped", f)
                continue
            out[(kind, split)] = reader(f, dm.groups, None, dm.policy)
    return out


def region_samples(dm: Any, records: Mapping[tuple[str, str], list[Sample]], use_segmentation: bool = True
                   ) -> list[Sample]:
    """One sample per image whose targets are all its GT masks (from the segmentation records when the data
    has them, so matching sees the same masks as in training) plus every mask or union referenced by an
    instruction/DiagSeg record and missing there. `extra` holds split and union flags."""
    from medsight.data.readers import read_biomedparse

    by_image: dict[str, Sample] = {}
    meta = dm.path_of("biomedparse")
    if use_segmentation and meta.is_file():
        for split in SPLITS:
            for s in read_biomedparse(meta, split, dm.groups, float(dm.cfg.data.val_fraction), dm.policy):
                s.image = os.path.normpath(s.image)
                s.extra = {**s.extra, "split": split}
                by_image[s.image] = s
    for (_, split), recs in records.items():
        for r in recs:
            key = os.path.normpath(r.image)
            s = by_image.get(key)
            if s is None:
                s = by_image[key] = Sample(id=Path(key).stem, image=key, modality=r.modality, case=r.case,
                                           source=r.source, extra={"split": f"{split}-coded"})
            have = set(s.ann_ids)
            for files, label, aid in zip(r.masks, r.labels, r.ann_ids):
                if aid not in have:
                    s.masks.append(tuple(files))
                    s.labels.append(int(label))
                    s.ann_ids.append(aid)
                    have.add(aid)
    for s in by_image.values():
        s.extra["is_union"] = ["+" in a for a in s.ann_ids]
    return list(by_image.values())


def region_loader(dm: Any, samples: list[Sample], batch_size: int) -> torch.utils.data.DataLoader:
    """Batches of `samples` through the DataModule's transforms (no augmentation, no mask cap), sorted by
    number of targets; batches carry `image_path`, `split` and `is_union` too."""
    from medsight.data.dataset import MedicalDataset, collate
    from medsight.data.transforms import split_transform

    samples = sorted(samples, key=lambda s: len(s.masks))
    ds = MedicalDataset(samples, "segmentation", "val", dm.store, split_transform(dm.cfg, "segmentation", "val"),
                        dm.policy, max_masks=None)

    class _WithKeys(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int) -> dict | None:
            item = ds[i]
            if item is not None:
                s = ds.samples[i]
                item.update(image_path=s.image, split=s.extra["split"], is_union=s.extra["is_union"])
            return item

    return torch.utils.data.DataLoader(_WithKeys(), batch_size=batch_size, shuffle=False, collate_fn=collate)


# -------------------------------------------------------------------------------------- assignment
@torch.no_grad()
def assign_codes(quantizer: nn.Module, regions: Sequence[Regions], route: str = "ground_truth"
                 ) -> dict[tuple[str, str], tuple[int, int]]:
    """(image path, ann_id) -> (group, code) for every target. route: "ground_truth" (the record's modality
    group) or "predicted" (the modality head on the pooled feature)."""
    quantizer.eval()
    rows = [(r, i) for r in regions for i in range(len(r.ann_ids))]
    if not rows:
        return {}
    dev = next(quantizer.parameters()).device
    queries = torch.stack([r.queries[i] for r, i in rows]).to(dev)  # (T, d)
    if route == "predicted":
        pooled = torch.stack([r.pooled for r in regions]).to(dev)
        pred = dict(zip([id(r) for r in regions], quantizer.predict_modality(pooled).argmax(-1).tolist()))
        groups = torch.tensor([pred[id(r)] for r, _ in rows], device=dev)
    else:
        groups = torch.tensor([r.group for r, _ in rows], device=dev)
    codes = quantizer.quantize(queries, groups).codes.tolist()
    return {(r.image, r.ann_ids[i]): (int(g), int(c)) for (r, i), g, c in zip(rows, groups.tolist(), codes)}


def _replace_masks(text: str, tokens: list[str], pos: int) -> tuple[str, int]:
    parts = text.split(MASK_TOKEN)
    out = parts[0]
    for p in parts[1:]:
        out += tokens[pos] + p
        pos += 1
    return out, pos


def code_namer(names: Sequence[str] | None, num_codes: int):
    """(group, code) -> token name: from the export's `code_tokens` (modality-major; an imported export keeps
    the released `[M{g}_{k}]`), else the `[C{g}_{k}]` pattern."""
    if not names:
        return code_token
    return lambda g, k: names[g * num_codes + k]


def code_record(kind: str, row: dict, rec: Sample, assignment: Mapping[tuple[str, str], tuple[int, int]],
                name=code_token) -> dict:
    """A copy of one raw record with every `<mask>` replaced by its code token (in mask order) and a `codes`
    list added. `name(group, code)` gives the token (see code_namer)."""
    image = os.path.normpath(rec.image)
    tokens = [name(*assignment[(image, a)]) for a in rec.ann_ids]
    row = copy.deepcopy(row)
    pos = 0
    if kind == "instruct":
        for turn in row["conversations"]:
            if turn.get("from") != "human":
                turn["value"], pos = _replace_masks(turn["value"], tokens, pos)
    else:
        row["answer"], pos = _replace_masks(row["answer"], tokens, pos)
    assert pos == len(tokens), f"record {rec.id}: {pos} <mask> replaced but {len(tokens)} codes"
    row["codes"] = tokens
    return row


def write_coded(dm: Any, records: Mapping[tuple[str, str], list[Sample]],
                assignment: Mapping[tuple[str, str], tuple[int, int]], out_dir: Path | str,
                name=code_token) -> dict[str, int]:
    """Write `<out_dir>/{instruct,diagseg}/{split}.json`, the records with codes (raw fields kept). Records the
    reader dropped (data.on_error=skip) are left out. Returns {"<kind>/<split>": records written}."""
    out_dir = Path(out_dir)
    counts = {}
    for (kind, split), recs in records.items():
        key = "id" if kind == "instruct" else "qa_id"
        if dict(dm.cfg.data.get("formats") or {}).get(kind):  # distributed layout: rows rebuilt from the records
            raw = [{key: r.extra.get("qid", r.id), "conversations": r.conversations, "mask_orders": r.ann_ids}
                   if kind == "instruct" else dict(r.extra.get("row", {}), answer=r.answer) for r in recs]
        else:
            raw = json.loads((dm.path_of(kind) / f"{split}.json").read_text())
        by_id = {r.id: r for r in recs}
        rows = [code_record(kind, row, by_id[str(row[key])], assignment, name) for row in raw
                if str(row.get(key)) in by_id]
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
        (out_dir / kind / f"{split}.json").write_text(json.dumps(rows, indent=0))
        counts[f"{kind}/{split}"] = len(rows)
    return counts


# ------------------------------------------------------------------------------------- consistency
def consistency_report(regions: Sequence[Regions], assignment: Mapping[tuple[str, str], tuple[int, int]],
                       group_names: Sequence[str], top: int = 3, name=code_token) -> dict[str, Any]:
    """Per modality group and class ("CT/liver"; single GT masks with a known class, each counted once): how
    many masks, how many distinct codes, and the top-`top` codes with their share (the paper: the codes of
    liver and kidney in abdominal CT concentrate on a few)."""
    per_class: dict[tuple[int, int], Counter] = defaultdict(Counter)
    for r in regions:
        for i, a in enumerate(r.ann_ids):
            label = int(r.labels[i])
            if bool(r.is_union[i]) or label <= 0 or (r.image, a) not in assignment:
                continue
            g, c = assignment[(r.image, a)]
            per_class[(g, label)][name(g, c)] += 1
    classes = {}
    for g, label in sorted(per_class):
        cnt = per_class[(g, label)]
        n = sum(cnt.values())
        tops = [{"code": t, "count": k, "share": k / n} for t, k in cnt.most_common(top)]
        classes[f"{group_names[g]}/{CLASSES.get(label, str(label))}"] = {
            "group": group_names[g], "class_id": label, "masks": n, "distinct_codes": len(cnt), "top": tops,
            "top_share": sum(t["share"] for t in tops),
        }
    shares = [c["top_share"] for c in classes.values()]
    return {"top_k": top, "classes": classes,
            "mean_top_share": sum(shares) / len(shares) if shares else 0.0,
            "note": "each GT mask counted once over all splits; top_share = fraction of a group/class's masks "
                    "that get one of its top-k codes"}


def plot_consistency(report: Mapping[str, Any], path: Path | str) -> Path:
    """Stacked bar chart: per class, the shares of its top-k codes (labelled) and of all other codes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["classes"])
    k = int(report["top_k"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    colors = plt.get_cmap("tab10").colors
    bottom = [0.0] * len(names)
    for j in range(k):
        vals, labels = [], []
        for n in names:
            tops = report["classes"][n]["top"]
            vals.append(tops[j]["share"] if j < len(tops) else 0.0)
            labels.append(tops[j]["code"] if j < len(tops) else "")
        bars = ax.bar(names, vals, bottom=bottom, color=colors[j % 10], label=f"top-{j + 1} code")
        for b, v, lab in zip(bars, vals, labels):
            if v >= 0.06:
                ax.text(b.get_x() + b.get_width() / 2, b.get_y() + v / 2, lab, ha="center", va="center", fontsize=6)
        bottom = [x + v for x, v in zip(bottom, vals)]
    ax.bar(names, [1 - x for x in bottom], bottom=bottom, color="0.85", label="other codes")
    for i, n in enumerate(names):
        ax.text(i, 1.01, f"n={report['classes'][n]['masks']}", ha="center", va="bottom", fontsize=6)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of the class's masks")
    ax.set_title(f"Region-code consistency per class (top-{k} codes)")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", rotation_mode="anchor", fontsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the bars
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_assignment(dm: Any, quantizer: nn.Module, regions: Sequence[Regions],
                   records: Mapping[tuple[str, str], list[Sample]], out_dir: Path | str,
                   code_tokens: Sequence[str] | None = None) -> dict[str, Any]:
    """Assign codes, write the coded files and the consistency report (JSON + PNG) into `out_dir`; token
    names from `code_tokens` (the export's, modality-major) when given."""
    out_dir = Path(out_dir)
    assignment = assign_codes(quantizer, regions)
    name = code_namer(code_tokens, int(dm.cfg.codebook.num_codes)) if code_tokens else code_token
    counts = write_coded(dm, records, assignment, out_dir, name)
    report = consistency_report(regions, assignment, list(dm.groups), name=name)
    report["files"] = counts
    (out_dir / "code_consistency.json").write_text(json.dumps(report, indent=2))
    plot_consistency(report, out_dir / "code_consistency.png")
    return report


# --------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="Assign region codes to instruction / DiagSeg data.")
    ap.add_argument("--export", required=True,
                    help="stage-2 export directory, or an export imported with --codebook (the released codebook)")
    ap.add_argument("--stage1", default=None, help="stage-1 export (default: the one stage 2 was trained from)")
    ap.add_argument("--data", default=None, help="dataset root (default: the stage-2 config's data.root)")
    ap.add_argument("--out", required=True, help="output folder for instruct/, diagseg/ and the report")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("overrides", nargs="*", help="data.* key=value overrides (format, instruct, diagseg, ...)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from medsight.config import from_dict, offline_env, to_dict
    from medsight.data.datamodule import MedicalDataModule
    from medsight.export import read_meta, require_export
    from medsight.models import load_stage1
    from medsight.models.codebook import load_quantizer
    from medsight.models.matching import loss_weights
    from medsight.train import default_device, setup_logging

    offline_env()
    setup_logging()
    torch.set_flush_denormal(True)
    export = require_export(args.export, "stage2")
    if "codebook_reference" in read_meta(export).get("components", []):  # imported with the released codebook
        from medsight.export import read_export_config
        from medsight.interop.reference_codebook import load_reference_quantizer

        quantizer, cfg, own_stage1 = load_reference_quantizer(export), read_export_config(export), str(export)
    else:
        quantizer, cfg = load_quantizer(export)
        own_stage1 = read_meta(export).get("stage1_export")
    quantizer.eval()
    d = to_dict(cfg)
    if args.data:
        d["data"]["root"] = args.data
    for item in args.overrides:
        key, _, value = item.partition("=")
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg = from_dict(d)
    stage1 = args.stage1 or own_stage1
    vision, perceiver = load_stage1(stage1, cfg)
    dm = MedicalDataModule(cfg, "instruct")
    records = read_records(dm)
    samples = region_samples(dm, records)
    loader = region_loader(dm, samples, args.batch_size or int(cfg.data.eval_batch_size))
    device = default_device(cfg) if args.device == "auto" else args.device
    vision, perceiver, quantizer = vision.to(device), perceiver.to(device), quantizer.to(device)
    regions = encode_regions(vision, perceiver, loader, loss_weights(cfg.loss), keep_splits=(), device=device)
    report = run_assignment(dm, quantizer, regions, records, args.out, read_meta(export).get("code_tokens"))
    log.info("codes: wrote %s into %s; mean top-%d share %.3f", report["files"], args.out, report["top_k"],
             report["mean_top_share"])
    return report


__all__ = [
    "assign_codes",
    "code_namer",
    "code_record",
    "consistency_report",
    "main",
    "plot_consistency",
    "read_records",
    "region_loader",
    "region_samples",
    "run_assignment",
    "write_coded",
]

if __name__ == "__main__":
    main()
