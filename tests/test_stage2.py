"""Stage 2 (region codebook): strict hand-off from stage 1, the trainable set, export round trip, code
assignment invariants and a fast_dev_run of the whole stage on the session's small synthetic dataset."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medsight.codes import code_record, consistency_report
from medsight.config import load_config, run_dir
from medsight.export import ExportError, load_component, read_meta, save_export
from medsight.models import stage1_components
from medsight.models.codebook import build_quantizer, load_quantizer
from medsight.regions import Regions

TINY = ["vision.width=32", "vision.depth=1", "perceiver.dim=32", "perceiver.num_queries=8", "perceiver.num_stages=1",
        "perceiver.heads=2", "perceiver.head_dim=16", "codebook.num_codes=8", "codebook.code_dim=16",
        "data.image_size=64", "data.batch_size=4", "data.eval_batch_size=8", "codebook.query_batch=64"]


@pytest.fixture
def tiny_root(synthetic_root) -> Path:
    """The session's small synthetic dataset (tests/conftest.py)."""
    return synthetic_root


def _overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"out_root={out}", "run_name=t", *TINY, *extra]


def _stage1_export(root: Path, out: Path, *extra: str) -> Path:
    """An export of freshly built tiny stage-1 modules (what stage 2 starts from)."""
    cfg = load_config("stage1", overrides=_overrides(root, out, *extra))
    torch.manual_seed(0)
    return save_export(run_dir(cfg) / "export", cfg, stage1_components(cfg))


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.json"))}


# --------------------------------------------------------------------------------------- hand-off
def test_missing_stage1_export_says_run_stage1(tmp_path, tiny_root):
    from stages.stage2 import main

    with pytest.raises(ExportError, match="run make stage1 first"):
        main(_overrides(tiny_root, tmp_path))


def test_strict_load_fails_on_dimension_mismatch(tmp_path, tiny_root):
    from stages.stage2 import CodebookModule

    export = _stage1_export(tiny_root, tmp_path)
    cfg = load_config("stage2", overrides=_overrides(tiny_root, tmp_path, "perceiver.dim=64"))
    with pytest.raises(ExportError, match=r"perceiver_dim: export 32 vs config 64"):
        CodebookModule(_plain(cfg), str(export))
    # an export whose weights do not fit its own config: strict loading names the mismatching keys
    other = load_config("stage1", overrides=_overrides(tiny_root, tmp_path / "o", "perceiver.ff_mult=2"))
    save_file({k: v.contiguous() for k, v in stage1_components(other)["perceiver"].state_dict().items()},
              str(export / "perceiver.safetensors"))
    (export / "manifest.json").unlink()  # (with its manifest the replaced file is refused before loading)
    cfg = load_config("stage2", overrides=_overrides(tiny_root, tmp_path))
    with pytest.raises(ExportError, match=r"component 'perceiver' .*shape mismatches"):
        CodebookModule(_plain(cfg), str(export))


def _plain(cfg) -> dict:
    from medsight.config import to_dict

    return to_dict(cfg)


def test_trainable_set_is_the_quantizer_only(tmp_path, tiny_root):
    from stages.stage2 import CodebookModule

    export = _stage1_export(tiny_root, tmp_path)
    cfg = load_config("stage2", overrides=_overrides(tiny_root, tmp_path))
    model = CodebookModule(_plain(cfg), str(export))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"quantizer.{n}" for n, _ in model.quantizer.named_parameters()}
    assert trainable == expected
    assert {"quantizer.modality_head.weight", "quantizer.codebook", "quantizer.w_q.0.weight",
            "quantizer.w_m.3.weight"} <= trainable
    # the frozen modules really hold the stage-1 weights
    state = load_component(export, "perceiver")
    assert all(torch.equal(v, state[k]) for k, v in model.perceiver.state_dict().items())


# ------------------------------------------------------------------------------------------ export
def test_export_round_trip(tmp_path):
    cfg = load_config("stage2", overrides=TINY)
    torch.manual_seed(0)
    q = build_quantizer(cfg, enc_dim=24).eval()
    with torch.no_grad():
        emb = q.code_embeddings()
    save_export(tmp_path / "export", cfg, {"codebook": q, "code_embeddings": {"embeddings": emb}},
                extra_meta={"encoder_dim": 24, "code_tokens": ["x"] * len(emb)})
    loaded, _ = load_quantizer(tmp_path / "export")
    for k, v in q.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert torch.equal(load_component(tmp_path / "export", "code_embeddings")["embeddings"], emb)
    assert emb.shape == (cfg.codebook.num_groups * cfg.codebook.num_codes, cfg.perceiver.dim)


# ---------------------------------------------------------------------------------- code assignment
def _region(image: str, group: int, labels: list[int], ann_ids: list[str]) -> Regions:
    t = len(ann_ids)
    return Regions(image=image, id=Path(image).stem, group=group, split="train", pooled=torch.zeros(4),
                   queries=torch.zeros(t, 8), pred_idx=torch.arange(t), labels=torch.tensor(labels), ann_ids=ann_ids,
                   is_union=torch.tensor(["+" in a for a in ann_ids]))


