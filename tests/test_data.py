"""Data layer: synthetic generator, readers, checker, bad input, DataModule and collate (fast, CPU)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.config import load_config
from medsight.data import DataError
from medsight.data.check import main as check_main
from medsight.data.check import run_check
from medsight.data.datamodule import MedicalDataModule
from medsight.data.dataset import collate
from medsight.data.io import WINDOWS, load_image, read_image, write_mask
from medsight.data.readers import ErrorPolicy, read_biomedparse
from medsight.data.synthetic import ensure_synthetic, generate, generator_params

TINY = ["data.synthetic.image_size=32", "data.synthetic.cases_per_group=2", "data.synthetic.slices_per_case=2",
        "data.synthetic.test_fraction=0.5"]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ generator
def test_generator_is_deterministic(tmp_path):
    params = generator_params(load_config("stage1", overrides=TINY))
    generate(tmp_path / "a", params)
    generate(tmp_path / "b", params)
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert ha == hb and len(ha) > 50
    generate(tmp_path / "c", generator_params(load_config("stage1", overrides=TINY + ["data.synthetic.seed=1"])))
    assert _hashes(tmp_path / "c") != ha


def test_regenerates_only_when_params_change(tmp_path):
    cfg = load_config("stage1", overrides=TINY)
    assert ensure_synthetic(tmp_path, cfg) is True
    stamp = (tmp_path / "generator.json").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, cfg) is False
    assert (tmp_path / "generator.json").stat().st_mtime_ns == stamp
    cfg2 = load_config("stage1", overrides=TINY + ["data.synthetic.seed=3"])
    assert ensure_synthetic(tmp_path, cfg2) is True
    assert json.loads((tmp_path / "generator.json").read_text())["params"]["synthetic"]["seed"] == 3
    (tmp_path / "biomedparse" / "meta.json").unlink()  # incomplete -> regenerate
    assert ensure_synthetic(tmp_path, cfg2) is True


def test_checker_on_synthetic(synthetic_root, capsys):
    assert check_main(["synthetic", str(synthetic_root)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # exactly one JSON object on stdout
    assert report["problems"] == []
    assert len(report["modality_groups"]) >= 4
    assert len(report["classes"]) >= 6
    assert report["images"] == 4 * 4 * 3
    assert all(report["splits"][s]["cases"] >= 4 for s in ("train", "val", "test"))
    cases = {s: {r.case for r in read_biomedparse(synthetic_root / "biomedparse" / "meta.json", s,
                                                   ["CT", "MRI", "X-Ray", "Dermoscopy"], 0.15)}
             for s in ("train", "val", "test")}
    assert not (cases["train"] & cases["val"]) and not (cases["train"] & cases["test"]) \
        and not (cases["val"] & cases["test"])
    for name in ("vqa", "instruct", "diagseg"):  # the JSON sets use the same case split
        for split in ("train", "val", "test"):
            rows = json.loads((synthetic_root / name / f"{split}.json").read_text())
            img = [r.get("image", r.get("image_file")) for r in rows]
            assert {Path(p).name.split("_")[0] for p in img} <= cases[split]


def test_checker_reports_case_overlap(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "syn"
    shutil.copytree(synthetic_root, root)
    rows = json.loads((root / "vqa" / "test.json").read_text())
    rows += json.loads((root / "vqa" / "train.json").read_text())[:1]  # a training case leaks into test
    (root / "vqa" / "test.json").write_text(json.dumps(rows))
    report = run_check("synthetic", root)
    assert any("vqa/test.json" in p["file"] and "train split" in p["message"] for p in report["problems"])


def test_lesion_statistics(synthetic_root):
    anns, lesion_free, n_images = [], 0, 0
    for jf in (synthetic_root / "biomedparse").glob("*/*.json"):
        data = json.loads(jf.read_text())
        size = data["images"][0]["height"] * data["images"][0]["width"]
        per_image = {im["id"]: [] for im in data["images"]}
        for a in data["annotations"]:
            per_image[a["image_id"]].append(a)
            anns.append((a["category_id"], a["area"] / size))
        n_images += len(per_image)
        lesion_free += sum(not any(10 <= a["category_id"] <= 14 for a in v) for v in per_image.values())
    lesions = [f for c, f in anns if 10 <= c <= 14]
    assert lesions and max(lesions) < 0.02
    assert len(lesions) / len(anns) >= 0.25
    assert 0 < lesion_free < n_images
    assert len({c for c, _ in anns}) >= 6


def test_text_sets_are_consistent(synthetic_root):
    ins = json.loads((synthetic_root / "instruct" / "train.json").read_text())
    for r in ins:
        n = sum(t["value"].count("<mask>") for t in r["conversations"] if t["from"] == "gpt")
        assert n == len(r["mask_orders"]) and set(r["mask_orders"]) <= set(r["mask_files"])
    assert any(not r["mask_orders"] for r in ins) and any(len(r["conversations"]) > 2 for r in ins)
    vqa = json.loads((synthetic_root / "vqa" / "train.json").read_text())
    assert {r["answer_type"] for r in vqa} == {"CLOSED", "OPEN"}
    assert {r["conversations"][1]["value"] for r in vqa if r["answer_type"] == "CLOSED"} == {"yes", "no"}
    mc = json.loads((synthetic_root / "omnimedvqa" / "CT.json").read_text())
    assert all(r["gt_answer"] in [r[f"option_{c}"] for c in "ABCD"] for r in mc)
    assert (synthetic_root / "corpus.txt").read_text().count("\n") > 20


# --------------------------------------------------------------------------- hand-made BiomedParse data
def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def handmade(tmp_path) -> Path:
    """Real BiomedParse layout written here (not by the generator): 2 datasets, 7 images, 10 masks.
    DsA: train cases a1..a4 (1 slice, liver + tumor on a1), test a5; DsB (absolute paths): train b1 x2 slices."""
    root = tmp_path / "bp"
    rng = np.random.default_rng(0)

    def dataset(name, split, items):
        images, anns = [], []
        for i, (stem, targets) in enumerate(items):
            _png(root / name / split / f"{stem}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            images.append({"file_name": f"{stem}.png", "height": 32, "width": 32, "id": i + 1})
            for j, (target, cat) in enumerate(targets):
                m = np.zeros((32, 32), np.uint8)
                m[4 + j:12 + j, 4:12] = 255
                mf = f"{stem}_{target.replace(' ', '+')}.png"
                _png(root / name / f"{split}_mask" / mf, m)
                anns.append({"mask_file": mf, "area": 64, "iscrowd": 0, "image_id": i + 1, "bbox": [4, 4 + j, 8, 8],
                             "category_id": cat, "id": len(anns) + 1, "slice_ratio": 0.5, "file_name": f"{stem}.png",
                             "split": split, "sentences": [{"raw": target, "sent": target, "sent_id": 1}],
                             "sent_ids": [1], "ann_id": len(anns) + 1, "ref_id": len(anns) + 1})
        (root / name / f"{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": k, "name": str(k)} for k in range(17)]}))

    liver = ("liver", 1)
    dataset("DsA", "train", [("a1_0_CT_abdomen", [liver, ("liver tumor", 10)]), ("a2_0_CT_abdomen", [liver]),
                             ("a3_0_CT_abdomen", [liver]), ("a4_0_CT_abdomen", [liver])])
    dataset("DsA", "test", [("a5_0_CT_abdomen", [liver, ("liver tumor", 10)])])
    dataset("DsB", "train", [("b1_0_MRI_brain", [("brain", 6)]), ("b1_1_MRI_brain", [("brain", 6)])])
    meta = {"roots": ["DsA/train", "DsA/test", str(root / "DsB/train")],
            "mask_roots": ["DsA/train_mask", "DsA/test_mask", str(root / "DsB/train_mask")],
            "json_paths": ["DsA/train.json", "DsA/test.json", str(root / "DsB/train.json")],
            "modality_labels": [0, 0, 1]}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def test_checker_on_handmade_biomedparse(handmade, capsys):
    assert check_main(["biomedparse", str(handmade / "meta.json"), "--groups", "CT,MRI",
                       "--val-fraction", "0.25"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 7 and r["annotations"] == 9
    assert r["classes"] == {"1": 5, "6": 2, "10": 2}
    assert r["modality_groups"] == {"0": 5, "1": 2}
    assert r["splits"] == {"train": {"images": 5, "cases": 4}, "val": {"images": 1, "cases": 1},
                           "test": {"images": 1, "cases": 1}}


def test_checker_names_corrupted_png(handmade, capsys):
    bad = handmade / "DsA" / "train" / "a2_0_CT_abdomen.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    assert check_main(["biomedparse", str(handmade / "meta.json"), "--groups", "CT,MRI"]) != 0
    r = json.loads(capsys.readouterr().out)
    assert any(p["file"] == str(bad) and p["field"] == "file_name" for p in r["problems"])
    assert any(str(bad) in p["message"] for p in r["problems"])


# ---------------------------------------------------------------------------------------- bad input
def _cfg(root: Path, **over) -> object:
    ov = [f"data.root={root}", "data.image_size=32", "data.batch_size=2", "data.format=biomedparse"]
    return load_config("stage1", overrides=ov + [f"data.{k}={v}" for k, v in over.items()])


def _vqa_row(image: str, **kw) -> dict:
    row = {"id": "q1", "image": image, "conversations": [{"from": "human", "value": "<image>\nIs it?"},
                                                          {"from": "gpt", "value": "yes"}],
           "answer_type": "CLOSED", "modality": "CT"}
    row.update(kw)
    return {k: v for k, v in row.items() if v is not None}


def _ins_row(image: str, mask: str, answer: str = "The liver <mask>.", **kw) -> dict:
    row = {"id": "i1", "image": image, "modality": "CT", "mask_files": {"7": mask}, "mask_orders": ["7"],
           "conversations": [{"from": "human", "value": "<image>\nSegment the liver."}, {"from": "gpt", "value": answer}]}
    row.update(kw)
    return row


def _bad_cases(h: Path) -> dict[str, tuple]:
    """name -> (task, set name, rows or None for biomedparse, file expected in the message, field)."""
    img = str(h / "DsA/train/a1_0_CT_abdomen.png")
    mask = str(h / "DsA/train_mask/a1_0_CT_abdomen_liver.png")
    return {
        "missing image": ("vqa", "vqa", [_vqa_row(str(h / "nope.png"))], "nope.png", "image"),
        "unreadable image": ("vqa", "vqa", [_vqa_row(str(h / "garbage.png"))], "garbage.png", "image"),
        "missing field": ("vqa", "vqa", [_vqa_row(img, answer_type=None)], "vqa/train.json", "answer_type"),
        "wrong type": ("vqa", "vqa", [_vqa_row(img, answer_type=3)], "vqa/train.json", "answer_type"),
        "unknown modality": ("vqa", "vqa", [_vqa_row(img, modality="PET")], "vqa/train.json", "modality"),
        "mask count": ("instruct", "instruct", [_ins_row(img, mask, "The liver <mask> <mask>.")],
                       "instruct/train.json", "mask_orders"),
        "missing mask": ("instruct", "instruct", [_ins_row(img, str(h / "nomask.png"))], "nomask.png", "mask_file"),
        "mask size": ("instruct", "instruct", [_ins_row(img, str(h / "small_mask.png"))], "small_mask.png",
                      "mask_file"),
        "unknown category": ("segmentation", "biomedparse", None, "DsA/train.json", "category_id"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(Path("/x"))))
def test_bad_input_raises_data_error(handmade, case):
    (handmade / "garbage.png").write_bytes(b"not an image at all")
    _png(handmade / "small_mask.png", np.zeros((16, 16), np.uint8))
    task, name, rows, fname, field = _bad_cases(handmade)[case]
    if rows is None:  # corrupt the category id of one annotation
        jf = handmade / "DsA/train.json"
        data = json.loads(jf.read_text())
        data["annotations"][0]["category_id"] = 42
        jf.write_text(json.dumps(data))
    else:
        (handmade / name).mkdir(exist_ok=True)
        (handmade / name / "train.json").write_text(json.dumps(rows))
    dm = MedicalDataModule(_cfg(handmade), task)
    with pytest.raises(DataError) as ei:
        dm.dataset("train")
    msg = str(ei.value)
    assert fname in msg and field in msg, msg
    assert ei.value.field == field


def test_on_error_skip_counts_and_logs(handmade, caplog):
    img = str(handmade / "DsA/train/a1_0_CT_abdomen.png")
    rows = [_vqa_row(img), _vqa_row(str(handmade / "nope.png")), _vqa_row(img, modality="PET"),
            _vqa_row(img, answer_type=None), _vqa_row(img)]
    (handmade / "vqa").mkdir()
    (handmade / "vqa" / "train.json").write_text(json.dumps(rows))
    cfg = _cfg(handmade, on_error="skip")
    dm = MedicalDataModule(cfg, "vqa")
    with caplog.at_level(logging.WARNING):
        ds = dm.dataset("train")
    assert len(ds) == 2 and dm.skipped == 3
    assert sum("skipping sample" in r.message for r in caplog.records) == 3
    assert any("skipped 3" in r.getMessage() for r in caplog.records)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)


def test_on_error_skip_without_cache(handmade, caplog):
    img = str(handmade / "DsA/train/a1_0_CT_abdomen.png")
    (handmade / "vqa").mkdir()
    (handmade / "vqa" / "train.json").write_text(json.dumps([_vqa_row(img), _vqa_row(str(handmade / "x.png"))]))
    dm = MedicalDataModule(_cfg(handmade, on_error="skip", cache=False), "vqa")
    batch = collate([dm.dataset("train")[i] for i in range(2)])
    assert batch["image"].shape[0] == 1 and dm.skipped == 1


# ---------------------------------------------------------------------------------------- collate
@pytest.mark.parametrize("counts", [(0, 0), (1, 3), (2, 0, 5), (4,) * 4])
def test_collate_pads_masks(counts):
    S = 8
    samples = [{"image": torch.zeros(3, S, S), "masks": torch.ones(m, S, S, dtype=torch.uint8),
                "labels": torch.arange(1, m + 1), "modality": i % 2, "id": str(i), "case": str(i), "ann_ids": []}
               for i, m in enumerate(counts)]
    b = collate(samples)
    B, M = len(counts), max(counts)
    assert b["image"].shape == (B, 3, S, S)
    assert b["masks"].shape == (B, M, S, S) and b["masks"].dtype == torch.float32
    assert b["mask_valid"].shape == (B, M) and b["mask_valid"].sum(1).tolist() == list(counts)
    assert (b["labels"][~b["mask_valid"]] == -1).all() and (b["labels"][b["mask_valid"]] > 0).all()
    assert (b["masks"].sum((2, 3)) > 0).eq(b["mask_valid"]).all()
    assert b["modality"].dtype == torch.int64 and b["id"] == [str(i) for i in range(B)]


# ------------------------------------------------------------------------------------ datamodule
@pytest.mark.parametrize("task,sources", [("segmentation", None), ("vqa", ("vqa", "omnimedvqa")),
                                          ("instruct", ("instruct", "diagseg", "vqa"))])
def test_datamodule_batches(tiny_cfg, task, sources):
    dm = MedicalDataModule(tiny_cfg, task, sources=sources)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    S, B = 64, 4
    assert b["image"].shape == (B, 3, S, S) and b["image"].dtype == torch.float32
    assert b["modality"].shape == (B,) and int(b["modality"].max()) < 4
    assert len(b["id"]) == len(b["case"]) == B
    if task != "vqa":
        M = b["masks"].shape[1]
        assert b["masks"].shape == (B, M, S, S) and b["mask_valid"].shape == b["labels"].shape == (B, M)
        assert set(b["masks"].unique().tolist()) <= {0.0, 1.0}
        assert [len(a) for a in b["ann_ids"]] == b["mask_valid"].sum(1).tolist()
    if task == "segmentation":
        assert (b["labels"][b["mask_valid"]] >= 1).all()
        train_cases = {s.case for s in dm.dataset("train").samples}
        assert not train_cases & {s.case for s in dm.dataset("val").samples}
    if task == "vqa":
        assert set(b["answer_type"]) <= {"CLOSED", "OPEN"} and all(isinstance(q, str) for q in b["question"])
        t = next(iter(dm.test_dataloader()))
        assert len(t["image"]) == 4
        assert any(o is not None for s in dm.dataset("test").samples for o in [s.options])
    if task == "instruct":
        for conv, n in zip(b["conversations"], b["mask_valid"].sum(1).tolist()):
            assert sum(t["value"].count("<mask>") for t in conv) == n
        kinds = {s.extra["kind"] for s in dm.dataset("train").samples}
        assert kinds == {"instruct", "diagseg", "vqa"}


def test_datamodule_cache_reuses_decoded_images(tiny_cfg):
    tiny_cfg.data.augment = False  # stage 1's default flips/jitters training images; this compares raw pixels
    dm = MedicalDataModule(tiny_cfg, "segmentation")
    ds = dm.dataset("train")
    n = len(dm.store.images)
    assert n == len(ds) > 0
    a = ds[0]["image"]
    assert len(dm.store.images) == n and torch.equal(a, ds[0]["image"])
    mean = torch.tensor(tiny_cfg.data.mean)[:, None, None]
    std = torch.tensor(tiny_cfg.data.std)[:, None, None]
    raw = torch.from_numpy(np.asarray(Image.open(ds.samples[0].image).convert("RGB"))).permute(2, 0, 1) / 255.0
    assert torch.allclose(a, (raw - mean) / std, atol=1e-5)  # 64 px stored, 64 px model input: no resize


def test_missing_synthetic_root_says_how_to_make_it(tmp_path):
    cfg = load_config("stage1", overrides=[f"data.root={tmp_path}"])
    with pytest.raises(DataError, match="medsight.data.synthetic"):
        MedicalDataModule(cfg, "segmentation").dataset("train")


# ------------------------------------------------------------------------ real files from packages
def test_dicom_ct_rescale_and_window():
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img, geo = read_image(path, window="abdomen")
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and geo.modality == "CT"
    c, w = WINDOWS["abdomen"]
    expect = (np.clip((hu - (c - w / 2)) / w, 0, 1) * 255 + 0.5).astype(np.uint8)
    assert np.abs(img[..., 0].astype(int) - expect).max() <= 1  # slope/intercept applied, then windowed
    lung = load_image(path, window="lung")
    assert not np.array_equal(lung, img)
    with pytest.raises(DataError, match="window"):
        load_image(path, window="nope")


def test_dicom_mr_minmax():
    from pydicom.data import get_testdata_file

    img, geo = read_image(get_testdata_file("MR_small.dcm", download=False))
    assert img.shape == (64, 64, 3) and geo.modality == "MR" and geo.window is None
    assert img.min() == 0 and img.max() == 255


@pytest.mark.parametrize("axis,shape", [(0, (96, 24)), (1, (128, 24)), (2, (128, 96))])
def test_nifti_slice_along_axis(axis, shape, tmp_path):
    import nibabel as nib
    from nibabel.testing import data_path

    path = os.path.join(data_path, "example4d.nii.gz")
    img, geo = read_image(path, axis=axis)
    assert img.shape == (*shape, 3) and geo.slice_index == (128, 96, 24)[axis] // 2
    vol = np.asarray(nib.load(path).dataobj)[..., 0]
    sl = np.take(vol, geo.slice_index, axis=axis).astype(np.float32)
    expect = ((sl - sl.min()) / (sl.max() - sl.min()) * 255 + 0.5).astype(np.uint8)
    assert np.abs(img[..., 0].astype(int) - expect).max() <= 1
    out = write_mask(img[..., 0] > 128, geo, tmp_path / "mask.nii.gz")
    back = nib.load(out)
    assert back.shape == (128, 96, 24) and np.allclose(back.affine, nib.load(path).affine)
    assert np.array_equal(np.take(np.asarray(back.dataobj), geo.slice_index, axis=axis), img[..., 0] > 128)


def test_png_roundtrip_retina(tmp_path):
    from skimage import data

    retina = data.retina()[::8, ::8]  # (H, W, 3) uint8
    Image.fromarray(retina).save(tmp_path / "retina.png")
    assert np.array_equal(load_image(tmp_path / "retina.png"), retina)
    Image.fromarray(retina[..., 1]).save(tmp_path / "grey.png")
    grey = load_image(tmp_path / "grey.png")
    assert grey.shape == (*retina.shape[:2], 3) and np.array_equal(grey[..., 2], retina[..., 1])


def test_error_policy_rejects_unknown_mode():
    with pytest.raises(ValueError):
        ErrorPolicy("ignore")


@pytest.mark.parametrize("lesions", [["left lung infection", "right lung infection"], ["left lung infection"],
                                     ["right lung infection"]])
def test_synthetic_vqa_answers_follow_the_findings(lesions):
    """Generated yes/no answers are true of the image: a side with an infection is "yes" (both sides when both
    lungs are infected), the image's own modality is "yes", another modality "no"."""
    from medsight.data.synthetic_images import GROUPS
    from medsight.data.synthetic_text import vqa_items

    xray = next(g for g in GROUPS if g.name == "X-Ray")
    sides = {t.split()[0] for t in lesions}
    for seed in range(20):
        for q, a, _kind in vqa_items(xray, lesions, np.random.default_rng(seed)):
            if q.startswith("Is the infection in the"):
                assert a == ("yes" if q.split()[-2] in sides else "no"), (q, a)
            if q.startswith("Is there an infection in the"):
                assert a == ("yes" if q.split()[-2] in sides else "no"), (q, a)
            if q.startswith("Is this"):
                assert a == ("yes" if q == "Is this an X-ray image?" else "no"), (q, a)
            if q == "Is there any abnormality in this image?":
                assert a == "yes"


