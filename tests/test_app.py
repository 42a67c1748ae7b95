"""The web app (`medsight serve`, src/medsight/app.py) and its uploads (src/medsight/scan.py): the app is launched on
127.0.0.1 over a small random-weight export and called through `gradio_client`; every answer is compared with a
sequential `MedSight.answer` on the same decoded image (the oracle: the library call, not the app's code)."""

from __future__ import annotations

import copy
import json
import socket
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

QUESTIONS = ["Segment the liver.", "Is there a tumor in the liver?", "Describe this image.", "the liver and the kidney"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ct_small() -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm", download=False)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A small joint model (random weights: it emits code tokens, so answers carry regions) saved as an export
    with lineage and test metrics in its meta."""
    from medsight.model import save_joint
    from tests.test_joint import small_joint

    tmp = tmp_path_factory.mktemp("app_export")
    model, cfg = small_joint(tmp, "stage3.max_new_tokens=12")
    meta = {"stage": "stage3", "phases": ["align", "ground", "instruct"], "test_metrics": {"test/closed_accuracy": 0.5},
            "lineage": [{"stage": "stage1", "path": "/x/stage1/export", "created": "2026", "git_sha": "abc"}]}
    save_joint(model, tmp / "export", cfg, meta)
    return tmp / "export"


@pytest.fixture(scope="module")
def served(export, tmp_path_factory):
    """(MedSightApp, URL, client) for the app launched on 127.0.0.1 at a free port, two answers at a time."""
    from gradio_client import Client

    import medsight
    from medsight.app import MedSightApp

    model = medsight.load(export)
    app = MedSightApp(model, export, work_root=tmp_path_factory.mktemp("serve"), concurrency=2)
    demo = app.build()
    _, url, _ = app.launch(demo, "127.0.0.1", free_port(), block=False)
    yield app, url, Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    demo.close()
    app.close()


def png(path: Path, seed: int, size=(40, 48)) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def expected(app, path: Path, question: str, **read) -> dict:
    from medsight.data.io import read_image

    rgb, _ = read_image(path, **read)
    return app.model.answer(rgb, question)


def assert_same(got_text, got_regions, files, want) -> None:
    assert got_text == want["text"]
    assert len(got_regions) == len(want["regions"])
    masks = {Path(f).name: f for f in files}
    for g, w in zip(got_regions, want["regions"]):
        assert (g["code"], g["class_name"], g["box"], g["area"], g["image_index"]) == \
               (w["code"], w["class_name"], w["box"], w["area"], w["image_index"])
        assert g["score"] == pytest.approx(w["score"], abs=1e-6)
        mask = np.asarray(Image.open(masks[g["mask_files"]["png"]])) > 0
        assert np.array_equal(mask, w["mask"])
    assert "answer.json" in masks and json.loads(Path(masks["answer.json"]).read_text())["regions"] == got_regions


def test_api_answers_png_and_dicom_like_answer(served, tmp_path, caplog):
    import logging

    import pydicom
    from gradio_client import handle_file

    caplog.set_level(logging.DEBUG)
    app, _, client = served
    image = png(tmp_path / "doe_john_1961.png", 0)
    text, regions, files = client.predict(handle_file(str(image)), QUESTIONS[0], api_name="/answer")
    want = expected(app, image, QUESTIONS[0])
    assert want["regions"], "the test export should emit at least one region"
    assert_same(text, regions, files, want)
    json.dumps(regions)  # JSON-serialisable
    text, regions, files = client.predict(handle_file(ct_small()), QUESTIONS[1], api_name="/answer")
    assert_same(text, regions, files, expected(app, Path(ct_small()), QUESTIONS[1]))
    # no DICOM header field in the outputs; no upload name in a log line or an output
    answer_json = Path(next(f for f in files if f.endswith("answer.json"))).read_text()
    header = pydicom.dcmread(ct_small(), stop_before_pixels=True)
    for value in (str(header.PatientName), str(header.PatientID), str(header.StudyInstanceUID), "CT_small", "CT\""):
        assert value not in answer_json, value
    assert "doe_john" not in caplog.text and "CT_small" not in caplog.text
    # nothing of the uploads or the per-request folders is left on the server; the uploaded DICOM still exists
    assert list((app.root / "requests").iterdir()) == [] and Path(ct_small()).is_file()
    kept = [p.name for p in (app.root / "gradio").rglob("*") if p.is_file()]
    assert not any(n.startswith(("scan", "doe_john", "CT_small")) for n in kept), kept


def test_api_errors_then_keeps_serving(served, tmp_path):
    from gradio_client import handle_file

    app, _, client = served
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(Exception, match="cannot read") as err:
        client.predict(handle_file(str(bad)), "What is this?", api_name="/answer")
    assert str(app.root) not in str(err.value) and "Traceback" not in str(err.value)
    with pytest.raises(Exception, match="question is empty"):
        client.predict(handle_file(str(png(tmp_path / "a.png", 1))), "  ", api_name="/answer")
    with pytest.raises(Exception, match="unsupported file type"):
        client.predict(handle_file(str(bad.rename(tmp_path / "notes.txt"))), "Q?", api_name="/answer")
    image = png(tmp_path / "ok.png", 2)
    text, regions, files = client.predict(handle_file(str(image)), QUESTIONS[2], api_name="/answer")
    assert_same(text, regions, files, expected(app, image, QUESTIONS[2]))
    assert list((app.root / "requests").iterdir()) == []


def test_four_concurrent_calls(served, tmp_path):
    from gradio_client import handle_file

    app, _, client = served
    images = [png(tmp_path / f"c{i}.png", 10 + i, size=(32 + 8 * i, 40)) for i in range(4)]
    jobs = [client.submit(handle_file(str(im)), q, api_name="/answer") for im, q in zip(images, QUESTIONS)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda j: j.result(timeout=120), jobs))
    for (text, regions, files), im, q in zip(results, images, QUESTIONS):
        assert_same(text, regions, files, expected(app, im, q))


def test_page_handlers_nifti_multiturn_and_downloads(served, tmp_path):
    """The page's own handlers (no browser): a NIfTI volume at a chosen slice/axis/window, two turns, masks in
    the volume's geometry; the second turn is `answer(..., history=first turn)`."""
    import nibabel as nib

    from medsight.data.io import read_image

    app, _, _ = served
    volume = np.random.default_rng(3).normal(0, 300, (24, 20, 6)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    state, slider, axis, preview, info, *_ = app.on_upload(str(path), {})
    assert slider["visible"] and slider["maximum"] == 5 and slider["value"] == 3 and "NIfTI" in info
    assert not path.exists() and Path(state["folder"]).is_dir()  # moved into the session's private folder
    rgb, _ = read_image(state["scan"].path, slice_index=1, axis=2, window=(40.0, 400.0))
    view = app.on_view(1, 2, "abdomen", state)
    assert np.array_equal(view, rgb)
    turn = app.on_ask(QUESTIONS[0], 1, 2, "abdomen", state, [])
    state, chat, overlay, legend, rows, files, cleared = next(turn)  # what Gradio copies before resuming
    want = app.model.answer(rgb, QUESTIONS[0])
    assert [r[2] for r in rows] == [r["code"] for r in want["regions"]] and cleared == ""
    assert chat[-1]["role"] == "assistant" and not any(r["code"] in chat[-1]["content"] for r in want["regions"])
    names = {Path(f).name for f in files}
    assert {"answer.json", "overlay.png"} <= names and (not want["regions"] or "mask_0.nii.gz" in names)
    if want["regions"]:
        mask = nib.load(next(f for f in files if f.endswith("mask_0.nii.gz")))
        assert mask.shape == volume.shape and np.allclose(mask.affine, affine)
        assert np.array_equal(np.asarray(mask.dataobj)[:, :, 1] > 0, want["regions"][0]["mask"])
        assert "<li>" in legend and want["regions"][0]["code"] in legend
    assert list(turn) == [] and not any(Path(f).exists() for f in files)  # the request folder is gone after
    (state, chat2, *_), = list(app.on_ask(QUESTIONS[1], 1, 2, "abdomen", state, chat))
    history = [{"from": "human", "value": QUESTIONS[0]}, {"from": "gpt", "value": want["text"]}]
    second = app.model.answer(rgb, QUESTIONS[1], history=history)
    assert len(chat2) == 4 and state["history"][-1]["value"] == second["text"]
    (state, chat3, *_), = list(app.on_ask(QUESTIONS[1], 2, 2, "abdomen", state, chat2))  # another slice
    assert len(chat3) == 2  # a new conversation
    folder = state["folder"]
    app.on_upload(None, state)  # a new (empty) upload drops the session's scan
    assert not Path(folder).exists()


def test_page_errors_are_messages(served, tmp_path):
    import gradio as gr

    app, _, _ = served
    with pytest.raises(gr.Error, match="upload an image first"):
        list(app.on_ask("Q?", 0, 2, "default", {}, []))
    state, *_ = app.on_upload(str(png(tmp_path / "p.png", 4)), {})
    with pytest.raises(gr.Error, match="question is empty"):
        list(app.on_ask("", 0, 2, "default", state, []))
    with pytest.raises(gr.Error, match="window"):
        list(app.on_ask("Q?", 0, 2, "nonsense", state, []))
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="the upload"):
        state, *_, info, _, _, _, _ = app.on_upload(str(bad), state)
    assert "Cannot use this file" in info and "the upload" in info and "scan" not in state
    assert not Path(state["folder"]).exists() and not bad.exists()
    with pytest.raises(gr.Error, match="upload an image first"):  # the earlier image is gone too
        list(app.on_ask("Q?", 0, 2, "default", state, []))


def dicom_series_zip(path: Path, n: int = 4, second_series: bool = False) -> Path:
    import pydicom

    ds = pydicom.dcmread(ct_small())
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            d = copy.deepcopy(ds)
            d.InstanceNumber = i + 1
            d.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]),
                                      float(ds.ImagePositionPatient[2]) + 5.0 * i]
            arr = d.pixel_array.copy()
            arr[:8, :8] = 100 * i
            d.PixelData = arr.tobytes()
            if second_series and i == n - 1:
                d.SeriesInstanceUID = "1.2.3.4"
            d.save_as(path.parent / "tmp.dcm")
            zf.write(path.parent / "tmp.dcm", f"../../{n - i:02d}_PATIENT_NAME.dcm")  # names are never used
        zf.writestr("README.txt", "not dicom")
    return path


