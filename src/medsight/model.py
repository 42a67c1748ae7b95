"""Inference: `medsight.load(export_dir)` -> `MedSight`, whose `answer(image, question, history=None)` returns
the text and one region (mask, class, score, box) per emitted region code (SPEC section 5), plus the export
format of the joint model.

A stage-3 export directory (`checkpoints/<run>/stage3/export/`) holds:
- `vision.safetensors`, `perceiver.safetensors` (stage 1, frozen), `projector_v2t.safetensors`,
  `projector_t2v.safetensors`, `llm.safetensors` (the causal LM incl. the resized embeddings; with LoRA the
  base weights) and with LoRA `llm_adapter.safetensors` (LoRA weights + code-token embedding rows + lm_head),
- `llm/config.json` (the causal LM's Hugging Face config), `tokenizer/` (with code tokens and chat template),
- `config.yaml` and `meta.json` (code tokens, LoRA settings, phases trained).
Loading needs none of the training code (no Lightning) and is strict: a missing or unexpected key fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from medsight.export import (
    load_component,
    load_into,
    read_export_config,
    read_meta,
    save_export,
)
from medsight.manifest import verify_folder
from medsight.models.joint import MedSightLM
from medsight.models.phases import apply_lora
from medsight.vocab import CLASSES

log = logging.getLogger("medsight")


# ------------------------------------------------------------------------------------- building
def build_joint(cfg: DictConfig, vision: torch.nn.Module, perceiver: torch.nn.Module, code_tokens: list[str],
                tokenizer_dir: Path | str | None = None, llm_config_dir: Path | str | None = None,
                llm_state: dict[str, torch.Tensor] | None = None) -> MedSightLM:
    """The joint model around frozen stage-1 modules. The LLM comes from its backbone factory, or, when
    `llm_config_dir` is given (an export), from that saved Hugging Face config: with `llm_state` (the
    export's tensors) built on the meta device and given those tensors as its weights (no random init, no
    fp32 copy: a bf16 export stays bf16), else randomly initialised (weights loaded after)."""
    from medsight.models.llm import (
        _prepare_tokenizer,
        add_code_tokens,
        build_llm,
        load_tokenizer,
    )

    if llm_config_dir is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        trc = bool(cfg.llm.trust_remote_code)
        config = AutoConfig.from_pretrained(str(llm_config_dir), local_files_only=True, trust_remote_code=trc)
        if llm_state is not None and not trc:
            llm = _llm_from_state(config, llm_state, Path(llm_config_dir).parent)
        else:
            llm = AutoModelForCausalLM.from_config(config, trust_remote_code=trc)
            if llm_state is not None:
                from medsight.export import check_fits

                check_fits(llm, llm_state, Path(llm_config_dir).parent, "llm")
                llm.load_state_dict(llm_state, strict=True)
        tok = _prepare_tokenizer(load_tokenizer(tokenizer_dir, trc))
    else:
        llm, tok = build_llm(cfg, tokenizer_dir)
    code_ids = add_code_tokens(llm, tok, code_tokens)
    for m in (vision, perceiver):
        m.requires_grad_(False).eval()
    model = MedSightLM(vision, perceiver, llm, tok, code_tokens, code_ids, d_enc=vision.out_dim, d_perc=cfg.perceiver.dim,
                       separate_projectors=cfg.llm.separate_projectors, mask_loss_weight=cfg.llm.mask_loss_weight,
                       max_length=cfg.llm.max_length, patch_pool=patch_pool(cfg),
                       patch_pool_mode=cfg.llm.patch_pool_mode, system_prompt=cfg.llm.system_prompt)
    model.generation_prompt = bool(cfg.llm.generation_prompt)
    if cfg.stage3.do_sample:
        model.sampling = {"temperature": float(cfg.stage3.temperature),
                          "repetition_penalty": float(cfg.stage3.repetition_penalty)}
    if cfg.llm.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _llm_from_state(config, state: dict[str, torch.Tensor], export_dir: Path) -> torch.nn.Module:
    """A causal LM whose parameters ARE `state`'s tensors (meta-device construction, strict key check,
    non-persistent buffers such as the rotary frequencies computed by transformers)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from medsight.export import check_fits

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with torch.device("meta"):
        skeleton = cls(config)
    check_fits(skeleton, state, export_dir, "llm")
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    dtype = floats.pop() if len(floats) == 1 else torch.float32
    return cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)


