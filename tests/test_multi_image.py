"""Several images per sample: build_inputs, per-image mask decoding, answer([img1, img2], q), stage 3 on a
PubMedVision-format file with multi-image rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests import format_fixtures as fx
from tests.test_joint import conv, small_joint


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    return small_joint(tmp_path_factory.mktemp("joint_multi"))[0]


def _two_image_conv(answer: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\n<image>\nCompare the two."}, {"from": "gpt", "value": answer}]


def test_each_image_placeholder_gets_its_own_image(joint):
    convs = [_two_image_conv("The second one [C0_1]."), conv("yes")]
    tok = joint.tokenize(convs)
    k = (-(-4 // joint.patch_pool)) ** 2 + 4
    emb = torch.randn(3, k, 32)  # images of sample 0 (two), then sample 1 (one)
    inp = joint.build_inputs(tok["input_ids"], tok["attention_mask"], emb, tok["labels"], torch.tensor([2, 1]))
    pos0 = (inp["token_ids"][0] == -1).nonzero().squeeze(1)
    pos1 = (inp["token_ids"][1] == -1).nonzero().squeeze(1)
    assert len(pos0) == 2 * k and len(pos1) == k
    assert torch.equal(inp["inputs_embeds"][0, pos0[:k]], emb[0]) and torch.equal(inp["inputs_embeds"][0, pos0[k:]], emb[1])
    assert torch.equal(inp["inputs_embeds"][1, pos1], emb[2])
    with pytest.raises(ValueError, match="differ"):
        joint.build_inputs(tok["input_ids"], tok["attention_mask"], emb, tok["labels"], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one <image>"):
        joint.build_inputs(tok["input_ids"], tok["attention_mask"], emb[:2], tok["labels"])


def test_code_decoded_on_the_image_that_last_precedes_it(joint):
    """Oracle: the code's own hidden state decoded with the plain single-image decode_masks on that image."""
    joint.eval()
    text = [{"from": "human", "value": "<image>\nLeft: <image>\nRight."}, {"from": "gpt", "value": "here [C0_1]"}]
    text2 = [{"from": "human", "value": "<image>\nFirst [C1_2] then <image>\nsecond [C0_3]."},
             {"from": "gpt", "value": "ok"}]
    tok = joint.tokenize([text, text2])
    feats = torch.randn(4, 4, 4, 32)
    regions = torch.randn(4, 4, 32)
    counts = torch.tensor([2, 2])
    inp = joint.build_inputs(tok["input_ids"], tok["attention_mask"], joint.image_embeddings(feats, regions),
                             image_counts=counts)
    hidden = joint.hidden_states(inp)
    states, valid, _ = joint.code_states(hidden, inp["token_ids"])
    img_of = joint.code_image_index(inp["token_ids"])
    assert img_of[0, :1].tolist() == [1] and img_of[1, :2].tolist() == [0, 1]
    dec = joint.decode_masks_on(states, valid, img_of, feats, torch.tensor([0, 2]))
    with torch.no_grad():
        want0 = joint.decode_masks(states[0:1, :1], feats[1:2])["pred_masks"][0, 0]
        want1 = joint.decode_masks(states[1:2, 0:1], feats[2:3])["pred_masks"][0, 0]
        want2 = joint.decode_masks(states[1:2, 1:2], feats[3:4])["pred_masks"][0, 0]
    assert torch.allclose(dec["pred_masks"][0, 0], want0, atol=1e-6)
    assert torch.allclose(dec["pred_masks"][1, 0], want1, atol=1e-6)
    assert torch.allclose(dec["pred_masks"][1, 1], want2, atol=1e-6)


def test_forward_with_counts_of_one_equals_the_single_image_path(joint):
    joint.eval()
    convs = [conv("the liver [C0_1]"), conv("and [C1_2] [C0_3]", "Segment both.")]
    tok = joint.tokenize(convs)
    feats, regions = torch.randn(2, 4, 4, 32), torch.randn(2, 4, 32)
    masks, valid = (torch.rand(2, 2, 16, 16) > 0.5).float(), torch.tensor([[True, False], [True, True]])
    with torch.no_grad():
        a = joint(tok["input_ids"], tok["attention_mask"], tok["labels"], feats, regions, masks, valid)
        b = joint(tok["input_ids"], tok["attention_mask"], tok["labels"], feats, regions, masks, valid,
                  image_counts=torch.tensor([1, 1]))
    assert torch.allclose(a["loss"], b["loss"], atol=1e-6) and torch.allclose(a["mask_loss"], b["mask_loss"], atol=1e-6)