def test_synthetic_gold_answers_score_full_recall(synthetic_root):
    """The gold answer text of every generated DiagSeg/VQA item gets recall 1 against its own short answer,
    lesion-free images included ("No abnormality is found" vs short answer "no abnormality")."""
    from medsight.metrics.diagseg import diagnosis_recall

    rows = [r for s in ("train", "val", "test") for r in json.loads((synthetic_root / "diagseg" / f"{s}.json").read_text())]
    assert any(not r["mask_ids"] for r in rows) and any(r["mask_ids"] for r in rows)
    for r in rows:
        assert diagnosis_recall(r["answer"].replace(" <mask>", ""), r["short_answer"]) == 1.0, r["qa_id"]


def test_augmented_segmentation_keeps_binary_masks(tiny_cfg):
    """data.augment: flipped/jittered training images, masks still {0, 1} and flipped with the image (the masks
    were once divided by 255 on this path, so stage 1 trained on empty targets)."""
    assert tiny_cfg.data.augment  # stage 1's default
    ds = MedicalDataModule(tiny_cfg, "segmentation").dataset("train")
    plain_cfg = tiny_cfg.copy()
    plain_cfg.data.augment = False
    plain = MedicalDataModule(plain_cfg, "segmentation").dataset("train")
    flipped = 0
    for i in range(8):
        a, p = ds[i], plain[i]
        assert set(a["masks"].unique().tolist()) <= {0.0, 1.0} and a["masks"].sum() == p["masks"].sum() > 0
        if not torch.equal(a["masks"], p["masks"]):
            assert torch.equal(a["masks"], p["masks"].flip(-1))
            flipped += 1
    assert 0 < flipped < 8


