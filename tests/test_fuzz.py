"""Bad input, fuzzed (hypothesis, bounded): every image reader (PNG, JPEG, NIfTI, DICOM, masks), every JSON
record format and the config loader either return a valid result or raise DataError / ConfigError naming the
file (and field); under data.on_error=skip bad records are counted, never dropped silently; headers claiming
huge sizes are refused by data.max_pixels before anything is decoded.

Each example's kind of damage and how it ended are tallied; with MEDSIGHT_FUZZ_TALLY=<file.json> the tally
is written there (for the closing note); MEDSIGHT_FUZZ_EXAMPLES=<n> runs n examples per test instead of 12.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsight.config import ConfigError, load_config
from medsight.data import DataError
from medsight.data import io as mio
from medsight.data.readers import (
    ErrorPolicy,
    read_biomedparse,
    read_conversations,
    read_diagseg,
    read_omnimedvqa,
    read_vqa,
)

TALLY: Counter = Counter()
FUZZ = settings(max_examples=int(os.environ.get("MEDSIGHT_FUZZ_EXAMPLES", "12")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
GROUPS = ["CT", "MRI", "X-Ray", "Dermoscopy"]


@pytest.fixture(scope="module", autouse=True)
def _write_tally():
    yield
    out = os.environ.get("MEDSIGHT_FUZZ_TALLY")
    if out:
        old = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
        for (reader, kind, outcome), n in TALLY.items():
            old.setdefault(reader, {}).setdefault(kind, {})
            old[reader][kind][outcome] = old[reader][kind].get(outcome, 0) + n
        Path(out).write_text(json.dumps(old, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------- seed files
def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _nifti() -> bytes:
    import nibabel as nib

    vol = np.arange(16 * 12 * 5, dtype=np.int16).reshape(16, 12, 5)
    img = nib.Nifti1Image(vol, np.eye(4))
    return img.to_bytes()


def _dicom() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("MR_small.dcm", download=False)).read_bytes()


SEEDS = {"png": (_png(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)), ".png"),
         "png16": (_png(np.random.default_rng(2).integers(0, 65535, (30, 20), dtype=np.uint16)), ".png"),
         "jpeg": (_jpeg(), ".jpg"), "nifti": (_nifti(), ".nii"), "dicom": (_dicom(), ".dcm")}


def _png_with_size(w: int, h: int) -> bytes:
    """A PNG whose IHDR (valid CRC) claims w x h RGB pixels, with a tiny IDAT: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _nifti_with_dims(dims: tuple[int, ...]) -> bytes:
    data = bytearray(SEEDS["nifti"][0])
    full = [len(dims), *dims] + [1] * (7 - len(dims))
    data[40:56] = struct.pack("<8h", *full)  # nifti-1 header field dim[8] (int16) at byte 40
    return bytes(data)


def _dicom_with_size(rows: int, cols: int) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(SEEDS["dicom"][0]))
    ds.Rows, ds.Columns = rows, cols
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def mutate(data: bytes, draw) -> tuple[str, bytes]:
    """(kind, damaged bytes): flipped bytes, truncation, random garbage, inserted bytes, a zeroed header or an
    empty file."""
    kind = draw(st.sampled_from(["flip", "truncate", "garbage", "insert", "zero_header", "empty"]))
    b = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        b = b[: draw(st.integers(0, len(b) - 1))]
    elif kind == "garbage":
        b = bytearray(draw(st.binary(min_size=1, max_size=400)))
    elif kind == "insert":
        i = draw(st.integers(0, len(b)))
        b[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "zero_header":
        n = min(len(b), draw(st.integers(1, 400)))
        b[:n] = bytes(n)
    else:
        b = bytearray()
    return kind, bytes(b)


def _outcome(reader: str, kind: str, fn, *args, **kw):
    try:
        result = fn(*args, **kw)
    except (DataError, ConfigError) as e:
        TALLY[(reader, kind, type(e).__name__)] += 1
        return e
    TALLY[(reader, kind, "ok")] += 1
    return result


# --------------------------------------------------------------------------------------- image readers
@pytest.mark.parametrize("fmt", list(SEEDS))
@FUZZ
@given(data=st.data())
def test_image_readers_fuzzed(fmt, data, tmp_path_factory):
    seed, suffix = SEEDS[fmt]
    kind, damaged = mutate(seed, data.draw)
    path = tmp_path_factory.mktemp("f") / f"x{suffix}"
    path.write_bytes(damaged)
    res = _outcome(f"read_image/{fmt}", kind, mio.read_image, path)
    if isinstance(res, Exception):
        assert str(path) in str(res)
    else:
        img, _ = res
        assert img.ndim == 3 and img.shape[-1] == 3 and img.dtype == np.uint8 and min(img.shape[:2]) >= 1


@FUZZ
@given(data=st.data())
def test_mask_reader_fuzzed(data, tmp_path_factory):
    kind, damaged = mutate(_png((np.random.default_rng(3).random((48, 64)) > 0.5).astype(np.uint8) * 255), data.draw)
    path = tmp_path_factory.mktemp("m") / "m.png"
    path.write_bytes(damaged)
    res = _outcome("read_mask/png", kind, mio.read_mask, path, (48, 64), source="rec.json", field="mask_file")
    if isinstance(res, Exception):
        assert str(path) in str(res) and res.field == "mask_file"
    else:
        assert res.dtype == bool and res.shape == (48, 64)


@pytest.mark.parametrize("fmt,make", [
    ("png", lambda: _png_with_size(100_000, 100_000)), ("png", lambda: _png_with_size(20_000, 20_000)),
    ("nifti", lambda: _nifti_with_dims((30_000, 30_000, 30_000))), ("nifti", lambda: _nifti_with_dims((4000, 4000, 20))),
    ("dicom", lambda: _dicom_with_size(60_000, 60_000))])
def test_huge_headers_refused_before_decoding(fmt, make, tmp_path, monkeypatch):
    """Headers that claim huge sizes: refused from the header (no allocation), naming the file."""
    import tracemalloc

    monkeypatch.setattr(mio, "MAX_PIXELS", 1 << 28)
    path = tmp_path / f"bomb{SEEDS[fmt][1]}"
    path.write_bytes(make())
    tracemalloc.start()
    with pytest.raises(DataError) as err:
        mio.read_image(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    TALLY[(f"read_image/{fmt}", "huge_header", "DataError")] += 1
    assert str(path) in str(err.value) and ("max_pixels" in str(err.value) or "bomb" in str(err.value))
    assert peak < 64 << 20  # nothing of the claimed size was allocated


def test_max_pixels_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    path.write_bytes(SEEDS["png"][0])
    monkeypatch.setattr(mio, "MAX_PIXELS", mio.MAX_PIXELS)
    mio.set_max_pixels(48 * 64)
    assert mio.read_image(path)[0].shape == (48, 64, 3)
    mio.set_max_pixels(48 * 64 - 1)
    with pytest.raises(DataError, match="data.max_pixels=3,071"):
        mio.read_image(path)
    with pytest.raises(DataError, match="max_pixels"):
        mio.set_max_pixels(0)
    cfg = load_config("stage1", overrides=["data.max_pixels=1000"])
    assert cfg.data.max_pixels == 1000


# ----------------------------------------------------------------------------------------- JSON formats
JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6)
                    | st.floats(allow_nan=False, allow_subnormal=False, width=32) | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                    max_leaves=12)