def test_answer_on_two_images_gives_image_index_per_region(tmp_path):
    """A random export made to emit two codes (its lm_head is steered by a hook); each region is on the
    image whose <image> last precedes the code (the second: the prompt puts both first) at that size."""
    import medsight
    from medsight.model import save_joint

    model, cfg = small_joint(tmp_path)
    save_joint(model, tmp_path / "export", cfg)
    ms = medsight.load(tmp_path / "export")
    lm = ms.model.causal_lm()
    plan = [int(ms.model.code_ids[1]), int(ms.model.code_ids[2]), ms.model.stop_ids()[0]]
    calls = {"n": 0}

    def steer(_module, _inp, out):
        step = min(calls["n"], len(plan) - 1)
        calls["n"] += 1
        out = out.clone()
        out[..., plan[step]] += 1e4
        return out

    handle = lm.get_output_embeddings().register_forward_hook(steer)
    try:
        ans = ms.answer([np.full((48, 40, 3), 120, np.uint8), np.zeros((30, 36, 3), np.uint8)], "Where is it?")
    finally:
        handle.remove()
    assert set(ans) == {"text", "regions"} and len(ans["regions"]) == 2
    assert [r["image_index"] for r in ans["regions"]] == [1, 1]
    assert all(r["mask"].shape == (30, 36) for r in ans["regions"])
    single = ms.answer(np.zeros((30, 36, 3), np.uint8), "Where?")
    assert all(r["image_index"] == 0 for r in single["regions"])
    with pytest.raises(ValueError, match="1 to 6"):
        ms.answer([], "q")


def test_batches_mix_image_counts(tmp_path):
    from medsight.config import load_config
    from medsight.data.datamodule import MedicalDataModule

    path, want = fx.pubmedvision(tmp_path)
    cfg = load_config("stage3", overrides=["data.format=biomedparse", f"data.root={tmp_path}", "data.image_size=32",
                                           "data.formats.instruct=pubmedvision", f"data.instruct={path}",
                                           "data.val_fraction=0.0", "data.eval_batch_size=8"])
    dm = MedicalDataModule(cfg, "instruct", sources=("instruct",))
    batch = next(iter(dm._loader("train", False)))
    assert batch["image"].shape[0] == want["records"]
    assert batch["image_counts"].tolist() == [1, 1, 1, 2] and batch["images"].shape == (5, 3, 32, 32)
    assert torch.equal(batch["images"][3], batch["image"][3])  # the 2-image row's first image, then its second


def test_stage3_trains_on_pubmedvision_rows_with_several_images(tmp_path):
    phases = "[align,instruct]"
    from stages.stage3 import main
    from tests.ddp_smoke import SMALL, make_exports, make_synthetic, small_config

    root = make_synthetic(tmp_path / "syn")
    cfg = small_config(root, tmp_path / "ck")
    make_exports(cfg)
    path, _ = fx.pubmedvision(tmp_path, n_single=5)
    from medsight.data.formats import read_format

    train = read_format("pubmedvision", path, "train", val_fraction=0.3).samples
    assert len(train) == 4 and max(len(s.all_images) for s in train) == 2  # align: one batch of 4, 2-image row in it
    main([f"data.root={root}", f"out_root={tmp_path / 'ck'}", "run_name=t", *SMALL, f"stage3.phases={phases}",
          "stage3.align.max_steps=2", "stage3.instruct.max_steps=2", "stage3.val_batches=1", "stage3.test_batches=1",
          "stage3.max_new_tokens=3", "data.formats.vqa=pubmedvision", f"data.vqa={path}", "data.batch_size=4",
          "data.val_fraction=0.3"])
    metrics = json.loads((tmp_path / "ck" / "t" / "stage3" / "metrics.json").read_text())
    assert (tmp_path / "ck" / "t" / "stage3" / "export" / "meta.json").is_file() and metrics


def test_caches_are_bounded():
    """The decoded-image store and stage 3's feature cache never hold more than their byte budget."""
    from medsight.joint_data import FeatureCache

    class Enc:
        calls = 0

        def encode_images(self, x):
            Enc.calls += len(x)
            return x.mean(1, keepdim=True).expand(-1, 4, -1, -1).permute(0, 2, 3, 1), x[:, 0, :2, :]

    cache = FeatureCache(max_mb=3 * (8 * 8 * 4 * 4 + 2 * 8 * 4) / 2**20)  # room for 3 images' outputs
    imgs = torch.randn(5, 3, 8, 8)
    f1, r1 = cache(Enc(), imgs)
    assert len(cache.store) == 3 and cache.bytes <= cache.max_bytes and Enc.calls == 5
    f2, r2 = cache(Enc(), imgs)  # evicted ones are recomputed, with the same values
    assert torch.equal(f1, f2) and torch.equal(r1, r2) and Enc.calls == 5 + 2


