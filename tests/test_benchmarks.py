"""The benchmark suite: `medsight eval run --benchmark ...` on fixtures in each distributed layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsight import cli
from medsight.benchmarks import MCQ_SUFFIX, run_benchmarks
from medsight.scoring import EvalInputError, score_diagseg_file, score_mcq_file, score_vqa_file
from tests import format_fixtures as fx


class EchoModel:
    """Answers 'yes' to closed-looking questions, echoes a word of the question otherwise; one half-image
    region for questions asking to segment. Records the prompts it was given."""

    def __init__(self):
        self.prompts: list[str] = []

    def answer_batch(self, images, questions):
        out = []
        for image, q in zip(images, questions):
            assert isinstance(image, np.ndarray) and image.dtype == np.uint8
            self.prompts.append(q)
            h, w = image.shape[:2]
            mask = np.zeros((h, w), bool)
            mask[: h // 2, : w // 2] = True
            text = "Yes" if q.startswith("Is") else q.split()[-1].strip("?.")
            regions = [{"code": "[M0_1]", "mask": mask, "image_index": 0}] if "egment" in q else []
            out.append({"text": text, "regions": regions})
        return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def sets(tmp_path) -> tuple[Path, str]:
    """A --data folder holding every set under its usual name; returns (folder, DiagSeg --path-map)."""
    data = tmp_path / "data"
    s, _ = fx.slake(data)
    s.rename(data / "SLAKE")
    v, _ = fx.vqa_rad(data)
    v.rename(data / "VQA-RAD")
    (data / "PathVQA").mkdir()
    p, _ = fx.pathvqa(data)
    p.rename(data / "PathVQA" / "pvqa")
    fx.omnimedvqa(data)
    (data / "DiagSeg").mkdir()
    d, _, spec = fx.diagseg(data)
    d.rename(data / "DiagSeg" / d.name)
    return data, spec


def test_slake_answers_in_english_test_order_and_scores_equal_eval_vqa(tmp_path, sets):
    data, _ = sets
    out = tmp_path / "out"
    res = run_benchmarks("unused", "slake", data / "SLAKE", out=out, model=EchoModel())
    lines = _lines(out / "slake" / "answers.jsonl")
    assert [x["question_id"] for x in lines] == [11934, 11940, 11950, 11960]  # English test qids, file order
    assert lines[0]["prompt"] == "What modality is used to take this image?" and lines[0]["gt_ans"] == "CT"
    for p in ("official", "strict"):  # the raw SLAKE file is what `medsight eval vqa --gt` scores
        assert res["slake"][p] == score_vqa_file(data / "SLAKE" / "test.json", out / "slake" / "answers.jsonl", p)
    assert json.loads((out / "results.json").read_text())["slake"]["official"] == res["slake"]["official"]
    assert "slake close" in (out / "report.md").read_text()


def test_all_benchmarks_from_one_folder(tmp_path, sets, capsys, monkeypatch):
    import medsight

    data, spec = sets
    model = EchoModel()
    monkeypatch.setattr(medsight, "load", lambda export_dir, device="cpu": model)
    export = tmp_path / "export"
    export.mkdir()
    out = tmp_path / "out"
    assert cli.main(["eval", "run", "--export", str(export), "--benchmark", "all", "--data", str(data), "--out",
                     str(out), "--path-map", spec, "--batch-size", "2"]) == 0
    capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"run", "vqa-rad", "slake", "pathvqa", "omnimedvqa", "diagseg"}
    assert [x["question_id"] for x in _lines(out / "vqa-rad" / "answers.jsonl")] == [10, 11, 25]
    assert [x["question_id"] for x in _lines(out / "pathvqa" / "answers.jsonl")] == \
        [f"pathvqa_test_{i}" for i in range(4)]
    # OmniMedVQA: the 7 paper modalities (no Dermoscopy), the bare question + the suffix, options not shown
    mods = res["omnimedvqa"]["official"]["per_modality"]
    assert set(mods) == {"CT", "MRI", "X-Ray", "Ultrasound", "OCT", "Fundus", "Microscopy"}
    ct = _lines(out / "omnimedvqa" / "answers_CT.jsonl")
    assert ct[0]["prompt"].endswith("picture 0?" + MCQ_SUFFIX) and "PET scan" not in ct[0]["prompt"]
    for m in mods:
        for p in ("official", "strict"):
            got = score_mcq_file(out / "omnimedvqa" / f"gt_{m}.json", out / "omnimedvqa" / f"answers_{m}.jsonl", p)
            assert got["accuracy"] == mods[m]["accuracy"] if p == "official" else True
    assert res["omnimedvqa"]["official"]["mean"] == pytest.approx(np.mean([v["accuracy"] for v in mods.values()]))
    # DiagSeg: masks written, both protocols, Dermatoscopy merged into Dermoscopy
    dl = _lines(out / "diagseg" / "answers.jsonl")
    assert [x["question_id"] for x in dl] == [0, 1, 2] and all(len(x["masks"]) == 1 for x in dl)
    assert set(res["diagseg"]["official"]["per_modality"]) == {"US", "MRI", "Dermoscopy"}
    assert res["diagseg"]["strict"] == score_diagseg_file(out / "diagseg" / "gt.json", out / "diagseg" /
                                                          "answers.jsonl")
    # `medsight eval diagseg` on the distributed file itself, its authors' paths mapped: the same numbers
    for p in ("official", "strict"):
        assert cli.main(["eval", "diagseg", "--gt", str(data / "DiagSeg" / "SegVQA_Diagnostic_test_vqa.json"),
                         "--pred", str(out / "diagseg" / "answers.jsonl"), "--protocol", p, "--path-map", spec]) == 0
        assert json.loads(capsys.readouterr().out) == res["diagseg"][p]
    report = (out / "report.md").read_text()
    assert "## OmniMedVQA" in report and "## DiagSeg" in report and "pathvqa all" in report


def test_official_diagseg_dice_uses_the_last_entry_union(tmp_path):
    """Oracle by hand: GT union of 3 boxes vs one emitted box."""
    from PIL import Image

    size = 24
    masks, ids = [], [5, 6, 7]
    boxes = [(0, 0, 4, 4), (4, 0, 8, 4), (8, 0, 12, 4)]
    for i, b in zip(ids, boxes):
        masks.append([i, fx.mask(tmp_path / f"m{i}.png", size, b)])
    fx.mask(tmp_path / "first.png", size, (20, 20, 24, 24))
    gt = fx.write_json(tmp_path / "gt.json", [{"qa_id": 0, "question": "q", "short_answer": "tumor", "answer": "x",
                                               "image_file": "i.png", "modality": "Dermatoscopy",
                                               "mask_ids": [9, [5, 6, 7]],
                                               "masks": [[9, str(tmp_path / "first.png")], *masks]}])
    pred_mask = np.zeros((size, size), np.uint8)
    pred_mask[0:4, 0:6] = 255  # 24 px, of which 24 inside the 48-px union
    Image.fromarray(pred_mask).save(tmp_path / "p.png")
    (tmp_path / "pred.jsonl").write_text(json.dumps({"question_id": 0, "text": "a tumor", "masks": ["p.png"]}) + "\n")
    res = score_diagseg_file(gt, tmp_path / "pred.jsonl", protocol="official")
    assert res["dice_micro"] == pytest.approx(100 * 2 * 24 / (24 + 48))
    assert list(res["per_modality"]) == ["Dermoscopy"] and res["diagnosis_recall"] == 100.0


def test_unknown_benchmark_and_missing_set(tmp_path):
    with pytest.raises(EvalInputError, match="unknown benchmark"):
        run_benchmarks("x", "slak", tmp_path, model=EchoModel())
    with pytest.raises(EvalInputError, match="no pathvqa data here"):
        run_benchmarks("x", "pathvqa", tmp_path, model=EchoModel())


def test_eval_vqa_accepts_raw_vqa_rad(tmp_path):
    root, _ = fx.vqa_rad(tmp_path)
    rows = [{"question_id": q, "text": "yes"} for q in (10, 11, 25)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = score_vqa_file(root / "VQA_RAD Dataset Public.json", tmp_path / "p.jsonl", "official")
    assert res["n_closed"] == 2 and res["n_open"] == 1 and res["closed_accuracy"] == 100.0


@pytest.mark.slow
def test_slake_with_a_tiny_trained_export(tmp_path, capsys):
    """A real (tiny, 1-step) stage-3 export answers the SLAKE fixture; `medsight eval vqa` on the same files
    gives the same numbers as results.json."""
    from stages.stage3 import main
    from tests.ddp_smoke import SMALL, make_exports, make_synthetic, small_config

    root = make_synthetic(tmp_path / "syn")
    cfg = small_config(root, tmp_path / "ck")
    make_exports(cfg)
    main([f"data.root={root}", f"out_root={tmp_path / 'ck'}", "run_name=t", *SMALL, "stage3.phases=[instruct]",
          "stage3.instruct.max_steps=1", "stage3.val_batches=1", "stage3.test_batches=1", "stage3.max_new_tokens=4"])
    export = tmp_path / "ck" / "t" / "stage3" / "export"
    slake, want = fx.slake(tmp_path)
    out = tmp_path / "eval"
    assert cli.main(["eval", "run", "--export", str(export), "--benchmark", "slake", "--data", str(slake),
                     "--out", str(out)]) == 0
    capsys.readouterr()
    pred = out / "slake" / "answers.jsonl"
    assert [x["question_id"] for x in _lines(pred)] == want["qids"]
    res = json.loads((out / "results.json").read_text())
    for p in ("official", "strict"):
        assert cli.main(["eval", "vqa", "--gt", str(slake / "test.json"), "--pred", str(pred), "--protocol", p]) == 0
        assert json.loads(capsys.readouterr().out) == res["slake"][p]