READERS = {"vqa": (read_vqa, "vqa/train.json"), "instruct": (read_conversations, "instruct/train.json"),
           "diagseg": (read_diagseg, "diagseg/train.json"), "omnimedvqa": (read_omnimedvqa, "omnimedvqa/CT.json")}


def _records(root: Path, rel: str) -> list[dict]:
    return json.loads((root / rel).read_text())[:3]


@pytest.mark.parametrize("fmt", list(READERS))
@FUZZ
@given(data=st.data())
def test_json_record_formats_fuzzed(fmt, data, synthetic_root, tmp_path_factory):
    reader, rel = READERS[fmt]
    rows = _records(synthetic_root, rel)
    kind = data.draw(st.sampled_from(["drop_field", "retype_field", "random_record", "random_file", "not_json"]))
    k = data.draw(st.integers(0, len(rows) - 1))
    text = None
    if kind == "drop_field":
        rows[k].pop(data.draw(st.sampled_from(sorted(rows[k]))))
    elif kind == "retype_field":
        rows[k][data.draw(st.sampled_from(sorted(rows[k])))] = data.draw(JSON)
    elif kind == "random_record":
        rows[k] = data.draw(JSON)
    elif kind == "random_file":
        text = json.dumps(data.draw(JSON))
    else:
        raw = json.dumps(rows)
        text = raw[: data.draw(st.integers(0, len(raw) - 2))]
    path = tmp_path_factory.mktemp("j") / Path(rel).name
    path.write_text(text if text is not None else json.dumps(rows))
    res = _outcome(f"{fmt}.json", kind, reader, path, GROUPS, synthetic_root)
    if isinstance(res, Exception):
        assert str(path) in str(res)
    # skip: every record is either read or counted (never silently dropped); file-level damage still raises
    policy = ErrorPolicy("skip")
    try:
        out = reader(path, GROUPS, synthetic_root, policy)
    except DataError as e:
        assert text is not None or kind == "random_record", e  # only a broken file (or top level) raises
        return
    if text is None:
        assert len(out) + policy.skipped == len(rows)
        TALLY[(f"{fmt}.json", kind, f"skip:{policy.skipped}_counted")] += 1


@FUZZ
@given(data=st.data())
def test_biomedparse_meta_fuzzed(data, synthetic_root, tmp_path_factory):
    meta = json.loads((synthetic_root / "biomedparse" / "meta.json").read_text())
    kind = data.draw(st.sampled_from(["drop_field", "retype_field", "random_file"]))
    if kind == "drop_field":
        meta.pop(data.draw(st.sampled_from(sorted(meta))))
    elif kind == "retype_field":
        meta[data.draw(st.sampled_from(sorted(meta)))] = data.draw(JSON)
    else:
        meta = data.draw(JSON)
    d = tmp_path_factory.mktemp("b")
    path = d / "meta.json"
    path.write_text(json.dumps(meta))
    res = _outcome("biomedparse meta.json", kind, read_biomedparse, path, "train", GROUPS, 0.25, ErrorPolicy("skip"))
    if isinstance(res, Exception):
        assert str(path) in str(res) or str(d) in str(res)


# ------------------------------------------------------------------------------------------- config
@FUZZ
@given(key=st.sampled_from(["trainer.max_steps", "data.batch_size", "data.on_error", "stage3.align.lr",
                            "llm.lora.r", "data.modality_groups", "vision.name", "trainer.devices", "seed"])
       | st.text("abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=20),
       value=st.text(max_size=16) | st.integers().map(str) | st.floats(allow_subnormal=False).map(str))
def test_config_loader_fuzzed(key, value):
    kind = "known_key" if "." in key or key == "seed" else "unknown_key"
    res = _outcome("config key=value", kind, load_config, "stage1", overrides=[f"{key}={value}"])
    if isinstance(res, ConfigError):
        assert key.split(".")[0] in str(res) or "key" in str(res)