def test_image_store_is_bounded(tmp_path):
    from medsight.data.dataset import _Store
    from medsight.data.formats.common import Sample

    paths = [fx.image(tmp_path / f"{i}.png", size=40, seed=i) for i in range(6)]
    store = _Store(16, True, max_mb=2.5 * 3 * 16 * 16 / 2**20)  # two images fit
    for p in paths:
        store.get(Sample(id=p, image=p, modality=0, case=p, source="t"), False)
    assert len(store.images) == 2 and store.bytes <= store.max_bytes
    assert list(store.images) == paths[-2:]  # least recently used out first
    assert store.full


def test_preload_stops_when_the_cache_is_full(tmp_path):
    from medsight.config import load_config
    from medsight.data.dataset import MedicalDataset, _Store
    from medsight.data.formats.common import ErrorPolicy, Sample
    from medsight.data.transforms import split_transform

    paths = [fx.image(tmp_path / f"{i}.png", size=40, seed=i) for i in range(6)]
    store = _Store(16, True, max_mb=2.5 * 3 * 16 * 16 / 2**20)
    samples = [Sample(id=p, image=p, modality=0, case=p, source="t") for p in paths]
    cfg = load_config("stage1", overrides=["data.image_size=16"])
    ds = MedicalDataset(samples, "vqa", "train", store, split_transform(cfg, "vqa", "train"), ErrorPolicy())
    ds.preload()
    assert len(ds.samples) == 6 and len(store.images) == 2 and store.evicted == 0  # stopped, nothing dropped
    assert ds[5]["image"].shape == (3, 16, 16)  # decoded when used


def test_stage2_region_store_spills_to_disk_beyond_its_budget(tmp_path):
    """Beyond the memory budget feats/masks go to one file; collate_regions reads back the same values."""
    from medsight.regions import Regions, collate_regions
    from medsight.spill import Spilled, SpillFile

    spill = SpillFile(tmp_path / "spill", budget_mb=(4 * 4 * 8 * 4 + 2 * 16 * 16) / 2**20)  # one image's worth
    g = torch.Generator().manual_seed(0)
    raw, regions = [], []
    for i in range(3):
        feats, masks = torch.randn(4, 4, 8, generator=g), torch.rand(2, 16, 16, generator=g) > 0.5
        raw.append((feats, masks))
        regions.append(Regions(image=f"{i}.png", id=str(i), group=0, split="train", pooled=torch.zeros(8),
                               queries=torch.randn(2, 8, generator=g), pred_idx=torch.tensor([0, 1]),
                               labels=torch.tensor([1, 2]), ann_ids=["a", "b"], is_union=torch.tensor([False, False]),
                               feats=spill.keep(feats), masks=spill.keep(masks)))
    assert not isinstance(regions[0].feats, Spilled) and isinstance(regions[2].feats, Spilled)
    assert spill.in_memory <= spill.budget and spill.on_disk == 2 * (4 * 4 * 8 * 4 + 2 * 16 * 16)
    batch = collate_regions(regions)
    assert torch.equal(batch["feats"], torch.stack([f for f, _ in raw]))
    assert torch.equal(batch["masks"], torch.stack([m for _, m in raw]).float())
    path = spill._path
    spill.close()
    assert not path.exists()


@pytest.mark.slow
def test_stage2_with_its_region_store_on_disk_gives_the_same_codes(tmp_path, synthetic_root):
    """codebook.region_store_mb tiny (everything spilled) vs the default: the same coded files."""
    from stages.stage2 import main
    from tests.test_stage2 import _overrides, _stage1_export

    outs = []
    for name, mb in (("mem", "8192"), ("disk", "0.001")):
        _stage1_export(synthetic_root, tmp_path / name)
        main(_overrides(synthetic_root, tmp_path / name, "trainer.fast_dev_run=true", f"codebook.region_store_mb={mb}"))
        outs.append(tmp_path / name / "t" / "stage2" / "coded")
    for f in ("instruct/train.json", "instruct/val.json", "diagseg/test.json"):
        assert (outs[0] / f).read_text() == (outs[1] / f).read_text()
    assert not list((tmp_path / "disk" / "t" / "stage2" / "spill").glob("*.bin"))  # removed at the end
