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

ENV_PREFIX = "VOXLOOP_"
HOME_ENV = "VOXLOOP_HOME"
DEFAULT_DATA_DIR = Path("~/.local/share/voxloop")
REGISTRY_SUBDIR = "registry"
# The base model shipped in the repository (`models/base/`), seeded into an empty registry.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "base"
MIB = 1 << 20
MAX_UTTERANCE_LIMIT_S = 300.0  # an utterance's audio is held in memory until its endpoint


@dataclass(frozen=True)
class ServerConfig:
    """Everything `voxloop serve` can be told; every duration is in seconds unless its name says otherwise."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 or [::] to serve other machines)."""
    port: int = 50051
    """gRPC port; 0 picks a free one (create_server returns it)."""
    metrics_port: int = 9400
    """Prometheus metrics port; 0 turns metrics off."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Where the server keeps its data (registry, feedback store); `$VOXLOOP_HOME` sets it."""
    model_dir: Path | None = None
    """The model registry served from (CURRENT + versions/); None means <data_dir>/registry."""
    shipped_model_dir: Path = SHIPPED_MODEL_DIR
    """A published version (model.onnx + card.json) copied into an empty registry on first start."""
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
    """With interim_results, the longest stretch of audio between two interim results."""
    trailing_silence_before_speech_s: float = 2.4
    """Endpoint when nothing has been recognized in an utterance and this much silence passed."""
    trailing_silence_after_speech_s: float = 1.2
    """Endpoint after speech once this much silence follows it."""
    max_utterance_s: float = 20.0
    """Endpoint any utterance that reaches this length (also bounds the audio kept per utterance)."""
    batch_max_size: int = 32
    """Most streams' chunks run through the model in one onnxruntime call."""
    batch_max_wait_ms: float = 5.0
    """How long a batch waits for chunks of other open streams before running short."""
    onnx_intra_op_threads: int = 1
    """onnxruntime threads per model call (0: onnxruntime's default, one per core)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        object.__setattr__(self, "shipped_model_dir", Path(self.shipped_model_dir).expanduser())
        if self.model_dir is not None:
            object.__setattr__(self, "model_dir", Path(self.model_dir).expanduser())
        if not self.host:
            _invalid("host", "must not be empty (127.0.0.1 for this machine only, 0.0.0.0 for all interfaces)")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                _invalid(name, f"must be 0..65535 (0 {'picks a free port' if name == 'port' else 'turns it off'})")
        positive = ("max_stream_duration_s", "idle_timeout_s", "interim_interval_s", "max_utterance_s",
                    "trailing_silence_before_speech_s", "trailing_silence_after_speech_s")
        for name in positive:
            if not getattr(self, name) > 0:
                _invalid(name, "must be > 0 seconds")
        if self.max_utterance_s > MAX_UTTERANCE_LIMIT_S:
            _invalid("max_utterance_s", f"must be at most {MAX_UTTERANCE_LIMIT_S:g} s (each open utterance's "
                                        "audio is kept in memory for the feedback store)")
        for name in ("max_concurrent_streams", "batch_max_size"):
            if getattr(self, name) < 1:
                _invalid(name, "must be >= 1")
        if not 4096 <= self.max_message_bytes <= 64 * MIB:
            _invalid("max_message_bytes", f"must be 4096..{64 * MIB} bytes (default {MIB}: 32 s of 16 kHz audio)")
        for name in ("shutdown_grace_s", "batch_max_wait_ms", "onnx_intra_op_threads"):
            if getattr(self, name) < 0:
                _invalid(name, "must be >= 0")

    # Derived values, computed in one place.
    @property
    def registry_dir(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.data_dir / REGISTRY_SUBDIR

    @property
    def batch_max_wait_s(self) -> float:
        return self.batch_max_wait_ms / 1000


def _invalid(name: str, requirement: str) -> typing.NoReturn:
    raise ValueError(f"{name} {requirement}; set it with `{name} = ...` in the config file, "
                     f"{env_name(name)} or --{name.replace('_', '-')}")


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
            values[name] = _convert(name, value, f"--{name.replace('_', '-')}")
    return ServerConfig(**values)


__all__ = ["ServerConfig", "env_name", "load_config"]
