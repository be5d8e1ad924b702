"""The model contract (docs/model-format.md): an exported CTC graph, its metadata, and how a stream feeds it.

The graph takes raw 16 kHz audio (B, S) plus streaming state and returns per-frame CTC log-probs
(B, T, V) plus the next state. Every input other than `audio` is state, with a `next_<name>` output:
the server never looks inside it, it only stacks streams' rows into a batch and splits them again.

One place for what exporter, server and trainer must agree on:
- the formats and the `voxloop.*` metadata keys (`metadata_props` writes them, `ModelSpec` reads them);
- how a stream windows its audio (`ModelSpec.next_window`, `ModelSpec.windows`): the server's streams, the
  warm-up probe, the export parity check and evaluation all feed a graph the same windows;
- how a graph is opened (`onnx_session`) and run (`OnnxModel.run`: the feeds of audio and state).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

STREAMING_CTC_FORMAT = "streaming-ctc/1"
"""A causal, chunked CTC graph whose state is its caches (voxloop's streaming Conformer)."""
WINDOWED_CTC_FORMAT = "windowed-ctc/1"
"""A CTC graph over a sliding window whose state is the audio history (Hugging Face CTC checkpoints, and the
first pass of a two-pass version)."""
WHISPER_TWO_PASS_FORMAT = "whisper-two-pass/1"
"""A card format, not a graph's: a windowed-ctc/1 first pass (model.onnx) plus Whisper's encoder and decoder
for the finals (whisper_decoder.py)."""
SUPPORTED_FORMATS = (STREAMING_CTC_FORMAT, WINDOWED_CTC_FORMAT)
METADATA_PREFIX = "voxloop."
"""Every key of a graph's metadata_props is voxloop.<name> (voxloop.format, voxloop.vocabulary, ...)."""
MODEL_SAMPLE_RATE_HZ = 16000
"""The only rate a model may take; client audio is resampled to it."""
AUDIO_INPUT = "audio"
LOG_PROBS_OUTPUT = "log_probs"
NEXT_STATE_PREFIX = "next_"
BLANK_ID = 0
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
               "tensor(double)": np.float64}

State = dict[str, np.ndarray]
"""One stream's (or one batch's) state: graph input name -> array with the batch on axis 0."""


class ModelFormatError(ValueError):
    """The ONNX file does not follow the model contract (docs/model-format.md)."""


def metadata_props(values: Mapping[str, object]) -> dict[str, str]:
    """A graph's metadata_props from {name: value}: keys under METADATA_PREFIX, lists as JSON, the rest as text
    (what ModelSpec.from_metadata reads back)."""
    return {METADATA_PREFIX + name: json.dumps(value) if isinstance(value, list | tuple) else str(value)
            for name, value in values.items()}