@pytest.mark.parametrize("flip,factor,offset", [(False, 0.0, 0.0), (True, 0.0, 0.0), (False, 0.07, 0.0),
                                                (False, 0.0, -0.04), (True, -0.09, 0.03)])
def test_flip_jitter_is_monais_flip_scale_shift(flip, factor, offset):
    """FlipJitterd's one numpy pass against MONAI's own deterministic transforms for the same draws."""
    from monai.transforms import Flip, ScaleIntensity, ShiftIntensity

    from medsight.data.transforms import FlipJitterd

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 24, 20), dtype=np.uint8)
    masks = (rng.random((2, 24, 20)) > 0.7).astype(np.uint8)
    out = FlipJitterd.apply({"image": image, "masks": masks}, flip, factor, offset)
    ref_img, ref_masks = torch.from_numpy(image.astype(np.float32) / 255.0), torch.from_numpy(masks)
    if flip:
        ref_img, ref_masks = Flip(spatial_axis=1)(ref_img), Flip(spatial_axis=1)(ref_masks)
    if factor:
        ref_img = ScaleIntensity(minv=None, maxv=None, factor=factor)(ref_img)
    if offset:
        ref_img = ShiftIntensity(offset)(ref_img)
    np.testing.assert_allclose(out["image"], np.asarray(ref_img), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["masks"], np.asarray(ref_masks))


def test_flip_jitter_draws_follow_the_seed():
    from medsight.data.transforms import FlipJitterd

    t = FlipJitterd()
    draws = []
    for seed in (1, 2, 1):
        t.set_random_state(seed=seed)
        t.randomize()
        draws.append(t.params)
    assert draws[0] == draws[2]
    many = []
    for seed in range(400):
        t.set_random_state(seed=seed)
        t.randomize()
        many.append(t.params)
    flips, factors, offsets = (np.array(x) for x in zip(*many))
    assert 0.4 < flips.mean() < 0.6 and 0.4 < (factors != 0).mean() < 0.6 and 0.4 < (offsets != 0).mean() < 0.6
    assert np.abs(factors).max() <= 0.1 and np.abs(offsets).max() <= 0.05
