"""Readers of the distributed layouts and `python -m medsight.data.check` on fixtures written in each layout."""

from __future__ import annotations

import json
import pickle

import pytest

from medsight.data import DataError
from medsight.data.check import main as check_main
from medsight.data.check import run_check
from medsight.data.formats import FORMATS, read_format
from medsight.data.formats.common import PathMap
from tests import format_fixtures as fx


def _check(capsys, *argv: str) -> tuple[int, dict]:
    code = check_main(list(argv))
    return code, json.loads(capsys.readouterr().out)


def test_one_table_lists_every_layout():
    assert set(FORMATS) == {"vqa-rad", "slake", "pathvqa", "omnimedvqa", "diagseg", "pubmedvision", "instruct",
                            "biomedparse", "synthetic"}


def test_vqa_rad_split_from_phrase_type(tmp_path, capsys):
    root, want = fx.vqa_rad(tmp_path)
    code, rep = _check(capsys, "vqa-rad", str(root))
    assert code == 0, rep["problems"]
    assert {k: rep[k] for k in ("records", "images", "closed", "open")} == \
        {k: want[k] for k in ("records", "images", "closed", "open")}
    samples = read_format("vqa-rad", root).samples
    assert [s.extra["qid"] for s in samples] == [10, 11, 25]
    assert samples[2].answer == "3"  # a non-str answer is read as str()
    assert len(read_format("vqa-rad", root, "train").samples) == want["train_records"]
    with pytest.raises(DataError, match="splits"):
        read_format("vqa-rad", root, "val")


def test_slake_english_rows_in_file_order(tmp_path, capsys):
    root, want = fx.slake(tmp_path)
    code, rep = _check(capsys, "slake", str(root))
    assert code == 0, rep["problems"]
    assert {k: rep[k] for k in ("records", "images", "closed", "open")} == \
        {k: want[k] for k in ("records", "images", "closed", "open")}
    assert [s.extra["qid"] for s in read_format("slake", root).samples] == want["qids"]
    assert len(read_format("slake", root, lang="all").samples) == 6
    assert [s.id for s in read_format("slake", root, "val").samples] == ["9000"]  # validation.json


def test_llava_style_test_json_wins(tmp_path, capsys):
    root, _ = fx.vqa_rad(tmp_path)
    fx.image(root / "images" / "synpic1.jpg")
    fx.write_json(root / "test.json", [{"id": 10, "image": "synpic1.jpg", "answer_type": "CLOSED", "conversations": [
        {"from": "human", "value": "Is there evidence of an aortic aneurysm?"}, {"from": "gpt", "value": "yes"}]}])
    code, rep = _check(capsys, "vqa-rad", str(root))
    assert code == 0 and rep["records"] == 1 and rep["closed"] == 1


def test_pathvqa_pickle_ids_and_closed(tmp_path, capsys):
    root, want = fx.pathvqa(tmp_path)
    code, rep = _check(capsys, "pathvqa", str(root))
    assert code == 0, rep["problems"]
    assert {k: rep[k] for k in ("records", "images", "closed", "open")} == want
    samples = read_format("pathvqa", root).samples
    assert [s.id for s in samples] == [f"pathvqa_test_{i}" for i in range(4)]
    assert samples[0].image.endswith("images/test/test_0000.jpg")


class _Boom:
    target = ""

    def __reduce__(self):
        import os

        return (os.system, (f"touch '{_Boom.target}'",))


def test_pathvqa_code_carrying_pickle_is_refused_without_running(tmp_path, capsys):
    root, _ = fx.pathvqa(tmp_path)
    flag = tmp_path / "ran.txt"
    _Boom.target = str(flag)
    rows = [{"image": "test_0000", "question": "q?", "answer": _Boom()}]
    pkl = root / "qas" / "test" / "test_qa.pkl"
    pkl.write_bytes(pickle.dumps(rows, protocol=2))
    code, rep = _check(capsys, "pathvqa", str(root))
    assert code == 1 and not flag.exists()
    assert rep["problems"][0]["file"] == str(pkl) and "system" in rep["problems"][0]["message"]


