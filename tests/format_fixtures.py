"""Small datasets written in each distributed layout, from the facts in shared/docs/REAL_FORMATS.md.

Each builder writes under `root` and returns the PATH the checker takes plus the exact counts it must report.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

AUTHORS = "/data/aofei/BiomedParse"  # an absolute prefix of the authors' disk, rewritten by --path-map


def image(path: Path, size: int = 24, seed: int = 0, fmt: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)
    return str(path)


def mask(path: Path, size: int = 24, box: tuple[int, int, int, int] = (4, 4, 12, 12)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(m).save(path)
    return str(path)


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def vqa_rad(root: Path) -> tuple[Path, dict]:
    """`VQA_RAD Dataset Public.json` (split in phrase_type; one int answer) + `VQA_RAD Image Folder/`."""
    d = root / "vqarad"
    rows = []
    spec = [(10, "test_freeform", "synpic54610.jpg", "yes", "CLOSED"),
            (11, "test_para", "synpic54610.jpg", "Yes", "CLOSED"),
            (25, "test_freeform", "synpic676.jpg", 3, "OPEN"),  # a non-str answer
            (30, "freeform", "synpic100.jpg", "no", "CLOSED"),
            (31, "para", "synpic100.jpg", "left lung", "OPEN")]
    for qid, phrase, name, ans, at in spec:
        rows.append({"qid": qid, "phrase_type": phrase, "qid_linked_id": f"{qid}a", "image_case_url": "u",
                     "image_name": name, "image_organ": "CHEST", "evaluation": "given", "question": f"Q{qid}?",
                     "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
                     "question_type": "PRES", "answer": ans, "answer_type": at})
        image(d / "VQA_RAD Image Folder" / name, seed=qid)
    write_json(d / "VQA_RAD Dataset Public.json", rows)
    return d, {"records": 3, "images": 2, "closed": 2, "open": 1, "train_records": 2}


def slake(root: Path) -> tuple[Path, dict]:
    """SLAKE 1.0: {train,validation,test}.json with en + zh rows sharing imgs/xmlabN/source.jpg."""
    d = root / "Slake1.0"

    def row(qid, img, lang, q, a, at):
        return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": q, "answer": a, "q_lang": lang,
                "location": "Lung", "modality": "CT", "answer_type": at, "base_type": "vqa",
                "content_type": "Modality", "triple": ["vhead", "_", "_"], "qid": qid}

    test = [row(11934, 102, "en", "What modality is used to take this image?", "CT", "OPEN"),
            row(11935, 102, "zh", "这张图片是什么成像方式?", "CT", "OPEN"),
            row(11940, 102, "en", "Is this a CT image?", "Yes", "CLOSED"),
            row(11950, 103, "en", "Which organs are shown?", "Lung, Spinal Cord", "OPEN"),
            row(11951, 103, "zh", "是否有肺?", "是", "CLOSED"),
            row(11960, 104, "en", "Is the lung healthy?", "No", "CLOSED")]
    write_json(d / "test.json", test)
    write_json(d / "train.json", [row(1, 1, "en", "Is this an MRI?", "No", "CLOSED")])
    write_json(d / "validation.json", [row(9000, 2, "en", "Where is it?", "Lung", "OPEN")])
    for i in (1, 2, 102, 103, 104):
        image(d / "imgs" / f"xmlab{i}" / "source.jpg", seed=i)
    return d, {"records": 4, "images": 3, "closed": 2, "open": 2, "qids": [11934, 11940, 11950, 11960]}


def pathvqa(root: Path) -> tuple[Path, dict]:
    """pvqa/qas/test/test_qa.pkl (image names without extension) + pvqa/images/test/*.jpg."""
    d = root / "pvqa"
    rows = [{"image": "test_0000", "question": "Is this tissue inflamed?", "answer": "yes"},
            {"image": "test_0000", "question": "What cells are seen?", "answer": "neutrophils"},
            {"image": "test_0001", "question": "Are there nuclei?", "answer": "no"},
            {"image": "test_0002", "question": "What organ is this?", "answer": "liver"}]
    (d / "qas" / "test").mkdir(parents=True)
    (d / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps(rows, protocol=2))
    for i in range(3):
        image(d / "images" / "test" / f"test_{i:04d}.jpg", seed=i)
    return d, {"records": 4, "images": 3, "closed": 2, "open": 2}


OMNI_TYPES = ["CT(Computed Tomography)", "MR (Mag-netic Resonance Imaging)", "X-Ray", "ultrasound",
              "OCT (Optical Coherence Tomography", "Fundus Photography", "Microscopy Images", "Dermoscopy"]


def omnimedvqa(root: Path) -> tuple[Path, dict]:
    """OmniMedVQA/QA_information/Open-access/<dataset>.json + Images/<dataset>/...; the exact modality_type
    strings, one row keyed `modality`, two-option rows."""
    d = root / "OmniMedVQA"
    files: dict[str, list] = {}
    counts: dict[str, int] = {}
    groups = ["CT", "MRI", "X-Ray", "Ultrasound", "OCT", "Fundus", "Microscopy", "Dermoscopy"]
    k = 0
    for gi, (mtype, group) in enumerate(zip(OMNI_TYPES, groups)):
        ds = f"Set{gi}"
        n = 2 if gi % 2 == 0 else 1
        for j in range(n):
            rel = f"Images/{ds}/im{j}.png"
            image(d / rel, seed=100 + k)
            item = {"dataset": ds, "question_id": f"{ds}_{j:04d}", "question_type": "Modality Recognition",
                    "question": f"What imaging technique was employed to obtain this picture {k}?",
                    "gt_answer": f"answer {k}", "image_path": rel,
                    "option_A": "PET scan", "option_B": f"answer {k}", "modality_type": mtype}
            if j == 0:
                item["option_C"], item["option_D"] = "Blood test", "Fundus imaging"  # else a two-option row
            if gi == 0 and j == 1:
                item["modality"] = item.pop("modality_type")  # as in `Chest CT Scan.json`
            files.setdefault(ds, []).append(item)
            counts[group] = counts.get(group, 0) + 1
            k += 1
    for ds, items in files.items():
        write_json(d / "QA_information" / "Open-access" / f"{ds}.json", items)
    return d, {"records": k, "images": k, "modalities": counts}


def diagseg(root: Path) -> tuple[Path, dict, str]:
    """SegVQA_Diagnostic_test_vqa.json with the authors' absolute paths (rewrite AUTHORS -> root/BiomedParse)
    and a nested mask_ids entry (a union). Returns (file, counts, the --path-map spec)."""
    local = root / "BiomedParse"
    items = []
    img1 = "BreastUS/BreastUS/test/benign (46)_ultrasound_breast.png"
    m1 = "BreastUS/BreastUS/test_mask/benign (46)_ultrasound_breast_benign+tumor.png"
    image(local / img1, seed=1)
    mask(local / m1)
    items.append({"qa_id": 0, "question": "What abnormality is present on this imaging study? Please provide the "
                  "diagnosis and then segment the lesion.", "answer": "Findings indicate a benign tumor; segment "
                  "the lesion as <mask>.", "short_answer": "Benign tumor", "image_file": f"{AUTHORS}/{img1}",
                  "mask_ids": [54], "masks": [[54, f"{AUTHORS}/{m1}"]], "answer_type": "open", "modality": "US"})
    img2 = "MSD/MSD/Task01_BrainTumour/test/BRATS_480_55_MRI-T1-Gd_brain.png"
    parts = ["non-enhancing+tumor", "edema", "enhancing+tumor"]
    paths = [f"MSD/MSD/Task01_BrainTumour/test_mask/BRATS_480_55_MRI-T1-Gd_brain_{p}.png" for p in parts]
    image(local / img2, seed=2)
    for i, p in enumerate(paths):
        mask(local / p, box=(2 + 4 * i, 2, 6 + 4 * i, 8))
    items.append({"qa_id": 1, "question": "What is seen? Segment it.", "answer": "A brain tumor, shown as <mask>.",
                  "short_answer": "Brain tumor", "image_file": f"{AUTHORS}/{img2}",
                  "mask_ids": [[21231, 21232, 21234]],
                  "masks": [[21231 + i + (i == 2), f"{AUTHORS}/{p}"] for i, p in enumerate(paths)],
                  "answer_type": "open", "modality": "MRI"})
    img3 = "ISIC/ISIC/test/ISIC_0000_dermoscopy_skin.png"
    m3 = "ISIC/ISIC/test_mask/ISIC_0000_dermoscopy_skin_lesion.png"
    image(local / img3, seed=3)
    mask(local / m3)
    items.append({"qa_id": 2, "question": "Diagnose and segment.", "answer": "A melanoma: <mask>.",
                  "short_answer": "Melanoma", "image_file": f"{AUTHORS}/{img3}", "mask_ids": [7],
                  "masks": [[7, f"{AUTHORS}/{m3}"]], "answer_type": "open", "modality": "Dermatoscopy"})
    path = write_json(root / "SegVQA_Diagnostic_test_vqa.json", items)
    return path, {"records": 3, "images": 3, "masks": 5}, f"{AUTHORS}={local}"


def pubmedvision(root: Path, n_single: int = 3) -> tuple[Path, dict]:
    """PubMedVision_Alignment_VQA.json: `image` always a list (1, 2 and 5 images: the 5-image row is dropped);
    no `<image>` in the first human turn."""
    d = root / "PubMedVision"
    rows = []
    for i in range(n_single):
        rel = f"images/pmc_{i}_0.jpg"
        image(d / rel, seed=200 + i)
        rows.append({"id": f"Alignment_{i}", "image": [rel],
                     "conversations": [{"from": "human", "value": f"What does image {i} show?"},
                                       {"from": "gpt", "value": f"It shows finding {i % 2}."}],
                     "modality": "Microscopy Images", "body_part": "Cell"})
    two = [f"images/pmc_90_{j}.jpg" for j in range(2)]
    for j, rel in enumerate(two):
        image(d / rel, seed=300 + j)
    rows.append({"id": "Alignment_90", "image": two,
                 "conversations": [{"from": "human", "value": "Compare the two images."},
                                   {"from": "gpt", "value": "The second shows more."}],
                 "modality": "CT(Computed Tomography)", "body_part": "Chest"})
    five = [f"images/pmc_91_{j}.jpg" for j in range(5)]
    for j, rel in enumerate(five):
        image(d / rel, seed=400 + j)
    rows.append({"id": "Alignment_91", "image": five,
                 "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Panels."}]})
    path = write_json(d / "PubMedVision_Alignment_VQA.json", rows)
    return path, {"records": n_single + 1, "images": n_single + 2, "skipped": 1}


def instruct(root: Path) -> tuple[Path, dict, str]:
    """The authors' instruction JSON: str mask_files keys, int mask_orders, code tokens in the text, absolute
    images, "from": "assistant"; a PubMedVision row mixed in (str id, list image, mask_files null)."""
    local = root / "BiomedParse"
    img = "amos22/amos22/CT/train/amos_0001_55_CT_abdomen.png"
    m1 = "amos22/amos22/CT/train_mask/amos_0001_55_CT_abdomen_right+kidney.png"
    m2 = "amos22/amos22/CT/train_mask/amos_0001_55_CT_abdomen_liver.png"
    image(local / img, seed=5)
    mask(local / m1)
    mask(local / m2, box=(10, 10, 20, 20))
    rows = [{"id": 17, "image": f"{AUTHORS}/{img}",
             "conversations": [{"from": "human", "value": "<image>\nSegment the right kidney and the liver."},
                               {"from": "assistant", "value": "Right kidney [M0_3] and liver [M0_17]."}],
             "mask_files": {"27": f"{AUTHORS}/{m1}", "28": f"{AUTHORS}/{m2}"}, "mask_codes": {"27": "M0_3",
                                                                                             "28": "M0_17"},
             "mask_orders": [27, 28], "modality": "CT"}]
    pmv = root / "BiomedParse" / "pmc_1_0.jpg"
    image(pmv, seed=6)
    rows.append({"id": "Instruction-Tuning_1", "image": [f"{AUTHORS}/pmc_1_0.jpg"],
                 "conversations": [{"from": "human", "value": "What is shown?"},
                                   {"from": "gpt", "value": "Cells."}],
                 "mask_files": None, "mask_codes": None, "mask_orders": []})
    path = write_json(root / "Instruct_71k_1104_updated.json", rows)
    return path, {"records": 2, "images": 2, "masks": 2, "skipped": 0}, f"{AUTHORS}={local}"
