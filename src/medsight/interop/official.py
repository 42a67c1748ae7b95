"""`medsight import official`: the authors' released MedSIGHT -> a self-contained stage-3 export.

Inputs (layouts: REAL_FORMATS section 5, SPEC section 10):
- the stage-1 Region Perceiver `region_perceiver/0079280.pt`: `{"model", "optimizer", "steps", "args"
  (argparse.Namespace), ["ema"]}`, read with medsight.safeload (no code runs); `ema` is preferred, then
  `model`. Structures its `args` select that medsight does not reproduce (`num_stacks > 1`,
  `use_self_attn`, `up_sample_mode: query`) are refused, naming them;
- the LLM directory `medsight_full_instruct/` (`model_type: llava_qwen`, sharded safetensors, tokenizer):
  a Qwen3Config is built from its fields (no remote code). Its keys are Qwen3's plus `model.mm_projector`
  (v->t), optional `model.region_mm_projector` (`use_sep_proj`), `model.token_projection` (t->v) and keys
  inference does not use (vision-tower copies, the lightweight decoder); each key is mapped or reported
  as unused by name. No vocabulary row is added: the released `<image>` is a placeholder, not a token;
- the vision encoder: an open_clip checkpoint (UniMed-CLIP, converted by medsight.interop.open_clip) or a
  Hugging Face CLIP directory;
- optionally the stage-2 checkpoint `0035673.pt` (`--codebook`): its quantiser is kept in the export
  (`codebook_reference.safetensors`) for coding new grounded data with the released codebook.

What the export computes is the reference's inference: CLIP block `mm_vision_select_layer` (the LLM
config's value unless overridden), `perceiver.variant: reference`, the reference's preprocessing
(`data.preprocess: clip`: shorter side bicubic, centre crop, CLIP mean/std), its chat format (system
prompt "You are a helpful assistant.", no generation prompt: the model writes "assistant\\n" itself) and
greedy decoding (the reference's sampling settings are in `stage3.do_sample/temperature/
repetition_penalty`). Code tokens keep their released names (`[M{g}_{k}]`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import OmegaConf

from medsight.data import DataError
from medsight.safeload import load_checkpoint

log = logging.getLogger(__name__)

REFERENCE_SYSTEM_PROMPT = "You are a helpful assistant."
#: the modality-group labels known from the reference's data (REAL_FORMATS section 4): label -> name
KNOWN_GROUPS = {0: "CT (amos22)", 1: "MRI (amos22)", 2: "Ultrasound (BreastUS)", 3: "Ultrasound (CAMUS)",
                9: "Dermoscopy (UWaterlooSkinCancer)"}
#: a released code-token name: letters, group, "_", index (`[M3_17]`; the paper writes `[C3_17]`)
CODE_TOKEN = re.compile(r"^\[([A-Za-z]+)(\d+)_(\d+)\]$")
_QWEN3_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                 "rms_norm_eps", "use_cache", "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
                 "attention_bias", "attention_dropout", "use_sliding_window", "sliding_window", "max_window_layers",
                 "layer_types", "bos_token_id", "eos_token_id", "pad_token_id")
#: released LLM-dir keys that inference does not use, with the reason
_LLM_UNUSED = (
    (re.compile(r"model\.vision_tower\."), "vision-tower copy (the encoder and perceiver come from their own files)"),
    (re.compile(r"model\.(mask_decoder|visual_feature_norm)\."), "lightweight decoder (not on the decode path)"),
    (re.compile(r"model\.image_newline$"), "unused with mm_patch_merge_type flat"),
)


class OfficialImportError(DataError):
    """Something in the released files cannot be imported; the message names the file and the field."""


# ----------------------------------------------------------------------------------- perceiver
def read_perceiver_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(state dict, args as a dict, which entry was used) of a released perceiver `.pt`; refuses
    structures medsight does not reproduce, naming the argument."""
    ckpt = load_checkpoint(path, mmap=True)  # the optimizer state is never read
    if not isinstance(ckpt, dict):
        raise OfficialImportError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}", path=str(path))
    which = next((k for k in ("ema", "model", "state_dict") if isinstance(ckpt.get(k), dict)), None)
    if which is None:
        raise OfficialImportError(f"{path}: no 'ema', 'model' or 'state_dict' entry (keys: {sorted(ckpt)[:8]})",
                           path=str(path), field="model")
    args = ckpt.get("args")
    args = vars(args) if hasattr(args, "__dict__") else dict(args or {})
    refused = []
    if int(args.get("num_stacks", 1) or 1) > 1:
        refused.append(f"num_stacks={args['num_stacks']}")
    if args.get("use_self_attn"):
        refused.append("use_self_attn=True")
    mode = args.get("up_sample_mode", args.get("upsample_mode", "conv"))
    if mode not in (None, "conv"):
        refused.append(f"up_sample_mode={mode!r}")
    state = ckpt[which]
    if any(".region_self_attn." in k for k in state):
        refused.append("use_self_attn (region_self_attn weights present)")
    if any(".query_adapters." in k for k in state):
        refused.append("up_sample_mode='query' (query_adapters weights present)")
    if refused:
        raise OfficialImportError(f"{path}: the checkpoint uses perceiver structures medsight does not reproduce: "
                           f"{', '.join(refused)}", path=str(path), field=refused[0].split("=")[0])
    return state, args, which


