"""Two-process DDP smoke run of stage 3 on CPU (gloo): a few `ground` steps on tiny random exports.

    python tests/ddp_smoke.py WORKDIR [STRATEGY]   (run by tests/test_stage3.py in a subprocess; < 40 s)

STRATEGY: ddp (default) or model_parallel (FSDP2 through Lightning's ModelParallelStrategy).

Each rank writes WORKDIR/rank<k>.txt with its step count and a checksum of the trainable weights; the test
checks that both ranks took the same steps and ended with identical weights (gradients were all-reduced).
Also holds the builders of small fake stage-1/stage-2 exports that tests/test_stage3.py uses.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from pathlib import Path

import torch

SMALL = ["data.image_size=32", "data.batch_size=4", "data.eval_batch_size=8", "vision.width=32", "vision.depth=1",
         "vision.patch_size=8", "perceiver.dim=32", "perceiver.num_queries=4", "perceiver.num_stages=1",
         "perceiver.heads=2", "perceiver.head_dim=16", "llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2",
         "llm.num_kv_heads=1", "llm.intermediate_size=64", "codebook.num_codes=4", "trainer.accelerator=cpu",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]
SYNTHETIC = ["data.synthetic.image_size=64", "data.synthetic.cases_per_group=4", "data.synthetic.slices_per_case=3",
             "data.synthetic.test_fraction=0.25"]


def make_synthetic(root: Path) -> Path:
    from medsight.config import load_config
    from medsight.data.synthetic import generate, generator_params

    if not (root / "generator.json").is_file():
        generate(root, generator_params(load_config("stage1", overrides=SYNTHETIC)))
    return root


def make_exports(cfg, seed: int = 0) -> None:
    """Random stage-1 export (vision + perceiver) and a stage-2 export (code embeddings + code names) with
    coded/{instruct,diagseg} files whose <mask>s are replaced by random code tokens, under cfg.out_root/run."""
    from medsight.export import save_export
    from medsight.models import stage1_components
    from medsight.vocab import code_token

    torch.manual_seed(seed)
    rng = random.Random(seed)
    run = Path(cfg.out_root) / cfg.run_name
    save_export(run / "stage1" / "export", cfg, stage1_components(cfg))
    names = [code_token(g, k) for g in range(cfg.codebook.num_groups) for k in range(cfg.codebook.num_codes)]
    emb = {"embeddings": torch.randn(len(names), cfg.perceiver.dim)}
    save_export(run / "stage2" / "export", cfg, {"code_embeddings": emb}, extra_meta={"code_tokens": names})
    root = Path(cfg.data.root)
    for kind in ("instruct", "diagseg"):
        (run / "stage2" / "coded" / kind).mkdir(parents=True, exist_ok=True)
        for split in ("train", "val", "test"):
            rows = json.loads((root / kind / f"{split}.json").read_text())
            for r in rows:
                sub = lambda s: re.sub("<mask>", lambda _: rng.choice(names), s)
                if kind == "instruct":
                    for t in r["conversations"]:
                        t["value"] = sub(t["value"])
                else:
                    r["answer"] = sub(r["answer"])
            (run / "stage2" / "coded" / kind / f"{split}.json").write_text(json.dumps(rows))


def small_config(root: Path, out_root: Path, *overrides: str):
    from medsight.config import load_config

    return load_config("stage3", overrides=[f"data.root={root}", f"out_root={out_root}", "run_name=t", *SMALL, *overrides])


def fake_loader(cfg, n: int = 16):
    """In-memory grounded dialogues (codes in the text, one mask each) in the batch contract: no dataset
    files and no MONAI import, so each process starts fast."""
    from torch.utils.data import DataLoader

    from medsight.vocab import code_token

    g = torch.Generator().manual_seed(0)
    s = cfg.data.image_size
    items = []
    for i in range(n):
        mask = torch.zeros(1, s, s)
        mask[0, : s // 2, i % s:] = 1
        code = code_token(i % cfg.codebook.num_groups, i % cfg.codebook.num_codes)
        items.append({"id": f"s{i}", "image": torch.randn(3, s, s, generator=g), "masks": mask,
                      "conversations": [{"from": "human", "value": "<image>\nSegment the liver."},
                                        {"from": "gpt", "value": f"Sure, the liver is at {code}."}]})

    def collate(batch):
        return {"id": [b["id"] for b in batch], "image": torch.stack([b["image"] for b in batch]),
                "masks": torch.stack([b["masks"] for b in batch]), "mask_valid": torch.ones(len(batch), 1, dtype=torch.bool),
                "conversations": [b["conversations"] for b in batch]}

    return DataLoader(items, batch_size=4, shuffle=False, collate_fn=collate)


def make_stage_exports(cfg) -> None:
    """Random stage-1 export and a stage-2 export (random code embeddings, code names) without coded files."""
    from medsight.export import save_export
    from medsight.models import stage1_components
    from medsight.vocab import code_token

    torch.manual_seed(0)
    run = Path(cfg.out_root) / cfg.run_name
    save_export(run / "stage1" / "export", cfg, stage1_components(cfg))
    names = [code_token(g, k) for g in range(cfg.codebook.num_groups) for k in range(cfg.codebook.num_codes)]
    save_export(run / "stage2" / "export", cfg, {"code_embeddings": {"embeddings": torch.randn(len(names), cfg.perceiver.dim)}},
                extra_meta={"code_tokens": names})
    (work_corpus := Path(cfg.data.root) / "corpus.txt").parent.mkdir(parents=True, exist_ok=True)
    work_corpus.write_text("Segment the liver.\nSure, the liver is at <mask>.\n")


def main(workdir: str, strategy: str = "ddp") -> None:
    import lightning as L

    from medsight.config import to_dict
    from medsight.train import build_trainer
    from stages.stage3 import JointLLMModule

    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(workdir)
    cfg = small_config(work / "data", work / "ckpt", f"trainer.strategy={strategy}", "trainer.devices=2")
    run = Path(cfg.out_root) / cfg.run_name
    if "LOCAL_RANK" not in os.environ:  # rank 0 before launching rank 1: build the inputs once
        make_stage_exports(cfg)
    module = JointLLMModule(to_dict(cfg), "ground", str(run / "stage1" / "export"), str(run / "stage2" / "export"),
                          str(run / "stage3" / "tokenizer"), total_steps=3)

    class Report(L.Callback):
        def on_train_end(self, trainer, pl_module):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            # the full weights (FSDP2: gathered; a collective, so every rank calls it)
            state = get_model_state_dict(pl_module.model, options=StateDictOptions(full_state_dict=True))
            names = [n for n, p in pl_module.model.named_parameters() if p.requires_grad]
            w = torch.cat([state[n].detach().double().flatten() for n in names])
            (work / f"rank{trainer.global_rank}.txt").write_text(
                f"world={trainer.world_size} steps={trainer.global_step} checksum={float(w.sum()):.10e}\n")

    trainer = build_trainer(cfg, run / "stage3", max_steps=3, subdir="ddp/", callbacks=[Report()],
                            limit_val_batches=0)
    trainer.fit(module, train_dataloaders=fake_loader(cfg))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(*sys.argv[1:3])
