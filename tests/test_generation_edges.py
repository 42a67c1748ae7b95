"""Generation edge cases, defined and pinned through `medsight predict`'s answer.json (a tiny random joint
model whose greedy decoding is replaced by fixed token sequences):

- an answer with no code: text only, `regions: []`;
- a code of another modality group than the image's (e.g. an MRI code on a CT question): kept; its mask is
  decoded from the hidden state at its own position like any other code (no group check at inference: the
  model has no image-group prediction there), the region's `code` names the group it came from;
- more codes than the perceiver has queries: one region per emitted code (masks come from each code's hidden
  state, not from a query slot), in the order emitted;
- an answer cut at max_new_tokens (no end-of-turn token): the text is what was generated, and every code
  emitted before the cut has its region.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medsight.models.joint import MedSightLM
from tests.test_joint import small_joint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medsight.model import MedSight

    model, cfg = small_joint(tmp_path_factory.mktemp("joint"), "stage3.max_new_tokens=12")
    return MedSight(model.eval(), cfg, {})


def _answer(tiny, tmp_path, monkeypatch, pieces: list[str], stop: bool) -> dict:
    """answer.json when greedy decoding emits `pieces` (text or code tokens), then end-of-turn if `stop`."""
    from medsight.predict import predict

    m = tiny.model
    ids: list[int] = []
    for p in pieces:
        ids += [m.tokenizer.convert_tokens_to_ids(p)] if p.startswith("[C") else m.tokenizer.encode(
            p, add_special_tokens=False)
    ids += m.stop_ids()[:1] if stop else []
    real = MedSightLM.generate

    def fixed(self, feats, regions, conversations, max_new_tokens=48, *args, **kwargs):
        prompt, _ = real(self, feats, regions, conversations, 1, *args, **kwargs)
        return prompt, [list(ids[:max_new_tokens])]

    monkeypatch.setattr(MedSightLM, "generate", fixed)
    image = tmp_path / "ct.png"
    Image.fromarray(np.full((36, 44, 3), 80, np.uint8)).save(image)
    predict("unused", image, "Segment the liver.", tmp_path / "out", model=tiny)
    return json.loads((tmp_path / "out" / "answer.json").read_text())


def test_no_code(tiny, tmp_path, monkeypatch):
    a = _answer(tiny, tmp_path, monkeypatch, ["no abnormality"], stop=True)
    assert a["regions"] == [] and "[C" not in a["text"] and a["text"].strip()


def test_code_of_another_group_is_kept(tiny, tmp_path, monkeypatch):
    a = _answer(tiny, tmp_path, monkeypatch, ["the liver", "[C1_2]"], stop=True)  # group 1 (MRI) on a CT image
    (r,) = a["regions"]
    assert r["code"] == "[C1_2]" and r["mask_files"]["png"] == "mask_0.png"
    mask = np.asarray(Image.open(tmp_path / "out" / "mask_0.png"))
    assert mask.shape == (36, 44) and r["area"] == int((mask > 0).sum())


def test_more_codes_than_queries(tiny, tmp_path, monkeypatch):
    n_queries = tiny.cfg.perceiver.num_queries
    codes = [f"[C{g}_{k}]" for g in range(2) for k in range(4)][: n_queries + 2]
    a = _answer(tiny, tmp_path, monkeypatch, ["the liver", *codes], stop=True)
    assert [r["code"] for r in a["regions"]] == codes and len(codes) > n_queries
    assert [r["mask_files"]["png"] for r in a["regions"]] == [f"mask_{i}.png" for i in range(len(codes))]


def test_cut_at_max_new_tokens(tiny, tmp_path, monkeypatch):
    pieces = ["the liver", "[C0_1]", "and the kidney and the liver and the kidney", "[C0_2]"]
    a = _answer(tiny, tmp_path, monkeypatch, pieces, stop=False)
    m = tiny.model
    n_before = len(m.tokenizer.encode("the liver", add_special_tokens=False)) + 1
    assert tiny.max_new_tokens == 12 and n_before < 12  # the cut falls after the first code, before the second
    assert [r["code"] for r in a["regions"]] == ["[C0_1]"]
    assert "[C0_1]" in a["text"] and "[C0_2]" not in a["text"]