def perceiver_dims(state: dict[str, torch.Tensor], source: str, prefix: str = "region_perceiver.") -> dict[str, int]:
    """Perceiver config values from the released tensors' shapes (the reference fixes dim_head at 64)."""
    def get(k: str) -> torch.Tensor:
        if prefix + k not in state:
            raise OfficialImportError(f"{source}: missing '{prefix + k}'", path=source, field=prefix + k)
        return state[prefix + k]

    queries = get("region_queries")  # (1, N, d)
    dim, n = queries.shape[-1], queries.shape[-2]
    inner = get("init_cross_attn.to_q.weight").shape[0]
    head_dim = 64 if inner % 64 == 0 else inner
    stages = len({k.split(".")[2] for k in state if k.startswith(prefix + "conv_adapters.")})
    return {"dim": dim, "num_queries": n, "num_stages": stages, "heads": inner // head_dim, "head_dim": head_dim,
            "ff_mult": get("init_ff.1.weight").shape[0] // dim,
            "num_classes": get("segmentation_cls_head.class_embed.weight").shape[0] - 1}


# ---------------------------------------------------------------------------------------- LLM
def read_llm_config(llm_dir: Path) -> tuple[dict[str, Any], Any]:
    """(released config.json, the Qwen3Config built from its fields)."""
    from transformers import Qwen3Config

    path = llm_dir / "config.json"
    if not path.is_file():
        raise OfficialImportError(f"{path}: missing (expected the released LLM directory)", path=str(path))
    raw = json.loads(path.read_text())
    if raw.get("model_type") not in ("llava_qwen", "qwen3"):
        raise OfficialImportError(f"{path}: model_type {raw.get('model_type')!r}; expected 'llava_qwen' (a Qwen3 LLaVA)",
                           path=str(path), field="model_type")
    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise OfficialImportError(f"{path}: mm_projector_type {raw['mm_projector_type']!r}; medsight reads mlp2x_gelu",
                           path=str(path), field="mm_projector_type")
    kwargs = {k: raw[k] for k in _QWEN3_FIELDS if k in raw}
    config = Qwen3Config(**kwargs)
    config.architectures = ["Qwen3ForCausalLM"]
    config.dtype = raw.get("torch_dtype", raw.get("dtype", "bfloat16"))
    return raw, config


def llm_shards(llm_dir: Path) -> list[Path]:
    index = llm_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [llm_dir / n for n in names]
    else:
        shards = sorted(llm_dir.glob("*.safetensors"))
    if not shards:
        raise OfficialImportError(f"{llm_dir}: no safetensors weights", path=str(llm_dir))
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise OfficialImportError(f"{missing[0]}: shard listed in the index is missing", path=missing[0])
    return shards