def patch_pool(cfg: DictConfig) -> int:
    """llm.patch_pool, resolved (None: 8 for the tiny LLM, else 1; stage3.yaml has the measurement)."""
    if cfg.llm.patch_pool is not None:
        return int(cfg.llm.patch_pool)
    return 8 if cfg.llm.name == "tiny" else 1


def save_joint(model: MedSightLM, export_dir: Path | str, cfg: DictConfig, extra_meta: dict | None = None) -> Path:
    """Write the joint model as an export directory (see the module docstring)."""
    export_dir = Path(export_dir)
    comps: dict[str, Any] = {"vision": model.vision, "perceiver": model.perceiver,
                             "projector_v2t": model.projector_v2t, "projector_t2v": model.projector_t2v}
    comps.update(model.llm_state())
    lora = None
    if hasattr(model.llm, "peft_config"):
        pc = model.llm.peft_config["default"]
        lora = {"r": pc.r, "alpha": pc.lora_alpha, "dropout": pc.lora_dropout, "target_modules": sorted(pc.target_modules)}
    meta = {"code_tokens": model.code_tokens, "code_ids": model.code_ids.tolist(), "lora": lora,
            "llm": cfg.llm.name, "hidden_size": model.causal_lm().config.hidden_size}
    meta.update(extra_meta or {})

    def hf_files(folder: Path) -> None:  # inside the staging folder: listed in the manifest, swapped in with it
        v = cfg.vision
        if v.name == "hf" and v.path and not Path(v.path).is_absolute() and hasattr(model.vision, "model"):
            model.vision.model.config.save_pretrained(str(folder / v.path))  # an imported export's vision_config/
        model.causal_lm().config.save_pretrained(str(folder / "llm"))
        model.tokenizer.save_pretrained(str(folder / "tokenizer"))

    save_export(export_dir, cfg, comps, meta, extra_files=hf_files)
    return export_dir


def load_joint(export_dir: Path | str, device: str = "cpu",
               trust_remote_code: bool = False) -> tuple[MedSightLM, DictConfig, dict]:
    """(model, config, meta) from a joint export, every component strictly loaded. Code shipped with the
    export's LLM config runs only with `trust_remote_code=True` from the caller: the export's own
    config.yaml (data) cannot switch it on."""
    from medsight.models import export_stage1_components

    export_dir = Path(export_dir)
    meta, cfg = read_meta(export_dir), read_export_config(export_dir)
    if cfg.llm.trust_remote_code and not trust_remote_code:
        log.warning("%s: its config sets llm.trust_remote_code, ignored (pass trust_remote_code=True to run code "
                    "that comes with an export you trust)", export_dir)
    cfg.llm.trust_remote_code = bool(trust_remote_code)
    if "code_tokens" not in meta or not (export_dir / "llm").is_dir():
        raise FileNotFoundError(f"{export_dir} is not a stage-3 (joint model) export")
    subs = ["llm/", "tokenizer/"]  # read by Hugging Face: checked against the manifest first
    vp = cfg.vision.path
    if vp and not Path(vp).is_absolute() and (export_dir / vp).is_dir():
        subs.append(Path(vp).as_posix().rstrip("/") + "/")  # an imported export's vision_config/
    for sub in subs:
        verify_folder(export_dir, sub)
    comps = export_stage1_components(cfg, export_dir)
    for name, module in comps.items():
        load_into(module, export_dir, name)
    model = build_joint(cfg, comps["vision"], comps["perceiver"], meta["code_tokens"], export_dir / "tokenizer",
                        export_dir / "llm", llm_state=load_component(export_dir, "llm"))
    if model.code_ids.tolist() != meta["code_ids"]:
        raise RuntimeError(f"{export_dir}: the tokenizer's code-token ids differ from meta.json's")
    load_into(model.projector_v2t, export_dir, "projector_v2t")
    load_into(model.projector_t2v, export_dir, "projector_t2v")
    if meta.get("lora"):
        lo = meta["lora"]
        apply_lora(model, lo["r"], lo["alpha"], lo["dropout"], lo["target_modules"])
        model.load_adapter_state(load_component(export_dir, "llm_adapter"))
    model.requires_grad_(False)
    return model.to(device).eval(), cfg, meta