def onnx_session(path: Path | str, *, intra_op_threads: int = 1) -> ort.InferenceSession:
    """How voxloop opens every graph: CPU, `intra_op_threads` threads (0: onnxruntime's default, one per core),
    operators one after another, idle threads sleeping instead of spinning (the cores are shared with the
    event loop and the other streams). Raises ModelFormatError when onnxruntime cannot load the file."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelFormatError(f"{path}: onnxruntime cannot load it: {e}") from e


@dataclass(frozen=True)
class ModelSpec:
    """What the server needs to know about a graph, read from its `metadata_props`."""

    format: str
    version: str
    vocabulary: tuple[str, ...]
    """Printed form of each token; index 0 is the CTC blank, " " separates words."""
    sample_rate_hz: int
    hop_samples: int
    window_samples: int
    subsampling: int
    chunk_frames: int
    chunk_samples: int
    """New samples per streaming call."""
    lookback_samples: int
    """Samples before each chunk that are fed again with it."""

    @property
    def samples_per_frame(self) -> int:
        return self.hop_samples * self.subsampling

    @property
    def frame_shift_s(self) -> float:
        return self.samples_per_frame / self.sample_rate_hz

    @property
    def window_samples_per_call(self) -> int:
        """Samples fed per streaming call: the chunk plus the lookback overlap."""
        return self.chunk_samples + self.lookback_samples

    @property
    def chunk_s(self) -> float:
        return self.chunk_samples / self.sample_rate_hz

    @property
    def alphabet(self) -> str:
        """Every character the model can print (no blank, no empty tokens), in vocabulary order."""
        return "".join(dict.fromkeys("".join(self.vocabulary[BLANK_ID + 1 :])))

    def frames_for(self, num_samples: int) -> int:
        """Encoder frames a call with `num_samples` samples yields (snip-edges framing, then stacking)."""
        if num_samples < self.window_samples:
            return 0
        return ((num_samples - self.window_samples) // self.hop_samples + 1) // self.subsampling

    def next_window(self, start: int, end: int, *, final: bool = False) -> tuple[int, int] | None:
        """The samples [start, stop) a stream feeds the graph next, when it holds audio up to `end`.

        `start` is where the next chunk begins: the window is the chunk plus the lookback after it
        (window_samples_per_call samples), once `end` reaches that far. With `final` (the audio is
        over), a shorter tail [start, end) is fed too if it yields a frame. None: nothing to feed yet.
        The next window starts chunk_samples later.
        """
        if start + self.window_samples_per_call <= end:
            return start, start + self.window_samples_per_call
        if final and self.frames_for(end - start) > 0:
            return start, end
        return None

    def windows(self, num_samples: int) -> Iterator[tuple[int, int]]:
        """Every window a stream feeds for `num_samples` samples of audio, tail included (next_window in turn)."""
        start = 0
        while (window := self.next_window(start, num_samples, final=True)) is not None:
            yield window
            if window[1] - window[0] < self.window_samples_per_call:
                return  # the tail
            start += self.chunk_samples

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> ModelSpec:
        def get(key: str, default: str | None = None) -> str:
            value = metadata.get(METADATA_PREFIX + key, default)
            if value is None:
                raise ModelFormatError(f"{source}: metadata_props lacks {METADATA_PREFIX}{key}; re-export the model")
            return value

        def positive_int(key: str, default: str | None = None, minimum: int = 1) -> int:
            raw = get(key, default)
            try:
                value = int(raw)
            except ValueError:
                raise ModelFormatError(f"{source}: voxloop.{key} = {raw!r} is not an integer") from None
            if value < minimum:
                raise ModelFormatError(f"{source}: voxloop.{key} = {value} must be >= {minimum}")
            return value

        model_format = get("format")
        if model_format not in SUPPORTED_FORMATS:
            raise ModelFormatError(
                f"{source}: model format {model_format!r} is not supported; this server serves "
                f"{', '.join(SUPPORTED_FORMATS)} (upgrade the server or re-export the model)"
            )
        sample_rate_hz = positive_int("sample_rate_hz")
        if sample_rate_hz != MODEL_SAMPLE_RATE_HZ:
            raise ModelFormatError(
                f"{source}: the model takes {sample_rate_hz} Hz audio; the server feeds models "
                f"{MODEL_SAMPLE_RATE_HZ} Hz, so re-export it for {MODEL_SAMPLE_RATE_HZ} Hz"
            )
        try:
            vocabulary = json.loads(get("vocabulary"))
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{source}: voxloop.vocabulary is not JSON: {e}") from None
        if not (isinstance(vocabulary, list) and len(vocabulary) >= 2 and all(isinstance(t, str) for t in vocabulary)):
            raise ModelFormatError(f"{source}: voxloop.vocabulary must be a JSON list of >= 2 strings (blank first)")
        hop_samples = positive_int("hop_samples")
        spec = cls(
            format=model_format,
            version=get("version"),
            vocabulary=tuple(vocabulary),
            sample_rate_hz=sample_rate_hz,
            hop_samples=hop_samples,
            # windowed-ctc/1 graphs frame by hop without overlap: a window of one hop.
            window_samples=positive_int("window_samples", str(hop_samples)),
            subsampling=positive_int("subsampling"),
            chunk_frames=positive_int("chunk_frames"),
            chunk_samples=positive_int("chunk_samples"),
            lookback_samples=positive_int("lookback_samples", minimum=0),
        )
        if spec.chunk_samples != spec.chunk_frames * spec.samples_per_frame:
            raise ModelFormatError(
                f"{source}: chunk_samples ({spec.chunk_samples}) must equal chunk_frames * hop_samples * "
                f"subsampling ({spec.chunk_frames * spec.samples_per_frame}); the metadata is inconsistent"
            )
        if spec.frames_for(spec.window_samples_per_call) != spec.chunk_frames:
            raise ModelFormatError(
                f"{source}: a call of chunk_samples + lookback_samples = {spec.window_samples_per_call} samples "
                f"yields {spec.frames_for(spec.window_samples_per_call)} frames, not chunk_frames = "
                f"{spec.chunk_frames}; the metadata is inconsistent"
            )
        return spec


@dataclass(frozen=True)
class StateInput:
    name: str
    shape: tuple[int, ...]
    """Shape of one stream's state without the batch axis."""
    dtype: type