def test_zipped_dicom_series_is_a_volume(tmp_path):
    from medsight.scan import open_upload

    scan = open_upload(dicom_series_zip(tmp_path / "series.zip"), tmp_path / "s")
    assert scan.kind == "dicom_series" and scan.shape == (128, 128, 4) and scan.is_volume
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["scan.nii.gz"]
    # slices ordered by position: the marked corner grows 0, 100, 200, 300 (after rescale) along the volume
    corners = [int(scan.read(k, 2, "-674,700")[0][0, 0, 0]) for k in range(4)]  # HU -1024 .. -324
    assert corners == [0, 36, 73, 109]  # (HU + 1024) / 700 * 255, rounded
    with pytest.raises(Exception, match="2 DICOM series"):
        open_upload(dicom_series_zip(tmp_path / "two.zip", second_series=True), tmp_path / "t")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK not a zip")
    with pytest.raises(Exception, match="not a readable zip"):
        open_upload(bad, tmp_path / "u")


def test_helpers():
    from medsight.app import about_markdown, exposure_warning, legend_html, parse_auth, readable_text
    from medsight.config import load_config
    from medsight.data import DataError
    from medsight.scan import kind_of

    regions = [{"code": "[C0_1]", "class_name": "liver", "score": 0.9}, {"code": "[C1_2]", "class_name": None, "score": 0.5},
               {"code": "[C0_1]", "class_name": "tumor", "score": 0.7}]
    assert readable_text("the liver [C0_1] and [C1_2], again [C0_1].", regions) == \
        "the liver **liver** (1) and **[C1_2]** (2), again **tumor** (3)."
    legend = legend_html(regions)
    assert legend.count("<li>") == 3 and "#e61919" in legend and "score 0.90" in legend
    assert exposure_warning("0.0.0.0", None) and exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", ("u", "p")) is None
    assert parse_auth("me:secret:x") == ("me", "secret:x")
    with pytest.raises(DataError, match="USER:PASSWORD"):
        parse_auth("nopass")
    assert [kind_of(n) for n in ("a.PNG", "b.nii.gz", "c.dcm", "IM0001", "d.zip")] == \
        ["image", "nifti", "dicom", "dicom", "dicom_series"]
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        kind_of("notes.txt")
    cfg = load_config("stage3")
    about = about_markdown({"stage": "stage3", "phases": ["instruct"], "test_metrics": {"test/closed_accuracy": 0.93},
                            "lineage": [{"stage": "stage1", "path": "p1"}]}, cfg, "exp")
    assert "closed_accuracy | 0.930" in about and "from stage1: `p1`" in about