# ------------------------------------------------------------------------------------ inference
def preprocess(images: Sequence[np.ndarray], image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 images -> (B, 3, S, S) CLIP-normalised, exactly as the DataModule does it (MONAI
    bilinear resize with anti-aliasing, rounded to uint8, /255, channel-wise mean/std)."""
    from monai.transforms import Resize

    resize = Resize((image_size, image_size), mode="bilinear", anti_aliasing=True)
    out = []
    for img in images:
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {img.shape}")
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()  # (3, H, W)
        x = resize(x)
        x = torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x).round().clamp(0, 255) / 255.0
        m = torch.tensor(list(mean)).view(3, 1, 1)
        s = torch.tensor(list(std)).view(3, 1, 1)
        out.append((x - m) / s)
    return torch.stack(out)


class MedSight:
    """The final model for inference (greedy decoding; deterministic)."""

    def __init__(self, model: MedSightLM, cfg: DictConfig, meta: dict, device: str = "cpu") -> None:
        self.model, self.cfg, self.meta, self.device = model, cfg, meta, device
        self.max_new_tokens = int(cfg.stage3.max_new_tokens)

    @classmethod
    def load(cls, export_dir: Path | str, device: str = "cpu") -> MedSight:
        model, cfg, meta = load_joint(export_dir, device)
        return cls(model, cfg, meta, device)

    def answer(self, image_or_images: np.ndarray | Sequence[np.ndarray], question: str,
               history: Sequence[dict] | None = None) -> dict[str, Any]:
        """Answer `question` about one (H, W, 3) uint8 image, optionally after earlier turns `history` (LLaVA
        form: [{"from": "human"|"gpt", "value": str}, ...], human first, ending with the model's turn; the image
        belongs to the first human turn), or about a list of images (one answer about all of them:
        medsight.multi_image; each region's image_index says which image its mask is on).

        Returns {"text", "regions"}: per emitted code token, in order, {"code", "class_name", "score", "box"
        [x0, y0, x1, y1) or None, "area", "image_index", "mask" (H, W) bool at that image's size} (`regions_of`).
        """
        images = [image_or_images] if isinstance(image_or_images, np.ndarray) else list(image_or_images)
        if len(images) != 1:
            if history:
                raise ValueError("answer(): multi-turn history is supported for one image, got "
                                 f"{len(images)} images")
            from medsight.multi_image import answer_images

            return answer_images(self, images, question)
        return self.answer_batch(images, [question], histories=[history])[0]

    @torch.no_grad()
    def answer_batch(self, images: Sequence[np.ndarray], questions: Sequence[str], batch_size: int = 16,
                     histories: Sequence[Sequence[dict] | None] | None = None) -> list[dict]:
        """`answer` for many (image, question[, history]) pairs, `batch_size` at a time (greedy; the same
        answers as one by one)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        histories = list(histories) if histories is not None else [None] * len(images)
        if len(histories) != len(images):
            raise ValueError(f"{len(images)} images but {len(histories)} histories")
        out: list[dict] = []
        for i in range(0, len(images), batch_size):
            imgs, qs = list(images[i:i + batch_size]), list(questions[i:i + batch_size])
            x, crops = preprocess_for(self.cfg, imgs)
            feats, regions = self.model.encode_images(x.to(self.device))
            convs = [conversation(q, h) for q, h in zip(qs, histories[i:i + batch_size])]
            preds = self.model.predict(feats, regions, convs, self.max_new_tokens)
            for img, p, crop in zip(imgs, preds, crops):
                regions = regions_of(p, np.asarray(img).shape[:2], crop)  # image_index 0: one image here
                out.append({"text": p.text, "regions": regions})
        return out


def preprocess_for(cfg: DictConfig, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list]:
    """Model input for `images` by `data.preprocess` and, per image, the crop it covers (None: the whole
    image, squashed) so masks can be mapped back."""
    d = cfg.data
    if d.get("preprocess", "resize") == "clip":
        from medsight.data.clip_preprocess import clip_preprocess

        return clip_preprocess(images, d.image_size, d.mean, d.std)
    return preprocess(images, d.image_size, d.mean, d.std), [None] * len(images)


def conversation(question: str, history: Sequence[dict] | None = None) -> list[dict]:
    """The LLaVA-form conversation for the next answer: earlier turns, then `question`; the `<image>`
    placeholder goes at the start of the first human turn unless a turn already has it."""
    turns = [dict(t) for t in (history or [])]
    for k, t in enumerate(turns):
        if set(t) != {"from", "value"} or t["from"] not in ("human", "gpt") or not isinstance(t["value"], str):
            raise ValueError(f"history turn {k}: expected {{'from': 'human'|'gpt', 'value': str}}, got {t!r}")
        if t["from"] != ("human" if k % 2 == 0 else "gpt"):
            raise ValueError(f"history turn {k}: turns alternate human, gpt, ... (got {t['from']!r})")
    if len(turns) % 2:
        raise ValueError("history ends with a human turn: it must end with the model's (gpt) answer")
    turns.append({"from": "human", "value": question})
    if not any("<image>" in t["value"] for t in turns):
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return turns


def regions_of(pred, size: tuple[int, int], crop: Any = None, image_index: int = 0) -> list[dict[str, Any]]:
    """The region schema, one dict per emitted code in order: "code"; "class_name" from the perceiver's class
    head (argmax over real classes: neither background nor "no object"); "mask" (H, W) bool at `size`
    (bilinear logits > 0; with `crop`, the centre crop the model saw, mapped back through it); "score" the
    mean probability inside the mask (0.0 when empty); "box" the mask's [x0, y0, x1, y1) in input pixels
    (None when empty); "area" its pixel count; "image_index" the image the mask belongs to."""
    if not pred.codes:
        return []
    if crop is not None:  # the model saw a centre crop: back through it, nothing outside it
        from medsight.data.clip_preprocess import crop_to_input

        logits = crop_to_input(pred.mask_logits, crop, tuple(size))
    else:
        logits = F.interpolate(pred.mask_logits[None].float(), size=tuple(size), mode="bilinear",
                               align_corners=False)[0]
    probs = logits.sigmoid()
    cls = pred.class_logits[:, 1:-1].argmax(-1) + 1  # (M,)
    regions = []
    for j, code in enumerate(pred.codes):
        mask = logits[j] > 0
        score = float(probs[j][mask].mean()) if mask.any() else 0.0
        m = mask.cpu().numpy()
        regions.append({"code": code, "class_name": CLASSES.get(int(cls[j])), "score": score, "box": mask_box(m),
                        "area": int(m.sum()), "image_index": int(image_index), "mask": m})
    return regions


def mask_box(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1) of a mask's foreground in pixels (end exclusive), None when empty."""
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


__all__ = ["MedSight", "build_joint", "conversation", "load_joint", "mask_box", "preprocess", "preprocess_for", "regions_of",
           "save_joint"]