class OnnxModel:
    """An onnxruntime session of a `streaming-ctc/1` or `windowed-ctc/1` graph.

    `run` is thread-safe (onnxruntime sessions are) and releases the GIL; the batcher calls it from
    its own executor thread.
    """

    def __init__(self, path: Path | str, *, intra_op_threads: int = 1):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no model at {self.path}")
        self._session = onnx_session(self.path, intra_op_threads=intra_op_threads)
        self.spec = ModelSpec.from_metadata(dict(self._session.get_modelmeta().custom_metadata_map), str(self.path))
        self.loaded_at = datetime.now(UTC)
        self.state_inputs = self._read_state_inputs()
        vocabulary_size = next(o for o in self._session.get_outputs() if o.name == LOG_PROBS_OUTPUT).shape[-1]
        if isinstance(vocabulary_size, int) and vocabulary_size != len(self.spec.vocabulary):
            raise ModelFormatError(f"{self.path}: log_probs has {vocabulary_size} tokens but voxloop.vocabulary "
                                   f"lists {len(self.spec.vocabulary)}; re-export the model")
        self._output_names = [LOG_PROBS_OUTPUT, *(NEXT_STATE_PREFIX + s.name for s in self.state_inputs)]
        log.info("loaded %s (%s, version %s, %d state inputs, %d threads)", self.path, self.spec.format,
                 self.spec.version, len(self.state_inputs), intra_op_threads)

    def _read_state_inputs(self) -> tuple[StateInput, ...]:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        audio = inputs.get(AUDIO_INPUT)
        if audio is None or audio.type != "tensor(float)" or len(audio.shape) != 2:
            raise ModelFormatError(f"{self.path}: the graph needs a float32 input {AUDIO_INPUT!r} of shape (B, S)")
        if LOG_PROBS_OUTPUT not in outputs:
            raise ModelFormatError(f"{self.path}: the graph needs an output {LOG_PROBS_OUTPUT!r} (B, T, V)")
        states = []
        for name, node in inputs.items():
            if name == AUDIO_INPUT:
                continue
            if NEXT_STATE_PREFIX + name not in outputs:
                raise ModelFormatError(f"{self.path}: state input {name!r} has no output {NEXT_STATE_PREFIX + name!r}")
            if node.type not in _ORT_DTYPES:
                raise ModelFormatError(f"{self.path}: state input {name!r} has unsupported type {node.type}")
            shape = tuple(node.shape[1:])
            if not node.shape or not all(isinstance(d, int) for d in shape):
                raise ModelFormatError(
                    f"{self.path}: state input {name!r} has shape {node.shape}; only the batch axis may be dynamic"
                )
            states.append(StateInput(name, shape, _ORT_DTYPES[node.type]))
        return tuple(states)

    @property
    def version(self) -> str:
        return self.spec.version

    def initial_state(self, batch_size: int = 1) -> State:
        """A fresh stream's state: zeros (cache_len 0) with `batch_size` rows."""
        return {s.name: np.zeros((batch_size, *s.shape), dtype=s.dtype) for s in self.state_inputs}

    def run(self, audio: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """audio (B, S) float32 at 16 kHz, state with B rows -> log_probs (B, T, V), next state (B rows)."""
        feeds = {AUDIO_INPUT: np.ascontiguousarray(audio, dtype=np.float32), **state}
        log_probs, *next_states = self._session.run(self._output_names, feeds)
        return log_probs, {s.name: value for s, value in zip(self.state_inputs, next_states, strict=True)}
