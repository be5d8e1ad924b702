"""The server's configuration: one frozen dataclass, read from defaults < TOML file < environment < flags.

    config = load_config(Path("voxloop.toml"), os.environ, {"port": 0})

The TOML file holds top-level keys named like the fields (`port = 50051`); the environment variable
of a field is `VOXLOOP_<FIELD>` (`VOXLOOP_PORT`), except `data_dir`, which is `$VOXLOOP_HOME`; flags
are mapped to fields by the CLI (`voxloop serve --port`). Values are validated in `__post_init__`
with errors that say how to fix them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..core.data_dir import DEFAULT_DATA_DIR, HOME_ENV, REGISTRY_SUBDIR, STORE_FILE
from ..core.limits import MAX_BEAM_SIZE
from ..core.logging_setup import LOG_FORMATS, LOG_LEVELS
from ..core.rewards import REJECTION_REWARD

ENV_PREFIX = "VOXLOOP_"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
# What an empty registry is seeded with: Whisper tiny.en (two-pass), built on first start from its
# import recipe, since its weights are not in git (`voxloop models import`).
SHIPPED_MODEL_DIR = MODELS_DIR / "whisper-tiny.en"
# The small streaming CTC model trained here (a published version in git): the high-concurrency choice.
BASE_MODEL_DIR = MODELS_DIR / "base"
MIB = 1 << 20
MAX_UTTERANCE_LIMIT_S = 300.0  # an utterance's audio is held in memory until its endpoint
DAY_S = 86_400.0
FLAG_FIELDS = frozenset({"host", "port", "metrics_port", "web_port", "data_dir", "model_dir", "workers"})
"""The fields `voxloop serve` has a flag for (`--metrics-port`...; clients/cli.py SERVE_FLAGS maps them, and a
test keeps the two equal): an error names a flag only where one exists."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything `voxloop serve` can be told; every duration is in seconds unless its name says otherwise."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 or [::] to serve other machines)."""
    port: int = 50051
    """gRPC port; 0 picks a free one (create_server returns it)."""
    metrics_port: int = 9400
    """Prometheus metrics port; 0 turns metrics off (with workers > 1, worker i serves on metrics_port + i)."""
    workers: int = 1
    """Server processes sharing the gRPC port (SO_REUSEPORT, Linux); the in-process trainer runs in the first."""
    web_port: int = 0
    """Port of the end-user web page and its WebSocket bridge (http://host:web_port/, https with TLS); 0: off.
    With workers > 1, worker 0 serves it."""
    web_origins: str = ""
    """Comma-separated origins (scheme://host[:port]) that may also open the page's WebSocket, e.g. a proxy's
    https://asr.example.com; without it only the page's own origin may, and only when its host is localhost or an
    IP address (a DNS name must be listed here: DNS rebinding)."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Where the server keeps its data (registry, feedback store); `$VOXLOOP_HOME` sets it."""
    model_dir: Path | None = None
    """The model registry served from (CURRENT + versions/); None means <data_dir>/registry."""
    shipped_model_dir: Path = SHIPPED_MODEL_DIR
    """Seeded into an empty registry on first start: a published version (model.onnx + card.json, e.g.
    models/base, the small CTC model) or an import recipe (import.json: `voxloop serve` builds it first)."""
    max_concurrent_streams: int = 256
    """Open StreamingRecognize calls past this get RESOURCE_EXHAUSTED."""
    max_stream_duration_s: float = 3600.0
    """A stream longer than this (audio or wall clock) ends with OUT_OF_RANGE; no hidden 5-minute cap."""
    max_message_bytes: int = MIB
    """Largest request message; bigger ones get RESOURCE_EXHAUSTED (1 MiB is 32 s of 16 kHz LINEAR16)."""
    idle_timeout_s: float = 30.0
    """A stream that sends nothing for this long ends with DEADLINE_EXCEEDED, freeing its slot."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, how long open streams may run on before they are cancelled."""
    interim_interval_s: float = 0.2
    """With interim_results, the longest stretch of audio between two interim results. A model whose chunk is
    longer gives one per chunk (the Whisper default: 0.4 s, its recipe's chunk_s; the server logs it at start)."""
    trailing_silence_before_speech_s: float = 2.4
    """Endpoint when nothing has been recognized in an utterance and this much silence passed."""
    trailing_silence_after_speech_s: float = 1.2
    """Endpoint after speech once this much silence follows it."""
    max_utterance_s: float = 20.0
    """Endpoint any utterance that reaches this length (also bounds the audio kept per utterance)."""
    max_alternatives: int = 10
    """Most n-best alternatives a final may carry; a RecognitionConfig asking for more is INVALID_ARGUMENT."""
    batch_max_size: int = 64
    """Most streams' chunks run through the model in one onnxruntime call."""
    batch_max_wait_ms: float = 5.0
    """How long a batch waits for chunks of other open streams before running short."""
    onnx_intra_op_threads: int = 2
    """onnxruntime threads per model call (0: onnxruntime's default, one per core)."""
    second_pass_threads: int = 2
    """A two-pass (Whisper) version's finals decoded at once (one thread each): streams that end together
    (an endpoint is a pause, and pauses coincide) wait for one another less."""
    second_pass_max_batch: int = 16
    """Most backed-up finals a second-pass thread decodes in one lockstep call. Finals back up when more
    are queued than there are threads (streams that end in the same moment); a backlog's one-best finals
    are then decoded greedily together instead of each alone by the version's own search: faster to
    drain, but a backlog's final can differ from its utterance's offline decode (greedy, and the int8 decoder
    scales its activations per call). 1: every final alone, by the version's own search, however many
    wait (server/finals.py; docs/benchmarks.md, "Finals in batches")."""
    second_pass_beam_size: int = 0
    """Beams of a two-pass version's finals. 0 (the default): the version's own (its card's
    `second_pass.beam_size`: 5, Whisper's beam search, for the shipped recipe since whisper-tiny.en-v4).
    1: greedy, about half the CPU per final, at a higher WER (21 real recordings 4.1% -> 6.6%, held-out espeak-ng
    voice 39.8% -> 46.6%; docs/benchmarks.md). Warm-up still checks the version's probe with its own search;
    `voxloop eval` and the trainer's gate decode with the card's."""
    store_path: str | None = None
    """The feedback store: a SQLite file path or a SQLAlchemy URL; None means <data_dir>/feedback.sqlite3."""
    store_utterances: bool = True
    """Write every final utterance (audio + hypothesis) to the store; off, feedback on new ids is NOT_FOUND."""
    utterance_queue_size: int = 1024
    """Finals waiting for the store writer; past this, records are dropped (counted), results still sent."""
    utterance_batch_size: int = 64
    """Most queued utterances the writer inserts in one transaction."""
    store_flush_wait_s: float = 2.0
    """How long feedback on an utterance still in the writer's queue waits for it to be written."""
    audio_retention_s: float = 30 * DAY_S
    """Audio older than this is deleted (its utterance then takes no more feedback)."""
    max_correction_chars: int = 1000
    """Longest corrected_text accepted, before and after normalization (numbers spelled out)."""
    flag_similarity_threshold: float = 0.2
    """Corrections whose character similarity to the hypothesis is below this (0..1) are flagged."""
    rejection_reward: float = REJECTION_REWARD
    """Reward of a rejected transcript (RejectTranscript: wrong, no text given); -1 is as bad as every word wrong."""
    feedback_rate_per_s: float = 1.0
    """Per-user feedback rate (token bucket refill); past it, RESOURCE_EXHAUSTED."""
    feedback_burst: int = 30
    """Feedback calls a user may make at once before the rate applies (the bucket's size)."""
    tokens_file: Path | None = None
    """Bearer tokens (JSON or TOML: `[[tokens]]` with token, tenant, user, role); set, every call needs one."""
    anonymous: bool = True
    """Without a token, callers act as tenant "default" (local development); off whenever tokens_file is set."""
    tls_cert_file: Path | None = None
    """PEM certificate chain to serve TLS with (with tls_key_file); TLS needs tokens_file (no anonymous mode)."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    retention_interval_s: float = 3600.0
    """How often the server deletes audio older than audio_retention_s."""
    model_watch_interval_s: float = 1.0
    """How often the server reads the registry (CURRENT, pin, refusals) for a version to hot-swap to."""
    log_format: str = "text"
    """Log lines as "text" or "json" (one object per line, with request_id, utterance_id, model_version)."""
    log_level: str = "info"
    """debug, info, warning or error; transcripts are logged only at debug (never audio)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        object.__setattr__(self, "shipped_model_dir", Path(self.shipped_model_dir).expanduser())
        for name in ("model_dir", "tokens_file", "tls_cert_file", "tls_key_file"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)).expanduser())
        if self.store_path is not None:  # a str field: a URL's "//" must survive (Path would fold it)
            path = str(self.store_path)
            object.__setattr__(self, "store_path", path if "://" in path else str(Path(path).expanduser()))
        if not self.host:
            _invalid("host", "must not be empty (127.0.0.1 for this machine only, 0.0.0.0 for all interfaces)")
        for name in ("port", "metrics_port", "web_port"):
            if not 0 <= getattr(self, name) <= 65535:
                _invalid(name, f"must be 0..65535 (0 {'picks a free port' if name == 'port' else 'turns it off'})")
        for origin in self.allowed_web_origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or origin != f"{parts.scheme}://{parts.netloc}":
                _invalid("web_origins", f"has {origin!r}, which is not an origin: list scheme://host[:port] entries "
                                        "separated by commas (e.g. https://asr.example.com), without paths")
        positive = ("max_stream_duration_s", "idle_timeout_s", "interim_interval_s", "max_utterance_s",
                    "trailing_silence_before_speech_s", "trailing_silence_after_speech_s", "audio_retention_s",
                    "feedback_rate_per_s", "retention_interval_s", "model_watch_interval_s")
        for name in positive:
            if not getattr(self, name) > 0:
                _invalid(name, "must be > 0 seconds")
        if not -10.0 <= self.rejection_reward < 0.0:
            _invalid("rejection_reward", "must be negative and >= -10 (-1: as many edits as the reference is long)")
        if self.max_alternatives < 1:
            _invalid("max_alternatives", "must be >= 1 (1 sends only the best transcript)")
        if self.max_utterance_s > MAX_UTTERANCE_LIMIT_S:
            _invalid("max_utterance_s", f"must be at most {MAX_UTTERANCE_LIMIT_S:g} s (each open utterance's "
                                        "audio is kept in memory for the feedback store)")
        for name in ("max_concurrent_streams", "batch_max_size", "utterance_queue_size", "utterance_batch_size",
                     "max_correction_chars", "feedback_burst", "workers"):
            if getattr(self, name) < 1:
                _invalid(name, "must be >= 1")
        if not 4096 <= self.max_message_bytes <= 64 * MIB:
            _invalid("max_message_bytes", f"must be 4096..{64 * MIB} bytes (default {MIB}: 32 s of 16 kHz audio)")
        for name in ("second_pass_threads", "second_pass_max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0 <= self.second_pass_beam_size <= MAX_BEAM_SIZE:
            _invalid("second_pass_beam_size", f"must be 0..{MAX_BEAM_SIZE} (0: the version's own; 1: greedy)")
        for name in ("shutdown_grace_s", "batch_max_wait_ms", "onnx_intra_op_threads", "store_flush_wait_s"):
            if getattr(self, name) < 0:
                _invalid(name, "must be >= 0")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            _invalid("tls_cert_file" if self.tls_cert_file is None else "tls_key_file",
                     "must be set too: TLS needs both a certificate (tls_cert_file) and its key (tls_key_file)")
        if self.tls and self.tokens_file is None:
            _invalid("tokens_file", "must be set when TLS is on (tls_cert_file): anonymous mode is for local "
                                    "development only; list the callers' bearer tokens in a tokens file")
        if self.log_format not in LOG_FORMATS:
            _invalid("log_format", f"must be one of {', '.join(LOG_FORMATS)} (json for log shippers)")
        if self.log_level not in LOG_LEVELS:
            _invalid("log_level", f"must be one of {', '.join(LOG_LEVELS)} (lowercase)")
        if not 0.0 <= self.flag_similarity_threshold <= 1.0:
            _invalid("flag_similarity_threshold", "must be a similarity in 0..1 (0 flags nothing; 0.2 flags "
                                                  "near-total rewrites)")

    # Derived values, computed in one place.
    @property
    def registry_dir(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.data_dir / REGISTRY_SUBDIR

    @property
    def store_url(self) -> Path | str:
        """The feedback store to open (FeedbackStore.open takes a path or a URL)."""
        return self.store_path if self.store_path is not None else self.data_dir / STORE_FILE

    @property
    def allowed_web_origins(self) -> frozenset[str]:
        """web_origins as a set, lowercased (browsers send origins lowercase) and without trailing slashes."""
        return frozenset(o.strip().lower().rstrip("/") for o in self.web_origins.split(",") if o.strip())

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def anonymous_allowed(self) -> bool:
        """Calls without a token are served (as tenant "default") only in anonymous mode, without tokens or TLS."""
        return self.anonymous and self.tokens_file is None and not self.tls

    @property
    def batch_max_wait_s(self) -> float:
        return self.batch_max_wait_ms / 1000


def flag_name(field_name: str) -> str | None:
    """The `voxloop serve` flag of a config field, None for the fields without one."""
    return "--" + field_name.replace("_", "-") if field_name in FLAG_FIELDS else None


def _invalid(name: str, requirement: str) -> typing.NoReturn:
    flag = flag_name(name)
    where = f"{env_name(name)} or {flag}" if flag else env_name(name)
    raise ValueError(f"{name} {requirement}; set it with `{name} = ...` in the config file or {where}")


def env_name(field_name: str) -> str:
    """The environment variable of a config field (data_dir is $VOXLOOP_HOME)."""
    return HOME_ENV if field_name == "data_dir" else ENV_PREFIX + field_name.upper()


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ServerConfig)


def _convert(name: str, value: Any, source: str) -> Any:
    """Coerce a TOML, environment or flag value to the field's type, with an error naming the source."""
    target = _field_types()[name]
    optional = type(None) in typing.get_args(target)
    if optional:
        target = next(t for t in typing.get_args(target) if t is not type(None))
        if value is None or value == "":
            return None
    try:
        if target is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(value)
                return lowered in ("1", "true", "yes", "on")
            return bool(value)
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if target is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if target is Path:
            return Path(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} from {source}: {value!r} is not a valid {target.__name__}") from None


def _known(name: str, source: str) -> None:
    if name not in _field_types():
        known = ", ".join(f.name for f in dataclasses.fields(ServerConfig))
        raise ValueError(f"unknown setting {name!r} in {source}; known settings: {known}")


def load_config(
    toml_path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Defaults < TOML file < environment (`VOXLOOP_*`) < overrides (flags; None values are ignored).

    Raises ValueError naming the setting and how to fix it, OSError if the file cannot be read.
    """
    values: dict[str, Any] = {}
    if toml_path is not None:
        path = Path(toml_path)
        try:
            document = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path} is not valid TOML: {e}") from None
        for name, value in document.items():
            _known(name, f"config file {path}")
            values[name] = _convert(name, value, f"config file {path}")
    env = os.environ if env is None else env
    for f in dataclasses.fields(ServerConfig):
        variable = env_name(f.name)
        if variable in env:
            values[f.name] = _convert(f.name, env[variable], f"${variable}")
    for name, value in (overrides or {}).items():
        _known(name, "overrides")
        if value is not None:
            values[name] = _convert(name, value, flag_name(name) or "overrides")
    return ServerConfig(**values)


__all__ = ["FLAG_FIELDS", "ServerConfig", "env_name", "flag_name", "load_config"]