def test_code_record_and_consistency_on_hand_made_cases():
    from medsight.data.readers import Sample

    rec = Sample(id="r", image="/d/a.png", modality=1, case="a", source="x", ann_ids=["7", "5"])
    row = {"id": "r", "conversations": [{"from": "human", "value": "<image>\nSegment <mask> please"},
                                        {"from": "gpt", "value": "Liver <mask>."}, {"from": "human", "value": "more"},
                                        {"from": "gpt", "value": "Kidney <mask>."}], "mask_orders": ["7", "5"]}
    assign = {("/d/a.png", "7"): (1, 3), ("/d/a.png", "5"): (1, 0)}
    out = code_record("instruct", row, rec, assign)
    assert out["conversations"][1]["value"] == "Liver [C1_3]." and out["conversations"][3]["value"] == "Kidney [C1_0]."
    assert out["conversations"][0]["value"] == row["conversations"][0]["value"]  # human turns untouched
    assert out["codes"] == ["[C1_3]", "[C1_0]"] and "<mask>" in row["conversations"][1]["value"]  # copy
    dx = code_record("diagseg", {"answer": "A <mask> and <mask>."}, Sample(id="q", image="/d/a.png", modality=1, case="a",
                                                                            source="x", ann_ids=["5", "7"]), assign)
    assert dx["answer"] == "A [C1_0] and [C1_3]."

    regions = [_region("/d/a.png", 0, [1, 3, 3], ["1", "2", "2+3"]), _region("/d/b.png", 0, [1, 3], ["4", "5"]),
               _region("/d/c.png", 0, [1, 3], ["6", "7"])]
    assign = {("/d/a.png", "1"): (0, 2), ("/d/a.png", "2"): (0, 5), ("/d/a.png", "2+3"): (0, 1),
              ("/d/b.png", "4"): (0, 2), ("/d/b.png", "5"): (0, 6), ("/d/c.png", "6"): (0, 3),
              ("/d/c.png", "7"): (0, 5)}
    rep = consistency_report(regions, assign, ["CT"], top=1)
    liver, kidney = rep["classes"]["CT/liver"], rep["classes"]["CT/kidney"]
    assert liver["masks"] == 3 and liver["distinct_codes"] == 2
    assert liver["top"][0] == {"code": "[C0_2]", "count": 2, "share": pytest.approx(2 / 3)}
    assert kidney["masks"] == 3 and kidney["top"][0]["code"] == "[C0_5]"  # the union is not counted


# ------------------------------------------------------------------------------------ whole stage
def test_stage2_fast_dev_run(tmp_path, tiny_root):
    from stages.stage2 import main

    _stage1_export(tiny_root, tmp_path)
    before = _digest(tiny_root)
    metrics = main(_overrides(tiny_root, tmp_path, "trainer.fast_dev_run=true"))
    out = tmp_path / "t" / "stage2"
    assert sorted(p.name for p in (out / "export").iterdir()) == [
        "code_embeddings.safetensors", "codebook.safetensors", "config.yaml", "manifest.json", "meta.json"]
    meta = read_meta(out / "export")
    assert len(meta["code_tokens"]) == 4 * 8 and meta["code_tokens"][:2] == ["[C0_0]", "[C0_1]"]
    assert meta["code_tokens"][8] == "[C1_0]"  # modality-major
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("val/dice_quantized", "val/dice_continuous", "codebook_usage", "perplexity", "modality_accuracy",
                "wall_time_s"):
        assert key in saved and key in metrics
    # code assignment: one code per mask_orders entry, each from the image's own modality group
    groups = ["CT", "MRI", "X-Ray", "Dermoscopy"]
    for split in ("train", "val", "test"):
        src = json.loads((tiny_root / "instruct" / f"{split}.json").read_text())
        coded = json.loads((out / "coded" / "instruct" / f"{split}.json").read_text())
        assert [r["id"] for r in coded] == [r["id"] for r in src]
        for r in coded:
            text = " ".join(t["value"] for t in r["conversations"])
            found = re.findall(r"\[C(\d+)_(\d+)\]", text)
            assert "<mask>" not in text and len(found) == len(r["mask_orders"]) == len(r["codes"])
            assert all(int(g) == groups.index(r["modality"]) and int(k) < 8 for g, k in found)
        dx = json.loads((out / "coded" / "diagseg" / f"{split}.json").read_text())
        for r in dx:
            assert len(re.findall(r"\[C\d+_\d+\]", r["answer"])) == len(r["mask_ids"]) and "<mask>" not in r["answer"]
    report = json.loads((out / "coded" / "code_consistency.json").read_text())
    assert report["classes"] and (out / "coded" / "code_consistency.png").stat().st_size > 1000
    assert _digest(tiny_root) == before  # originals untouched
    # the stand-alone command gives the same codes from the export alone
    from medsight.codes import main as codes_main

    codes_main(["--export", str(out / "export"), "--data", str(tiny_root), "--out", str(tmp_path / "cli")])
    for f in ("instruct/val.json", "diagseg/test.json"):
        assert (tmp_path / "cli" / f).read_text() == (out / "coded" / f).read_text()


def test_bucket_batches_group_images_by_mask_count():
    from medsight.regions import BucketBatches

    sizes = [1, 3, 0, 3, 1, 1, 2, 3, 0]
    sampler = BucketBatches(sizes, batch_size=2, shuffle=True, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5  # sizes 1: 3 images -> 2 batches, 2: 1, 3: 3 -> 2
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == [i for i, m in enumerate(sizes) if m > 0]