def test_cli_serve_help_and_bad_auth(capsys):
    from medsight import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    assert all(o in text for o in ("--export", "--host", "--port", "--device", "--auth", "--concurrency"))
    assert cli.main(["serve", "--export", "x", "--auth", "nocolon"]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err


@pytest.mark.browser
def test_browser_upload_ask_overlay_legend_offline(served, tmp_path):
    """Headless Debian chromium (DevTools protocol over a pipe, tests/cdp.py): upload a PNG, ask, and the page
    shows the overlay and one legend line per region; every request of the page went to 127.0.0.1."""
    from urllib.parse import urlparse

    from medsight.predict import COLOURS
    from tests.cdp import ask_in_page, chromium_path

    if chromium_path() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    app, url, _ = served
    image = png(tmp_path / "page.png", 0)
    shot = Path(__import__("os").environ.get("MEDSIGHT_SCREENSHOT", tmp_path / "app.png"))
    result = ask_in_page(url, image, QUESTIONS[0], shot)
    want = expected(app, image, QUESTIONS[0])
    assert len(result["legend"]) == len(want["regions"]) > 0
    for line, region in zip(result["legend"], want["regions"]):
        assert region["code"] in line and (region["class_name"] or "") in line and f"score {region['score']:.2f}" in line
    assert "**" not in result["chat"] and not any(r["code"] in result["chat"] for r in want["regions"])
    outside = [u for u in result["urls"] if not u.startswith(("data:", "blob:")) and urlparse(u).hostname != "127.0.0.1"]
    assert result["urls"] and outside == []
    picture = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    for colour in COLOURS[:len(want["regions"])]:  # each region's colour is on screen (legend swatch, outline)
        assert (np.abs(picture.astype(int) - colour).max(1) <= 2).sum() >= 100, colour