def test_omnimedvqa_groups_by_exact_modality_type(tmp_path, capsys):
    root, want = fx.omnimedvqa(tmp_path)
    code, rep = _check(capsys, "omnimedvqa", str(root))
    assert code == 0, rep["problems"]
    assert rep["records"] == want["records"] and rep["images"] == want["images"]
    assert rep["modalities"] == want["modalities"]
    paper = read_format("omnimedvqa", root, modalities="paper").samples
    assert len(paper) == want["records"] - want["modalities"]["Dermoscopy"]
    assert any(len(s.options) == 2 for s in paper)
    # an unknown modality_type string is a problem naming file and field
    f = root / "QA_information" / "Open-access" / "Set0.json"
    rows = json.loads(f.read_text())
    rows[0]["modality_type"] = "CT (Computed Tomography)"
    f.write_text(json.dumps(rows))
    code, rep = _check(capsys, "omnimedvqa", str(root))
    assert code == 1 and rep["problems"][0]["file"] == str(f) and rep["problems"][0]["field"] == "modality_type"


def test_diagseg_path_map_and_union_masks(tmp_path, capsys):
    path, want, spec = fx.diagseg(tmp_path)
    code, rep = _check(capsys, "diagseg", str(path), "--path-map", spec)
    assert code == 0, rep["problems"]
    assert {k: rep[k] for k in ("records", "images", "masks")} == want
    assert rep["modalities"] == {"US": 1, "MRI": 1, "Dermatoscopy": 1}
    s = read_format("diagseg", path, path_map=PathMap.parse([spec])).samples[1]
    assert len(s.masks) == 1 and len(s.masks[0]) == 3  # the nested entry is one (union) mask
    # without the mapping: non-zero exit naming the missing file and saying no rule matched
    code, rep = _check(capsys, "diagseg", str(path))
    assert code == 1 and rep["problems"][0]["file"].startswith(fx.AUTHORS)
    assert "no path-map rule matched" in rep["problems"][0]["message"]
    # a mapping to the wrong place names the mapping it tried
    code, rep = _check(capsys, "diagseg", str(path), "--path-map", f"{fx.AUTHORS}={tmp_path / 'elsewhere'}")
    assert code == 1 and f"{fx.AUTHORS}={tmp_path / 'elsewhere'}" in rep["problems"][0]["message"]


def test_corrupt_image_is_named(tmp_path, capsys):
    root, _ = fx.slake(tmp_path)
    bad = root / "imgs" / "xmlab103" / "source.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    code, rep = _check(capsys, "slake", str(root), "--workers", "2")
    assert code == 1 and [p["file"] for p in rep["problems"]] == [str(bad)]
    assert "cannot read image" in rep["problems"][0]["message"]


def test_missing_question_file_exits_non_zero_naming_it(tmp_path, capsys):
    code, rep = _check(capsys, "slake", str(tmp_path / "nowhere"))
    assert code == 1 and rep["problems"][0]["file"] == str(tmp_path / "nowhere" / "test.json")


def test_pubmedvision_lists_of_images_and_skipped(tmp_path, capsys):
    path, want = fx.pubmedvision(tmp_path)
    code, rep = _check(capsys, "pubmedvision", str(path))
    assert code == 0, rep["problems"]
    assert {k: rep[k] for k in ("records", "images", "skipped")} == want
    two = [s for s in read_format("pubmedvision", path).samples if len(s.all_images) == 2][0]
    assert two.conversations[0]["value"].startswith("<image>\n<image>\nCompare")
    train = read_format("pubmedvision", path, "train", val_fraction=0.5).samples
    val = read_format("pubmedvision", path, "val", val_fraction=0.5).samples
    assert len(train) + len(val) == want["records"] and not {s.id for s in train} & {s.id for s in val}


def test_instruct_mask_orders_match_string_keys(tmp_path, capsys):
    path, want, spec = fx.instruct(tmp_path)
    code, rep = _check(capsys, "instruct", str(path), "--path-map", spec)
    assert code == 0, rep["problems"]
    assert {k: rep[k] for k in ("records", "images", "masks", "skipped")} == want
    s = read_format("instruct", path, path_map=PathMap.parse([spec])).samples[0]
    assert s.ann_ids == ["27", "28"] and s.masks[0][0].endswith("right+kidney.png")
    assert s.conversations[1]["from"] == "gpt" and s.extra["n_codes"] == 2


