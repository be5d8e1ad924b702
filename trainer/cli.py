"""The trainer's `voxloop` subcommands: pretrain corpus|train, export, eval.

Importing this module imports no torch: the client-only install keeps a fast, working CLI. Each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

DEFAULT_CORPUS_DIR = Path("corpus")
DEFAULT_RUN_DIR = Path("runs/base")


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    pretrain = subparsers.add_parser("pretrain", help="build the synthetic corpus and train the base model")
    steps = pretrain.add_subparsers(dest="pretrain_command", required=True)

    corpus = steps.add_parser("corpus", help="synthesize the speech corpus with espeak-ng and flite")
    corpus.add_argument("--out", type=Path, default=DEFAULT_CORPUS_DIR, help="corpus directory (default: corpus)")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--sentences", type=int, default=None, help="number of sentences (default: the config's)")
    corpus.add_argument("--workers", type=int, default=2)
    corpus.set_defaults(handler=_pretrain_corpus)

    train = steps.add_parser("train", help="CTC pretraining of the base policy on the corpus (resumes)")
    train.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR)
    train.add_argument("--out", type=Path, default=DEFAULT_RUN_DIR, help="run directory (checkpoints, best/)")
    train.add_argument("--epochs", type=int, default=12)
    train.add_argument("--max-minutes", type=float, default=120.0)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(handler=_pretrain_train)

    export = subparsers.add_parser("export", help="export a checkpoint to ONNX, check parity, write a model card")
    export.add_argument("--checkpoint", type=Path, default=DEFAULT_RUN_DIR / "best")
    export.add_argument("--out", type=Path, required=True, help="version directory to write (e.g. models/base)")
    export.add_argument("--version", required=True)
    export.add_argument("--corpus", type=Path, default=None, help="evaluate the test splits of this corpus")
    export.add_argument("--parent-version", default=None)
    export.set_defaults(handler=_export)

    evaluate = subparsers.add_parser("eval", help="WER/CER of a model on a manifest")
    evaluate.add_argument("--manifest", type=Path, required=True, help="JSON-lines manifest (path, text, voice)")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="an exported model.onnx (or its version directory)")
    source.add_argument("--checkpoint", type=Path, help="a torch checkpoint directory (save_pretrained)")
    evaluate.add_argument("--out", type=Path, default=None, help="write per-utterance results (JSON lines)")
    evaluate.add_argument("--json", action="store_true", help="print the summary as JSON")
    evaluate.set_defaults(handler=_eval)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _pretrain_corpus(args: argparse.Namespace) -> int:
    from .corpus import CorpusConfig, build_corpus

    _setup_logging()
    overrides = {"num_sentences": args.sentences} if args.sentences else {}
    config = CorpusConfig(out_dir=args.out, seed=args.seed, workers=args.workers, **overrides)
    print(f"corpus written to {build_corpus(config)}")
    return 0


def _pretrain_train(args: argparse.Namespace) -> int:
    from .pretrain import PretrainConfig, pretrain

    _setup_logging()
    config = PretrainConfig(corpus_dir=args.corpus, out_dir=args.out, epochs=args.epochs,
                            max_minutes=args.max_minutes, num_threads=args.threads, seed=args.seed)
    print(f"best weights in {pretrain(config)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .release import build_release

    _setup_logging()
    card = build_release(args.checkpoint, args.out, args.version, corpus_dir=args.corpus,
                         parent_version=args.parent_version)
    print(json.dumps({"version": card["version"], "parity": card["parity"],
                      "evaluation": {k: {"wer": v["wer"], "cer": v["cer"]}
                                     for k, v in card.get("evaluation", {}).items()}}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .data import read_manifest
    from .evaluate import evaluate, onnx_transcriber, torch_transcriber
    from .model import VoxloopForCTC

    if args.model is not None:
        onnx_path = args.model / "model.onnx" if args.model.is_dir() else args.model
        transcribe = onnx_transcriber(onnx_path)
    else:
        transcribe = torch_transcriber(VoxloopForCTC.from_pretrained(args.checkpoint))
    rows = read_manifest(args.manifest)
    overall, per_voice, results = evaluate(transcribe, rows, args.manifest.parent)
    if args.out is not None:
        with args.out.open("w") as f:
            for r in results:
                f.write(json.dumps({"id": r.id, "voice": r.voice, "reference": r.reference,
                                    "hypothesis": r.hypothesis}) + "\n")
    if args.json:
        print(json.dumps({"overall": overall.as_dict(),
                          "per_voice": {v: s.as_dict() for v, s in per_voice.items()}}, indent=2))
        return 0
    print(f"{'voice':<28} {'utts':>6} {'WER':>7} {'CER':>7}")
    for voice, s in per_voice.items():
        print(f"{voice:<28} {s.utterances:>6} {s.wer:>7.1%} {s.cer:>7.1%}")
    print(f"{'all':<28} {overall.utterances:>6} {overall.wer:>7.1%} {overall.cer:>7.1%}")
    return 0
