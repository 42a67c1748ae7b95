"""`medsight`: score prediction files, run the evaluation harness on an export, answer about one image.

    medsight eval vqa     --gt test.json --pred answers.jsonl [--protocol official|strict]
    medsight eval mcq     --gt CT.json   --pred answers.jsonl [--protocol official|strict]
    medsight eval diagseg --gt test.json --pred answers.jsonl [--masks-dir DIR]
    medsight eval run     --export checkpoints/default/stage3/export [--data data/synthetic] [--out DIR]
    medsight predict      --export DIR --image scan.nii.gz --slice 40 --question "..." --out DIR
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{eval,predict,serve}")
    _add_eval_parsers(sub)
    _add_predict_parser(sub)
    _add_serve_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "eval" and args.task in ("vqa", "mcq"):
        from medsight.evaluate import SCORERS

        result = SCORERS[args.task](args.gt, args.pred, args.protocol)
    elif args.command == "eval" and args.task == "diagseg":
        from medsight.evaluate import score_diagseg_file

        result = score_diagseg_file(args.gt, args.pred, args.masks_dir)
    elif args.command == "eval" and args.task == "run":
        from medsight.evaluate import run_evaluation

        result = run_evaluation(args.export, data=args.data, out=args.out, batch_size=args.batch_size,
                                seed=args.seed, limit=args.limit)
        print(result["table"])
        return 0
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
    from medsight.data import DataError
    from medsight.evaluate import EvalInputError
    from medsight.export import ExportError

    try:
        return _run(args)
    except (EvalInputError, DataError, ExportError) as err:
        message = str(err) or type(err).__name__
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        message = f"{err.filename}: {err.strerror}" if err.filename else str(err)
    print(f"medsight: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
