"""The `medsight` CLI beyond scoring: `eval run` (generation harness) and `predict`, driven by a fake
model that honours the `medsight.load(...)` contract (answer / answer_batch), plus help and error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medsight
from medsight import cli
from medsight.evaluate import run_evaluation


class FakeModel:
    """answer_batch(images, questions) -> [{"text", "regions": [{code, class_name, mask, score}]}]."""

    def __init__(self):
        self.batches: list[int] = []

    def answer(self, image, question):
        return self.answer_batch([image], [question])[0]

    def answer_batch(self, images, questions):
        self.batches.append(len(images))
        out = []
        for image, question in zip(images, questions):
            assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape[2] == 3
            h, w = image.shape[:2]
            mask = np.zeros((h, w), bool)
            mask[: h // 2, : w // 2] = True
            if "Options:" in question:
                text = "B"
            elif question.startswith("Is"):
                text = "Yes."
            else:
                text = "There is a tumor [C0_1]."
            regions = [{"code": "[C0_1]", "class_name": "tumor", "mask": mask, "score": 0.9}] \
                if "segment" in question.lower() else []
            out.append({"text": text, "regions": regions})
        return out


def _png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A dataset root laid out like data/synthetic (paths relative to the root)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(4):
        _png(root / "img" / f"{i}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    quadrant = np.zeros((16, 16), np.uint8)
    quadrant[:8, :8] = 255
    _png(root / "masks" / "q.png", quadrant)
    _png(root / "masks" / "bottom.png", np.flipud(quadrant))
    vqa = [{"id": f"v{i}", "image": f"img/{i % 4}.png", "answer_type": t,
            "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
           for i, (q, a, t) in enumerate([("Is there a tumor?", "yes", "CLOSED"), ("Is it normal?", "no", "CLOSED"),
                                          ("What is seen?", "a tumor", "OPEN"), ("Which organ?", "liver", "OPEN"),
                                          ("Is this CT?", "yes", "CLOSED")])]
    (root / "vqa").mkdir()
    (root / "vqa" / "test.json").write_text(json.dumps(vqa))
    (root / "omnimedvqa").mkdir()
    for name, gt in (("CT", "MRI"), ("MRI", "CT")):
        rows = [{"question_id": f"{name}{i}", "question": "Which modality?", "gt_answer": gt, "image_path": "img/1.png",
                 "option_A": "CT", "option_B": "MRI", "option_C": "X-Ray", "option_D": "PET", "modality_type": name}
                for i in range(3)]
        (root / "omnimedvqa" / f"{name}.json").write_text(json.dumps(rows))
    diag = [
        {"qa_id": "d0", "question": "What abnormality? Please segment it.", "answer": "A tumor <mask>.",
         "short_answer": "tumor", "image_file": "img/0.png", "mask_ids": [1], "masks": [[1, "masks/q.png"]],
         "answer_type": "OPEN", "modality": "CT"},
        {"qa_id": "d1", "question": "Diagnose and segment.", "answer": "A tumor <mask>.", "short_answer": "cyst",
         "image_file": "img/2.png", "mask_ids": [[1, 2]], "masks": [[1, "masks/q.png"], [2, "masks/bottom.png"]],
         "answer_type": "OPEN", "modality": "MRI"},
        {"qa_id": "d2", "question": "What abnormality?", "answer": "None.", "short_answer": "tumor",
         "image_file": "img/3.png", "mask_ids": [], "masks": [], "answer_type": "OPEN", "modality": "MRI"},
    ]
    (root / "diagseg").mkdir()
    (root / "diagseg" / "test.json").write_text(json.dumps(diag))
    return root


def test_eval_run_with_fake_model(tiny_data, tmp_path):
    model = FakeModel()
    export = tmp_path / "ckpt" / "stage3" / "export"
    export.mkdir(parents=True)
    res = run_evaluation(export, data=tiny_data, batch_size=2, seed=3, model=model)
    out = tmp_path / "ckpt" / "eval"  # next to the export: checkpoints/<run>/eval
    assert res["out"] == str(out)
    assert max(model.batches) == 2  # batched generation
    expected_files = {"results.json", "report.md", "vqa_predictions.jsonl", "omnimedvqa_CT_predictions.jsonl",
                      "omnimedvqa_MRI_predictions.jsonl", "diagseg_predictions.jsonl", "diagseg_masks", "gt"}
    assert {p.name for p in out.iterdir()} == expected_files
    saved = json.loads((out / "results.json").read_text())
    assert saved["run"]["seed"] == 3 and saved["run"]["decoding"] == "greedy"
    # VQA: "Yes." to the three closed questions -> 2 of 3 hits; open answers "There is a tumor [C0_1]."
    assert saved["vqa_official"]["closed_accuracy"] == pytest.approx(200 / 3)
    assert saved["vqa_strict"]["open_recall"] == pytest.approx(50.0)   # "tumor" found, "liver" not
    # MCQ: always "B" (MRI): CT file all right, MRI file all wrong under strict; official cannot map "B"
    assert saved["omnimedvqa_strict"]["per_file"] == {"CT": {"accuracy": 100.0, "n": 3}, "MRI": {"accuracy": 0.0, "n": 3}}
    assert saved["omnimedvqa_strict"]["accuracy_macro"] == saved["omnimedvqa_strict"]["accuracy_micro"] == 50.0
    assert saved["omnimedvqa_official"]["accuracy_micro"] == 0.0
    # DiagSeg: d0 exact quadrant (Dice 1), d1 quadrant vs union of two quadrants (2*64/(64+128)), d2 no GT mask
    diag = saved["diagseg"]
    assert diag["per_modality"]["CT"]["dice"] == pytest.approx(100.0)
    assert diag["per_modality"]["MRI"]["dice"] == pytest.approx(100 * 128 / 192)
    assert diag["dice_micro"] == pytest.approx(100 * (1 + 128 / 192) / 2)
    assert (diag["n"], diag["n_no_mask"], diag["n_no_target"]) == (3, 0, 1)
    report = (out / "report.md").read_text()
    assert "| official |" in report and "| strict |" in report and "DiagSeg" in report
    assert res["table"] == report


def test_cli_eval_run_uses_medsight_load(tiny_data, tmp_path, monkeypatch, capsys):
    loaded = {}

    def fake_load(export_dir, device="cpu"):
        loaded["export"], loaded["device"] = str(export_dir), device
        return FakeModel()

    monkeypatch.setattr(medsight, "load", fake_load)
    export = tmp_path / "run" / "stage3" / "export"
    export.mkdir(parents=True)
    out = tmp_path / "elsewhere"
    assert cli.main(["eval", "run", "--export", str(export), "--data", str(tiny_data), "--out", str(out),
                     "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "closed acc" in printed and loaded["export"] == str(export)
    assert json.loads((out / "results.json").read_text())["vqa_official"]["n_closed"] == 2


def test_cli_eval_run_errors(tmp_path, capsys):
    assert cli.main(["eval", "run", "--export", str(tmp_path), "--data", str(tmp_path / "none")]) == 2
    assert "make data" in capsys.readouterr().err


def test_predict_png(tmp_path):
    image = _png(tmp_path / "scan.png", np.full((16, 16), 100, np.uint8))
    out = tmp_path / "pred"
    from medsight.predict import predict

    res = predict("unused", image, "Please segment the tumor.", out, model=FakeModel())
    assert res["text"] == "There is a tumor [C0_1]."
    region = res["regions"][0]
    assert set(region) == {"code", "class_name", "score", "box", "area", "image_index", "mask_files"}
    assert (region["code"], region["class_name"], region["area"], region["image_index"]) == ("[C0_1]", "tumor", 64, 0)
    assert region["box"] == [0, 0, 8, 8]  # [x0, y0, x1, y1) of the top-left 8 x 8 quadrant
    assert region["score"] == pytest.approx(0.9)
    assert {p.name for p in out.iterdir()} == {"answer.json", "mask_0.png", "overlay.png"}
    assert np.asarray(Image.open(out / "mask_0.png")).sum() == 64 * 255
    overlay = np.asarray(Image.open(out / "overlay.png"))
    assert overlay.shape == (512, 512, 3) and not (overlay == 100).all()  # enlarged for legible labels


def test_predict_nifti_writes_mask_in_volume_geometry(tmp_path, monkeypatch, capsys):
    import nibabel as nib

    volume = np.random.default_rng(0).normal(0, 100, (16, 16, 5)).astype(np.float32)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    monkeypatch.setattr(medsight, "load", lambda export_dir, device="cpu": FakeModel())
    out = tmp_path / "pred"
    assert cli.main(["predict", "--export", "x", "--image", str(path), "--slice", "3", "--axis", "2",
                     "--window", "abdomen", "--question", "Segment the tumor.", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["slice"] == 3 and printed["regions"][0]["mask_files"]["nifti"] == "mask_0.nii.gz"
    mask = nib.load(str(out / "mask_0.nii.gz"))
    assert mask.shape[:3] == (16, 16, 5) and np.allclose(mask.affine, affine)
    data = np.asarray(mask.dataobj)
    assert data[..., 3].sum() == 64 and data.sum() == 64


def test_predict_dicom(tmp_path, monkeypatch, capsys):
    from pydicom import examples

    monkeypatch.setattr(medsight, "load", lambda export_dir, device="cpu": FakeModel())
    out = tmp_path / "pred"
    assert cli.main(["predict", "--export", "x", "--image", str(examples.get_path("ct")), "--window", "40,400",
                     "--question", "What is this?", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["image_size"] == [128, 128] and printed["regions"] == []
    assert (out / "overlay.png").is_file()


def test_predict_unreadable_image_is_an_error_and_never_answers(tmp_path, monkeypatch, capsys):
    model = FakeModel()
    monkeypatch.setattr(medsight, "load", lambda export_dir, device="cpu": model)
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    for image in (bad, tmp_path / "missing.png"):
        code = cli.main(["predict", "--export", "x", "--image", str(image), "--question", "Q?",
                         "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and str(image) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert model.batches == []


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "eval" in text and "predict" in text
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = capsys.readouterr().out
    assert all(t in text for t in ("vqa", "mcq", "diagseg", "run"))