def test_sample_opens_only_n_images(tmp_path):
    path, want = fx.pubmedvision(tmp_path, n_single=6)
    rep = run_check("pubmedvision", path, sample=2)
    assert rep["opened"] == 2 and rep["images"] == want["images"] and not rep["problems"]


def test_path_map_rules():
    pm = PathMap.parse(["/a=/x", "/a/b=/y"])
    assert pm.apply("/a/b/c.png") == "/y/c.png" and pm.apply("/a/c.png") == "/x/c.png"
    assert pm.apply("/ab/c.png") == "/ab/c.png"  # folder boundary
    with pytest.raises(DataError, match="OLD=NEW"):
        PathMap.parse(["nonsense"])


def test_2d_set_without_slice_index_is_one_case_per_image():
    from medsight.data.synthetic import case_of

    assert case_of("dermIS_SSM18_dermoscopy_skin.png") != case_of("dermIS_SSM19_dermoscopy_skin.png")
    assert case_of("amos_0001_55_CT_abdomen.png") == case_of("amos_0001_56_CT_abdomen.png") == "amos_0001"
    assert case_of("benign (46)_ultrasound_breast.png") == "benign (46)"


def test_datamodule_reads_a_distributed_layout(tmp_path):
    """data.formats picks the reader from the same table; data.path_map rewrites the authors' prefixes."""
    from medsight.config import load_config
    from medsight.data.datamodule import MedicalDataModule

    root, want = fx.slake(tmp_path)
    path, dwant, spec = fx.diagseg(tmp_path)
    old, new = spec.split("=")
    cfg = load_config("stage3", overrides=["data.format=biomedparse", f"data.root={tmp_path}", "data.image_size=32",
                                           "data.formats.vqa=slake", f"data.vqa={root}", "data.formats.diagseg=diagseg",
                                           f"data.diagseg={path}", f"data.path_map={{{old}: {new}}}",
                                           "data.modality_groups=[CT,MRI,Ultrasound,Dermoscopy]"])
    dm = MedicalDataModule(cfg, "vqa", sources=("vqa",))
    assert [r.extra["qid"] for r in dm.records("test")] == want["qids"]
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape[1:] == (3, 32, 32) and batch["question"][0].startswith("What modality")
    dm = MedicalDataModule(cfg, "instruct", sources=("diagseg",))
    assert len(dm.records("test")) == dwant["records"] and dm.records("train") == []
    assert len(dm.dataset("test")) == dwant["records"]


def test_instruct_rows_recoded_with_our_codebook(tmp_path):
    """The authors' [M..] tokens become <mask> for stage 2, which writes coded files with OUR code tokens
    in their place (mask_orders order); PubMedVision rows without masks are not coded."""
    import os

    from medsight.codes import read_records, write_coded
    from medsight.config import load_config
    from medsight.data.datamodule import MedicalDataModule

    path, _, spec = fx.instruct(tmp_path)
    old, new = spec.split("=")
    cfg = load_config("stage2", overrides=["data.format=biomedparse", f"data.root={tmp_path}",
                                           "data.formats.instruct=instruct", f"data.instruct={path}",
                                           f"data.path_map={{{old}: {new}}}", "data.val_fraction=0.0"])
    dm = MedicalDataModule(cfg, "instruct", sources=("instruct",))
    recs = read_records(dm, kinds=("instruct",))
    assert list(recs) == [("instruct", "train")] and [r.id for r in recs[("instruct", "train")]] == ["17"]
    r = recs[("instruct", "train")][0]
    assert r.conversations[1]["value"] == "Right kidney <mask> and liver <mask>."
    image = os.path.normpath(r.image)
    counts = write_coded(dm, recs, {(image, "27"): (0, 3), (image, "28"): (1, 2)}, tmp_path / "coded")
    assert counts == {"instruct/train": 1}
    row = json.loads((tmp_path / "coded" / "instruct" / "train.json").read_text())[0]
    assert row["id"] == 17 and row["conversations"][1]["value"] == "Right kidney [C0_3] and liver [C1_2]."
    assert read_format("instruct", path, codes="as_coded").samples[0].conversations[1]["value"] == \
        "Right kidney [M0_3] and liver [M0_17]."
