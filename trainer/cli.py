"""The trainer's `voxloop` subcommands: pretrain corpus|train, export, eval, train (the online trainer).

Importing this module imports no torch: the client-only install keeps a fast, working CLI. Each
command imports what it needs when it runs. The flags that set config fields are generated from the
configs (trainer/config.py, torch-free) by trainer/config_flags.py: their types, defaults and help are
the fields'; the tables below only say which flag sets which field (docs/operations.md shows them too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..core.data_dir import HOME_ENV
from .config import DEFAULT_CORPUS_DIR, TRAINER_METRICS_PORT, CorpusConfig, PretrainConfig, TrainerConfig
from .config_flags import ConfigFlag, add_config_flags, build_config, flag_values

DEFAULT_RUN_DIR = Path("runs/base")

CORPUS_FLAGS = (ConfigFlag("--out", "out_dir", default=DEFAULT_CORPUS_DIR), ConfigFlag("--seed", "seed"),
                ConfigFlag("--sentences", "num_sentences"), ConfigFlag("--workers", "workers"))
"""`voxloop pretrain corpus` -> CorpusConfig."""
PRETRAIN_FLAGS = (ConfigFlag("--corpus", "corpus_dir", default=DEFAULT_CORPUS_DIR),
                  ConfigFlag("--out", "out_dir", default=DEFAULT_RUN_DIR), ConfigFlag("--epochs", "epochs"),
                  ConfigFlag("--max-minutes", "max_minutes"), ConfigFlag("--threads", "num_threads"),
                  ConfigFlag("--seed", "seed"))
"""`voxloop pretrain train` -> PretrainConfig."""
TRAIN_FLAGS = (ConfigFlag("--objective", "ppo.objective"), ConfigFlag("--data-dir", "data_dir"),
               ConfigFlag("--store", "store_url"), ConfigFlag("--registry", "registry_dir"),
               ConfigFlag("--corpus", "corpus_dir"), ConfigFlag("--min-feedback", "min_feedback"),
               ConfigFlag("--max-wait-s", "max_wait_s"), ConfigFlag("--threads", "num_threads"),
               ConfigFlag("--no-adapt-lexicon", "adapt_lexicon"),
               ConfigFlag("--gradient-accumulation-steps", "ppo.gradient_accumulation_steps", metavar="N"))
"""`voxloop train` -> TrainerConfig. A flag left out leaves the field to VOXLOOP_TRAINER_<FIELD> or its default."""


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    pretrain = subparsers.add_parser("pretrain", help="build the synthetic corpus and train the base model")
    steps = pretrain.add_subparsers(dest="pretrain_command", required=True)

    corpus = steps.add_parser("corpus", help="synthesize the speech corpus with espeak-ng and flite")
    add_config_flags(corpus, CorpusConfig, CORPUS_FLAGS, with_defaults=True)
    corpus.set_defaults(handler=_pretrain_corpus)

    train = steps.add_parser("train", help="CTC pretraining of the base policy on the corpus (resumes)")
    add_config_flags(train, PretrainConfig, PRETRAIN_FLAGS, with_defaults=True)
    train.set_defaults(handler=_pretrain_train)

    export = subparsers.add_parser("export", help="export a checkpoint to ONNX, check parity, write a model card")
    export.add_argument("--checkpoint", type=Path, default=DEFAULT_RUN_DIR / "best",
                        help="a voxloop pretraining checkpoint, or a local Hugging Face CTC checkpoint directory "
                             "(e.g. Wav2Vec2ForCTC with its vocab.json)")
    export.add_argument("--out", type=Path, required=True, help="version directory to write (e.g. models/base)")
    export.add_argument("--version", required=True)
    export.add_argument("--corpus", type=Path, default=None, help="evaluate the test splits of this corpus")
    export.add_argument("--parent-version", default=None)
    export.set_defaults(handler=_export)

    train_online = subparsers.add_parser(
        "train", help="the online trainer: PPO cycles on user feedback, gated, published to the registry")
    train_online.add_argument("--once", action="store_true", help="run one cycle on what is pending, then exit")
    add_config_flags(train_online, TrainerConfig, TRAIN_FLAGS, with_defaults=False)
    train_online.add_argument("--json", action="store_true", help="with --once: print the cycle report as JSON")
    train_online.add_argument("--metrics-port", type=int, default=TRAINER_METRICS_PORT,
                              help="Prometheus metrics port of the running trainer (0 turns it off; "
                                   f"default {TRAINER_METRICS_PORT})")
    train_online.add_argument("--metrics-host", default="127.0.0.1",
                              help="address the metrics endpoint listens on (0.0.0.0 in a container)")
    train_online.set_defaults(handler=_train_online)

    evaluate = subparsers.add_parser("eval", help="WER/CER of a model on a manifest")
    evaluate.add_argument("--manifest", type=Path, required=True, help="JSON-lines manifest (path, text, voice)")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="an exported model.onnx (or its version directory)")
    source.add_argument("--checkpoint", type=Path, help="a torch checkpoint directory (save_pretrained)")
    evaluate.add_argument("--decoder", choices=("auto", "greedy", "lm"), default="auto",
                          help="auto: what the server's finals use (a Whisper version's second pass, else "
                               "greedy); greedy: the first pass's best path; lm: the version's lexicon + LM "
                               "beam search (--model only; card['decoder'] of the model's version directory or "
                               "--decoder-dir)")
    evaluate.add_argument("--decoder-dir", type=Path, default=None,
                          help="version directory whose card['decoder'] and files to use (default: the model's)")
    evaluate.add_argument("--out", type=Path, default=None, help="write per-utterance results (JSON lines)")
    evaluate.add_argument("--json", action="store_true", help="print the summary as JSON")
    evaluate.set_defaults(handler=_eval)


def _setup_logging() -> None:
    # As for `voxloop serve`: $VOXLOOP_LOG_FORMAT (text|json) and $VOXLOOP_LOG_LEVEL (the image sets json).
    from voxloop.core.logging_setup import configure_logging

    configure_logging(os.environ.get("VOXLOOP_LOG_LEVEL", "info"), os.environ.get("VOXLOOP_LOG_FORMAT", "text"))


def _pretrain_corpus(args: argparse.Namespace) -> int:
    from .corpus import build_corpus

    _setup_logging()
    config = build_config(CorpusConfig, flag_values(args, CORPUS_FLAGS))
    print(f"corpus written to {build_corpus(config)}")
    return 0


def _pretrain_train(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    _setup_logging()
    config = build_config(PretrainConfig, flag_values(args, PRETRAIN_FLAGS))
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


def trainer_config_from_args(args: argparse.Namespace, environ=None) -> TrainerConfig:
    """TrainerConfig from `voxloop train` flags, over `VOXLOOP_TRAINER_*` variables (as for the in-process
    trainer), over the defaults; data dir as for serve ($VOXLOOP_HOME)."""
    from .config import ENV_PREFIX, overrides_from_env

    environ = os.environ if environ is None else environ
    values: dict = overrides_from_env(environ)
    if environ.get(HOME_ENV):
        values["data_dir"] = Path(environ[HOME_ENV])
    if objective := environ.get(ENV_PREFIX + "OBJECTIVE", "").strip():
        values["ppo.objective"] = objective
    return build_config(TrainerConfig, {**values, **flag_values(args, TRAIN_FLAGS)})


def _train_online(args: argparse.Namespace) -> int:
    import threading

    from .distributed import close, data_parallel_from_env
    from .loop import TrainerLoop

    _setup_logging()
    try:
        config = trainer_config_from_args(args)
        group = data_parallel_from_env()  # torchrun's processes join one group here
    except ValueError as e:
        print(f"voxloop train: error: {e}", file=sys.stderr)
        return 2
    if group.enabled and not args.once:
        print("voxloop train: error: data-parallel training (torchrun) runs one cycle per launch: add --once "
              "(e.g. from a CronJob), or run the trainer loop without torchrun", file=sys.stderr)
        close(group)
        return 2
    loop = TrainerLoop(config)
    metrics = None
    try:
        if args.once:
            report = loop.run_once(data_parallel=group)
            if not group.is_main:  # its share of the update is in the main process's report
                return 0
            if args.json:
                print(json.dumps(report.as_dict(), indent=2, default=str))
            else:
                gate = report.gate or {}
                print(f"cycle {report.cycle_id}: {report.outcome}; {report.version_in} -> "
                      f"{report.version_out or report.version_in}; {len(report.feedback_ids)} feedback items "
                      f"({len(report.trained_ids)} trained, {len(report.heldout_ids)} held out); "
                      f"held-out WER {gate.get('heldout_wer_serving')} -> {gate.get('heldout_wer_candidate')}, "
                      f"anchor WER {gate.get('anchor_wer_serving')} -> {gate.get('anchor_wer_candidate')}; "
                      f"{report.seconds.get('total', 0):.1f} s")
            return 0
        import signal

        from voxloop.core.metrics import start_metrics_server

        # The standalone trainer's own endpoint (in `voxloop serve` its metrics share the server's).
        metrics = start_metrics_server(args.metrics_port, args.metrics_host) if args.metrics_port else None
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: loop.stop())
        loop.run(stop)
        return 0
    finally:
        loop.close()
        close(group)
        if metrics is not None:
            metrics.stop()


def _eval(args: argparse.Namespace) -> int:
    from .data import read_manifest
    from .evaluate import evaluate, lm_transcriber, onnx_transcriber, second_pass_transcriber, torch_transcriber
    from .model import VoxloopForCTC

    if args.decoder == "lm" and args.model is None:
        raise SystemExit("voxloop eval: --decoder lm needs --model (an exported version with decoder files)")
    if args.model is not None:
        onnx_path = args.model / "model.onnx" if args.model.is_dir() else args.model
        second_pass = second_pass_transcriber(onnx_path.parent) if args.decoder == "auto" else None
        if args.decoder == "lm":
            transcribe = lm_transcriber(onnx_path, args.decoder_dir or onnx_path.parent)
        else:
            transcribe = second_pass or onnx_transcriber(onnx_path)
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