def shard_keys(shard: Path) -> list[str]:
    """The tensor names of one safetensors file (its header only)."""
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        return list(f.keys())


def shard_shapes(shard: Path, keys: list[str]) -> dict[str, Any]:
    """{key: slice with .shape} from the header of one safetensors file (no tensor data read)."""
    from safetensors import safe_open

    class _Shape:
        def __init__(self, shape: list[int]) -> None:
            self.shape = tuple(shape)

    with safe_open(str(shard), framework="pt") as f:
        return {k: _Shape(f.get_slice(k).get_shape()) for k in keys}


def classify_llm_key(key: str, llm_keys: set[str]) -> tuple[str, str] | tuple[str, None]:
    """(component, our key) for a released LLM-dir key, or ("unused", reason)."""
    m = re.fullmatch(r"model\.mm_projector\.(\d+)\.(weight|bias)", key)
    if m:
        return "projector_v2t", f"mlp.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"model\.region_mm_projector\.(\d+)\.(weight|bias)", key)
    if m:
        return "projector_v2t", f"region_mlp.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"model\.token_projection\.(\d+)\.(weight|bias)", key)
    if m:
        return "projector_t2v", f"net.{m.group(1)}.{m.group(2)}"
    if key in llm_keys:
        return "llm", key
    why = next((r for pat, r in _LLM_UNUSED if pat.match(key)), None)
    return ("unused", why) if why else ("unknown", None)


# --------------------------------------------------------------------------------- tokenizer
def released_code_tokens(tokenizer, llm_dir: Path) -> tuple[list[str], int, int]:
    """The released code tokens, modality-major, with (groups, codes per group). Names come from the
    tokenizer (and `added_tokens.json`, the reference's source): `[<letters><group>_<index>]`."""
    names = set(tokenizer.get_added_vocab())
    added = llm_dir / "added_tokens.json"
    if added.is_file():
        names |= set(json.loads(added.read_text()))
    parsed = {}
    for name in names:
        m = CODE_TOKEN.match(name)
        if m:
            parsed[(int(m.group(2)), int(m.group(3)))] = name
    if not parsed:
        raise OfficialImportError(f"{llm_dir}: the tokenizer has no code tokens of the form [M<group>_<index>]",
                           path=str(llm_dir), field="added_tokens.json")
    groups = 1 + max(g for g, _ in parsed)
    codes = 1 + max(k for _, k in parsed)
    absent = [f"[?{g}_{k}]" for g in range(groups) for k in range(codes) if (g, k) not in parsed]
    if absent:
        raise OfficialImportError(f"{llm_dir}: code tokens missing from the tokenizer: {absent[:8]}", path=str(llm_dir),
                           field="added_tokens.json")
    vocab = tokenizer.get_vocab()
    not_one = [n for n in parsed.values() if n not in vocab]
    if not_one:
        raise OfficialImportError(f"{llm_dir}: code tokens in added_tokens.json but not in the tokenizer: {not_one[:4]}",
                           path=str(llm_dir), field="added_tokens.json")
    return [parsed[(g, k)] for g in range(groups) for k in range(codes)], groups, codes


def group_names(num_groups: int, groups: str | None) -> tuple[list[str], list[int]]:
    """Names of the modality groups: the labels known from the reference, then `groups` ("4=Fundus,5=OCT"
    pairs, or a comma-separated list of all names); returns (names, placeholder indices)."""
    names: dict[int, str] = {g: n for g, n in KNOWN_GROUPS.items() if g < num_groups}
    if groups:
        items = [s.strip() for s in groups.split(",") if s.strip()]
        if all("=" in s for s in items):
            for s in items:
                g, _, name = s.partition("=")
                if not g.strip().isdigit() or not 0 <= int(g) < num_groups:
                    raise DataError(f"--groups: '{s}' does not name a group 0..{num_groups - 1}", field="groups")
                names[int(g)] = name.strip()
        elif len(items) == num_groups and not any("=" in s for s in items):
            names = dict(enumerate(items))
        else:
            raise DataError(f"--groups: give 'INDEX=NAME' pairs or all {num_groups} names, got {len(items)} items",
                            field="groups")
    placeholders = [g for g in range(num_groups) if g not in names]
    return [names.get(g, f"group{g}") for g in range(num_groups)], placeholders


