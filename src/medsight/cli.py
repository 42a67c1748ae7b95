"""`medsight`: score prediction files, run the evaluation harness on an export, answer about one image.

    medsight eval vqa     --gt test.json --pred answers.jsonl [--protocol official|strict]
    medsight eval mcq     --gt CT.json   --pred answers.jsonl [--protocol official|strict]
    medsight eval diagseg --gt test.json --pred answers.jsonl [--masks-dir DIR]
    medsight eval run     --export checkpoints/default/stage3/export [--data data/synthetic] [--out DIR]
    medsight eval run     --export E --benchmark vqa-rad,slake,pathvqa,omnimedvqa,diagseg|all --data PATH [--limit N]
    medsight predict      --export DIR --image scan.nii.gz --slice 40 --question "..." --out DIR
    medsight convert open-clip unimed_clip.pt --out DIR [--model ViT-L-14-336-quickgelu]
    medsight import official --perceiver 0079280.pt --llm medsight_full_instruct --vision unimed.pt --out DIR
    medsight serve        --export DIR [--host 127.0.0.1] [--port 7860] [--device cpu|cuda] [--auth user:pass]

User errors (missing files, malformed lines, unmatched ids) print one line on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

EPILOG = "Protocols: 'official' reproduces the reference scorer exactly (quirks included); 'strict' fixes them."


def _add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("eval", help="score predictions or run the evaluation harness",
                              description="Score prediction files, or generate and score with an export.")
    tasks = evaluate.add_subparsers(dest="task", required=True, metavar="{vqa,mcq,diagseg,run}")

    for name, summary in (("vqa", "closed accuracy, open recall/precision/F1, overall (VQA-RAD/SLAKE/PathVQA)"),
                          ("mcq", "multiple-choice accuracy (OmniMedVQA)")):
        p = tasks.add_parser(name, help=summary, description=summary, epilog=EPILOG)
        p.add_argument("--gt", required=True, help="test set JSON (a list of items)")
        p.add_argument("--pred", required=True, help="predictions JSONL: {question_id, text, ...} per line")
        p.add_argument("--protocol", choices=["official", "strict"], default="official",
                       help="scoring protocol (default: official)")

    p = tasks.add_parser("diagseg", help="diagnosis recall and Dice (DiagSeg)",
                         description="Diagnosis recall of short_answer and Dice of the emitted masks.")
    p.add_argument("--gt", required=True, help="DiagSeg test JSON")
    p.add_argument("--pred", required=True,
                   help="predictions JSONL: {question_id, text, masks: [path, ...]}; mask paths relative to it")
    p.add_argument("--masks-dir", default=None, help="root of the GT mask paths (default: the GT file's folder)")
    p.add_argument("--protocol", choices=["official", "strict"], default="strict",
                   help="strict (default): SPEC section 7, every mask_ids entry; official: the reference "
                        "notebook (last mask_ids entry, > 127 at native size)")
    p.add_argument("--path-map", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite an absolute GT mask path prefix of the authors' disk (repeatable)")

    p = tasks.add_parser("run", help="generate answers with an export and score every synthetic test split",
                         description="Greedy generation on vqa/test.json, omnimedvqa/*.json and "
                                     "diagseg/test.json, scored with both protocols; writes eval/results.json "
                                     "and eval/report.md next to the export.")
    p.add_argument("--export", required=True, help="stage-3 export directory")
    p.add_argument("--data", default="data/synthetic", help="dataset root (default: data/synthetic)")
    p.add_argument("--out", default=None, help="output folder (default: <export's parent>/../eval)")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch size (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed, recorded in results.json (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each split")
    p.add_argument("--benchmark", default=None,
                   help="the paper's sets as distributed: vqa-rad, slake, pathvqa, omnimedvqa, diagseg (comma list), "
                        "all, or synthetic; --data is then the set's folder/file, or a folder holding several")
    p.add_argument("--modalities", choices=["paper", "all"], default="paper",
                   help="OmniMedVQA: the 7 modalities the paper reports (default) or all 8 (with Dermoscopy)")
    p.add_argument("--path-map", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite an absolute path prefix of the authors' disk (DiagSeg; repeatable)")


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="answer a question about one image and save its masks",
                       description="Answer a question about a PNG/JPEG, NIfTI slice or DICOM image; writes "
                                   "answer.json, one mask PNG per region and overlay.png to --out.")
    p.add_argument("--export", required=True, help="stage-3 export directory")
    p.add_argument("--image", required=True, help="PNG/JPEG, NIfTI (.nii/.nii.gz) or DICOM file")
    p.add_argument("--question", required=True, help="the question to ask")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--slice", type=int, default=None, help="slice index for a volume (default: middle)")
    p.add_argument("--axis", type=int, default=2, help="slicing axis for a volume (default: 2)")
    p.add_argument("--window", default=None,
                   help="CT window preset (e.g. abdomen, lung, bone, brain) or CENTER,WIDTH")


def _add_convert_parser(sub: argparse._SubParsersAction) -> None:
    conv = sub.add_parser("convert", help="convert another project's checkpoint to a medsight-readable one",
                          description="Convert checkpoints of other projects (nothing in them is executed).")
    kinds = conv.add_subparsers(dest="kind", required=True, metavar="{open-clip}")
    p = kinds.add_parser("open-clip", help="open_clip checkpoint -> Hugging Face CLIPVisionModel directory",
                         description="Vision tower of an open_clip checkpoint (e.g. UniMed-CLIP) -> a CLIPVisionModel "
                                     "directory for vision.name=hf / clip-vit-l14-336.")
    p.add_argument("ckpt", help="open_clip .pt file (dict with 'state_dict', or a bare state dict)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", default="ViT-L-14-336-quickgelu",
                   help="open_clip model name: head width and activation (default: ViT-L-14-336-quickgelu)")
    p.add_argument("--head-width", type=int, default=None, help="attention head width (default: the model's, 64)")


def _add_import_parser(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser("import", help="import released weights as a medsight export",
                         description="Import released checkpoints (nothing in them is executed).")
    kinds = imp.add_subparsers(dest="kind", required=True, metavar="{official}")
    p = kinds.add_parser("official", help="the authors' released MedSIGHT -> a stage-3 export",
                         description="Region Perceiver .pt + LLM directory (llava_qwen) + UniMed-CLIP -> a "
                                     "self-contained stage-3 export for medsight.load / predict / eval.")
    p.add_argument("--perceiver", required=True, help="stage-1 Region Perceiver checkpoint (0079280.pt)")
    p.add_argument("--codebook", default=None, help="stage-2 checkpoint (0035673.pt): keep the released codebook")
    p.add_argument("--llm", required=True, help="released LLM directory (medsight_full_instruct/)")
    p.add_argument("--vision", required=True, help="open_clip checkpoint (UniMed-CLIP .pt) or a HF CLIP directory")
    p.add_argument("--out", required=True, help="export directory to write")
    p.add_argument("--select-layer", type=int, default=None,
                   help="CLIP block for features, the reference's numbering (default: the LLM config's "
                        "mm_vision_select_layer; the reference eval config uses -1 for old checkpoints)")
    p.add_argument("--groups", default=None,
                   help="modality-group names the checkpoints do not carry: 'INDEX=NAME,...' or all names")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generation budget recorded in the export")


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local web app (Gradio) over an export, with an /answer API",
                       description="Serve a web app over a stage-3 export: upload PNG/JPEG, DICOM, a zipped DICOM "
                                   "series or NIfTI, ask questions, see and download the masks. Research use only.")
    p.add_argument("--export", required=True, help="stage-3 export directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login (needed off localhost)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="answers computed at the same time; the others wait in the queue (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsight", description="MedSIGHT: a medical VLM that answers and segments.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{eval,predict,serve,convert,import}")
    _add_eval_parsers(sub)
    _add_predict_parser(sub)
    _add_serve_parser(sub)
    _add_convert_parser(sub)
    _add_import_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "eval" and args.task in ("vqa", "mcq"):
        from medsight.scoring import SCORERS

        result = SCORERS[args.task](args.gt, args.pred, args.protocol)
    elif args.command == "eval" and args.task == "diagseg":
        from medsight.data.formats.common import PathMap
        from medsight.scoring import score_diagseg_file

        result = score_diagseg_file(args.gt, args.pred, args.masks_dir, args.protocol, PathMap.parse(args.path_map))
    elif args.command == "eval" and args.task == "run" and args.benchmark:
        from medsight.benchmarks import run_benchmarks
        from medsight.data.formats.common import PathMap

        result = run_benchmarks(args.export, args.benchmark, args.data, out=args.out, limit=args.limit,
                                batch_size=args.batch_size, seed=args.seed, modalities=args.modalities,
                                path_map=PathMap.parse(args.path_map))
        print(result["table"])
        return 0
    elif args.command == "eval" and args.task == "run":
        from medsight.evaluate import run_evaluation

        result = run_evaluation(args.export, data=args.data, out=args.out, batch_size=args.batch_size,
                                seed=args.seed, limit=args.limit)
        print(result["table"])
        return 0
    elif args.command == "convert":
        from medsight.interop.open_clip import convert_open_clip

        result = convert_open_clip(args.ckpt, args.out, model=args.model, head_width=args.head_width)
        result = {k: v for k, v in result.items() if k != "ignored_keys"} | {"ignored_keys": len(result["ignored_keys"])}
    elif args.command == "import":
        from medsight.interop.official import import_official

        report = import_official(args.perceiver, args.llm, args.vision, args.out, codebook=args.codebook,
                                 select_layer=args.select_layer, groups=args.groups,
                                 max_new_tokens=args.max_new_tokens)
        result = {"export": args.out, "code_tokens": report["code_tokens"], "select_layer": report["select_layer"],
                  "modality_groups": report["modality_groups"], "placeholder_groups": report["placeholder_groups"],
                  "llm_unused": len(report["llm_unused"]), "vocab_rows_added": report["vocab_rows_added"]}
    elif args.command == "serve":
        from medsight.app import serve

        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
        serve(args.export, host=args.host, port=args.port, device=args.device, auth=args.auth,
              concurrency=args.concurrency)
        return 0
    else:  # predict
        from medsight.predict import predict

        result = predict(args.export, args.image, args.question, args.out, slice_index=args.slice,
                         axis=args.axis, window=args.window)
    print(json.dumps(result, indent=None if args.command == "eval" else 2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `medsight` console script; returns the exit status."""
    import torch

    torch.set_flush_denormal(True)
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # optional GPU codec
    args = build_parser().parse_args(argv)
    from medsight.atomic import OutputError
    from medsight.data import DataError
    from medsight.export import ExportError
    from medsight.scoring import EvalInputError

    try:
        return _run(args)
    except (EvalInputError, DataError, ExportError, OutputError) as err:
        message = str(err) or type(err).__name__
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        message = f"{err.filename}: {err.strerror}" if err.filename else str(err)
    print(f"medsight: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