# ------------------------------------------------------------------------------------ vision
def vision_config_dir(vision: str | Path, out: Path) -> tuple[Path, str]:
    """A CLIP vision directory for `vision` (an open_clip .pt is converted into `out/_vision_converted`);
    returns (HF directory, description)."""
    vision = Path(vision)
    if vision.is_dir():
        return vision, f"Hugging Face directory {vision}"
    from medsight.interop.open_clip import convert_open_clip

    target = out / "_vision_converted"
    convert_open_clip(vision, target)
    return target, f"open_clip checkpoint {vision} (ViT-L-14-336-quickgelu)"


# ------------------------------------------------------------------------------------- import
def import_official(perceiver: str | Path, llm: str | Path, vision: str | Path, out: str | Path,
                    codebook: str | Path | None = None, select_layer: int | None = None,
                    groups: str | None = None, max_new_tokens: int = 512) -> dict[str, Any]:
    """Write a stage-3 export at `out` that computes the released model; returns the import report (also in
    meta.json under "imported")."""
    from transformers import Qwen3ForCausalLM

    from medsight.config import load_config
    from medsight.export import save_component_shards, save_export
    from medsight.interop.reference_perceiver import map_reference_perceiver
    from medsight.manifest import write_manifest
    from medsight.models.backbones import HFVisionEncoder, load_hf_vision
    from medsight.models.llm import QWEN_CHAT_TEMPLATE, load_tokenizer
    from medsight.models.perceiver import build_perceiver
    from medsight.models.projectors import TextToVision, VisionToText

    out, llm_dir = Path(out), Path(llm)
    if (out / "meta.json").exists():
        raise DataError(f"{out}: an export is already there; choose another --out", path=str(out))
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"perceiver": str(perceiver), "llm": str(llm_dir), "vision": str(vision)}

    # --- the released LLM config and tokenizer (cheap; fail before reading weights)
    raw, qcfg = read_llm_config(llm_dir)
    tokenizer = load_tokenizer(llm_dir)
    codes, num_groups, num_codes = released_code_tokens(tokenizer, llm_dir)
    names, placeholders = group_names(num_groups, groups)
    ref_layer = int(raw.get("mm_vision_select_layer", -2)) if select_layer is None else int(select_layer)
    our_layer = ref_layer + 1 if ref_layer >= 0 else ref_layer  # open_clip intermediate i = hidden_states[i+1]
    separate = bool(raw.get("use_sep_proj", False))

    # --- perceiver
    pstate, pargs, which = read_perceiver_checkpoint(perceiver)
    dims = perceiver_dims(pstate, str(perceiver))

    # --- vision: an HF CLIP directory; only its config is kept (weights go into vision.safetensors)
    vdir, vdesc = vision_config_dir(vision, out)
    hf_vision = load_hf_vision(vdir)
    vc = hf_vision.config
    if vc.hidden_size != dims["dim"]:
        raise OfficialImportError(f"{vision}: encoder width {vc.hidden_size} != the perceiver's {dims['dim']}",
                           path=str(vision), field="hidden_size")
    if int(raw.get("mm_hidden_size", vc.hidden_size)) != vc.hidden_size:
        raise OfficialImportError(f"{llm_dir / 'config.json'}: mm_hidden_size {raw['mm_hidden_size']} != encoder width "
                           f"{vc.hidden_size}", path=str(llm_dir / "config.json"), field="mm_hidden_size")
    vc.save_pretrained(out / "vision_config")
    encoder = HFVisionEncoder(hf_vision, our_layer)

    # --- config of the export
    cfg = load_config("stage3")
    OmegaConf.update(cfg, "vision", {"name": "hf", "path": "vision_config", "select_layer": our_layer,
                                     "trainable": False}, merge=True)
    OmegaConf.update(cfg, "perceiver", {**dims, "pixel_ffn": True, "mask_threshold": 0.5, "variant": "reference"},
                     merge=True)
    OmegaConf.update(cfg, "data", {"image_size": vc.image_size, "preprocess": "clip", "modality_groups": names,
                                   "mean": [0.48145466, 0.4578275, 0.40821073],
                                   "std": [0.26862954, 0.26130258, 0.27577711]}, merge=True)
    OmegaConf.update(cfg, "codebook", {"num_groups": num_groups, "num_codes": num_codes}, merge=True)
    OmegaConf.update(cfg, "llm", {"name": "hf", "path": None, "separate_projectors": separate, "patch_pool": 1,
                                  "system_prompt": REFERENCE_SYSTEM_PROMPT, "generation_prompt": False,
                                  "max_length": 4096, "attention_dropout": 0.0, "image_dropout": 0.0}, merge=True)
    OmegaConf.update(cfg, "stage3", {"max_new_tokens": max_new_tokens, "do_sample": False}, merge=True)
    cfg.stage = "stage3"

    perceiver_model = build_perceiver(cfg, vc.hidden_size)
    mapped, p_unused = map_reference_perceiver(pstate, perceiver_model.state_dict(), str(perceiver))
    perceiver_model.load_state_dict(mapped, strict=True)
    report["perceiver_entry"] = which
    outside: dict[str, int] = {}
    for k, why in list(p_unused.items()):
        if why == "outside the region perceiver":  # e.g. the EMA copy's image_encoder.*: counted per prefix
            outside[k.split(".")[0]] = outside.get(k.split(".")[0], 0) + 1
            del p_unused[k]
    report["perceiver_unused"] = p_unused
    report["perceiver_unused_outside"] = outside

    # --- LLM weights: pass 1 classifies every key (no tensor read), pass 2 streams shard by shard
    hidden = qcfg.hidden_size
    with torch.device("meta"):
        lm_meta = Qwen3ForCausalLM(qcfg).state_dict()
    lm_keys = set(lm_meta)
    v2t = VisionToText(vc.hidden_size, dims["dim"], hidden, separate=separate)
    t2v = TextToVision(hidden, dims["dim"])
    shards = llm_shards(llm_dir)
    plan: dict[Path, list[tuple[str, str, str]]] = {s: [] for s in shards}  # shard -> (key, component, ours)
    llm_unused: dict[str, str] = {}
    unknown = []
    for shard in shards:
        for key in shard_keys(shard):
            comp, ours = classify_llm_key(key, lm_keys)
            if comp == "unused":
                llm_unused[key] = ours  # type: ignore[assignment]
            elif comp == "unknown":
                unknown.append(f"{key} ({shard.name})")
            else:
                plan[shard].append((key, comp, ours))  # type: ignore[arg-type]
    if unknown:
        raise OfficialImportError(f"{llm_dir}: keys medsight does not know: {unknown[:8]}", path=str(llm_dir),
                                  field=unknown[0].split(" ")[0])
    found = {(c, o) for items in plan.values() for _, c, o in items}
    released = {"mlp": "model.mm_projector", "region_mlp": "model.region_mm_projector", "net": "model.token_projection"}
    for comp, module in (("projector_v2t", v2t), ("projector_t2v", t2v)):
        missing = sorted(k for k in module.state_dict() if (comp, k) not in found)
        if missing:
            name = released[missing[0].split(".")[0]] + missing[0][missing[0].index("."):]
            raise OfficialImportError(f"{llm_dir}: missing '{name}' (needed for {comp})", path=str(llm_dir), field=name)
    missing = sorted(k for k in lm_keys if ("llm", k) not in found)
    if qcfg.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise OfficialImportError(f"{llm_dir}: missing LLM tensors {missing[:8]}", path=str(llm_dir), field=missing[0])
    bad = [f"{k}: {tuple(t.shape)} vs {tuple(lm_meta[k].shape)}" for shard in shards
           for k, t in shard_shapes(shard, [k for k, c, _ in plan[shard] if c == "llm"]).items()
           if tuple(t.shape) != tuple(lm_meta[k].shape)]
    if bad:
        raise OfficialImportError(f"{llm_dir}: LLM tensors do not fit its config.json: {bad[:4]}", path=str(llm_dir))
    rows = lm_meta["model.embed_tokens.weight"].shape[0]
    code_ids = tokenizer.convert_tokens_to_ids(codes)
    if max(code_ids) >= rows:
        raise OfficialImportError(f"{llm_dir}: code-token id {max(code_ids)} has no embedding row ({rows} rows)",
                                  path=str(llm_dir), field="model.embed_tokens.weight")
    parts: dict[str, dict[str, torch.Tensor]] = {"projector_v2t": {}, "projector_t2v": {}}

    def llm_parts() -> Iterator[dict[str, torch.Tensor]]:
        """One released shard at a time: its LLM tensors (written as they are), its projector tensors kept."""
        from safetensors import safe_open

        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                out_shard = {}
                for key, comp, ours in plan[shard]:
                    if comp == "llm":
                        out_shard[ours] = f.get_tensor(key)
                    else:
                        parts[comp][ours] = f.get_tensor(key)
            yield out_shard

    # --- write the export
    extra: dict[str, Any] = {}
    if codebook is not None:
        extra["codebook_reference"] = reference_codebook(codebook)
        report["codebook"] = str(codebook)
    report.update({"select_layer": {"reference": ref_layer, "hidden_states_index": our_layer},
                   "vision_source": vdesc, "llm_unused": llm_unused, "modality_groups": names,
                   "placeholder_groups": placeholders, "code_tokens": len(codes),
                   "embedding_rows": rows, "vocab_rows_added": 0})
    meta = {"code_tokens": codes, "code_ids": list(code_ids), "lora": None, "llm": "hf", "hidden_size": hidden,
            "imported": report, "codes_initialised": True}
    save_component_shards(out, "llm", llm_parts(), count=len(shards))
    for comp, module in (("projector_v2t", v2t), ("projector_t2v", t2v)):
        module.load_state_dict({k: v.float() for k, v in parts[comp].items()}, strict=True)
    save_export(out, cfg, {"vision": encoder, "perceiver": perceiver_model, "projector_v2t": v2t,
                           "projector_t2v": t2v, **extra}, meta, in_place=True)  # manifest written last, below
    meta_path = out / "meta.json"
    meta_full = json.loads(meta_path.read_text())
    meta_full["components"] = sorted([*meta_full["components"], "llm"])
    meta_path.write_text(json.dumps(meta_full, indent=2))
    qcfg.save_pretrained(str(out / "llm"))
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE  # the reference renders exactly this template
    tokenizer.save_pretrained(str(out / "tokenizer"))
    if (out / "_vision_converted").exists():
        shutil.rmtree(out / "_vision_converted")
    write_manifest(out)  # every file above, hashed; written last (a folder without it was not finished)
    if placeholders:
        log.warning("modality groups without a known name (placeholders): %s; name them with --groups",
                    ", ".join(f"group{g}" for g in placeholders))
    log.info("imported the released MedSIGHT into %s (%d code tokens, select_layer %d)", out, len(codes), ref_layer)
    return report


def reference_codebook(path: str | Path) -> dict[str, torch.Tensor]:
    """The stage-2 quantiser tensors of a released `0035673.pt` (`region_perceiver.to_code.*`,
    `region_perceiver.code_decoder.*`, `quantizer.*`, `modality_predictor.*`), kept under their released
    names for coding new grounded data with the released codebook."""
    state, _, _ = read_perceiver_checkpoint(path)
    keep = ("region_perceiver.to_code.", "region_perceiver.code_decoder.", "quantizer.", "modality_predictor.")
    out = {k: v for k, v in state.items() if k.startswith(keep) and isinstance(v, torch.Tensor)}
    if not any(k.startswith("quantizer.") for k in out):
        raise OfficialImportError(f"{path}: no quantizer.* tensors (is this the stage-2 checkpoint?)", path=str(path),
                           field="quantizer")
    return out


__all__ = ["CODE_TOKEN", "KNOWN_GROUPS", "import_official", "read_perceiver_checkpoint", "released_code_tokens"]
