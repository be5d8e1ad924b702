"""One recognition stream as a state machine, without gRPC.

    stream = RecognitionStream(options, config, current_model)
    async for event in stream.feed(pcm_bytes): ...   # interim and final results as chunks decode
    async for event in stream.finish(): ...          # the client half-closed: flush, last final

Audio is decoded, downmixed and resampled to 16 kHz into a buffer; every time it holds
`chunk_samples + lookback_samples` past the next chunk start (`ModelSpec.next_window`, the windowing
every other caller of a graph uses too), that window goes to the model (through
the shared batcher) with the stream's state, the log-probs to the CTC decoder, and the decoder's
trailing blanks to the endpointer. At an endpoint the utterance is final: it gets a final result,
its audio and transcript go to the utterance sink, and the next utterance begins at the next chunk.

Each utterance is decoded by exactly one model version (invariant 2): the model is chosen when the
utterance begins; with `leases` (the server's ModelHolder) it is acquired then and released when the
utterance ends or the stream closes, so a hot-swapped-out model lives until its last utterance ends.
The model's state carries over from one utterance to the next while the version
stays the same (so a stream decodes exactly as the whole audio would); a new version starts fresh.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import numpy as np

from ..core.decoder import Hypothesis, UtteranceDecoder, WordTiming
from ..core.limits import MAX_ID_CHARS, check_length
from ..core.metrics import AUDIO_SECONDS, FINAL_LATENCY_SECONDS, PARTIAL_LAG_SECONDS
from ..core.model import BLANK_ID, MODEL_SAMPLE_RATE_HZ, State
from ..core.pcm import float_to_int16
from .audio import (
    SampleBuffer,
    StreamingResampler,
    decode_linear16,
    validate_channels,
    validate_sample_rate,
)
from .auth import DEFAULT_TENANT
from .batcher import ServingModel
from .config import ServerConfig
from .endpoint import EndpointRule, EndpointRules
from .segments import PauseSegments

log = logging.getLogger(__name__)

SUPPORTED_ENCODINGS = ("LINEAR16",)
DEFAULT_MODEL_LANGUAGE = "en-US"
_TIME_EPSILON_S = 1e-6


class StreamTooLong(Exception):
    """The stream passed max_stream_duration_s (-> OUT_OF_RANGE)."""


@dataclass(frozen=True)
class RecognitionOptions:
    """What the client asked for in its RecognitionConfig, validated."""

    sample_rate_hz: int
    encoding: str = "LINEAR16"
    channels: int = 1
    interim_results: bool = False
    single_utterance: bool = False
    language_code: str = ""
    user_id: str = ""
    session_id: str = ""
    tenant: str = DEFAULT_TENANT
    """The caller's tenant (from its token; not the client's to choose), stored with each utterance."""
    max_alternatives: int = 1
    """n-best transcripts per final (RecognitionConfig.max_alternatives; 0 there means 1)."""

    def __post_init__(self) -> None:
        if self.max_alternatives < 1:
            raise ValueError(f"max_alternatives must be >= 0 (0 means 1); got {self.max_alternatives}")
        if self.encoding not in SUPPORTED_ENCODINGS:
            raise ValueError(f"encoding must be LINEAR16 (signed 16-bit little-endian PCM); got {self.encoding}")
        validate_sample_rate(self.sample_rate_hz)
        validate_channels(self.channels)
        for name in ("user_id", "session_id", "language_code"):
            check_length(name, getattr(self, name), MAX_ID_CHARS)


def check_language(language_code: str, model: ServingModel) -> None:
    """Empty means the model's language; otherwise the primary subtags must match ("en-GB" ~ "en-US")."""
    served = str(model.card.get("language") or DEFAULT_MODEL_LANGUAGE)
    if language_code and language_code.split("-")[0].lower() != served.split("-")[0].lower():
        raise ValueError(f"language_code {language_code!r} is not served: the model recognizes {served}; "
                         f"leave language_code empty or set it to {served}")


@dataclass(frozen=True)
class RecognitionResult:
    """An interim or final result of one utterance."""

    utterance_id: str
    model_version: str
    hypothesis: Hypothesis
    is_final: bool
    audio_processed_s: float
    """Seconds of the stream's audio consumed so far."""
    start_s: float
    """Where the utterance starts in the stream."""
    end_s: float
    """Where it ends (so far) in the stream."""
    endpoint: EndpointRule | None = None
    """Finals: the rule that ended the utterance; None when the stream ended."""
    alternatives: tuple[Hypothesis, ...] = ()
    """Finals: the n-best, best first (alternatives[0] is `hypothesis`); interims: empty."""


@dataclass(frozen=True)
class EndOfSingleUtterance:
    """single_utterance: the first endpoint was reached; its final follows and the stream ends."""


StreamEvent = RecognitionResult | EndOfSingleUtterance


@dataclass(frozen=True)
class FinishedUtterance:
    """A final utterance as the feedback store keeps it (what a correction refers to)."""

    utterance_id: str
    model_version: str
    """The one model version that decoded it."""
    audio: np.ndarray = field(repr=False)
    """int16 (S,) mono at sample_rate_hz: the audio from the utterance start to its endpoint."""
    sample_rate_hz: int
    transcript: str
    confidence: float
    words: tuple[WordTiming, ...]
    start_s: float
    """Offset of the utterance in its stream."""
    duration_s: float
    user_id: str
    session_id: str
    created_at: datetime
    tenant: str = DEFAULT_TENANT
    """The tenant of the caller that streamed it: only that tenant may give feedback on it."""
    alternatives: tuple[str, ...] | None = None
    """The n-best transcripts shown, when the client asked for more than one (ChooseAlternative indexes them)."""


UtteranceSink = Callable[[FinishedUtterance], Awaitable[None]]


class ModelLeases(Protocol):
    """Where utterances get their model: the current one, held until released (server/model_holder.py)."""

    def acquire(self) -> ServingModel: ...

    def release(self, model: ServingModel) -> None: ...


@dataclass
class _Utterance:
    utterance_id: str
    model: ServingModel
    decoder: UtteranceDecoder
    start_sample: int  # absolute 16 kHz sample in the stream
    segments: PauseSegments | None = None
    """Its segments already sent to the second pass (a two-pass version that cuts at pauses)."""
    last_interim_text: str | None = None


class RecognitionStream:
    """The server side of one StreamingRecognize call (or one Recognize call, fed all at once)."""

    def __init__(
        self,
        options: RecognitionOptions,
        config: ServerConfig,
        current_model: Callable[[], ServingModel],
        *,
        on_utterance: UtteranceSink | None = None,
        leases: ModelLeases | None = None,
    ):
        self.options = options
        self._leases = leases
        self._config = config
        self._rules = EndpointRules.from_config(config)
        self._current_model = current_model
        self._on_utterance = on_utterance
        check_language(options.language_code, current_model())
        if options.max_alternatives > config.max_alternatives:
            raise ValueError(f"max_alternatives must be at most {config.max_alternatives} on this server "
                             f"(max_alternatives in its config); got {options.max_alternatives}")
        self._resampler = StreamingResampler(options.sample_rate_hz, MODEL_SAMPLE_RATE_HZ)
        self._buffer = SampleBuffer()  # 16 kHz audio from the current utterance's start on
        self._next_chunk = 0  # absolute 16 kHz sample where the next model call starts
        self._received_samples = 0  # at the client's rate, after downmixing
        self._utterance: _Utterance | None = None
        self._model: ServingModel | None = None  # the model whose state _state is
        self._state: State | None = None
        self._last_token = BLANK_ID  # best token of the last decoded frame (repeats collapse across utterances)
        self._last_interim_s = 0.0
        # perf_counter when the audio now being decoded arrived (the last feed, or the half-close):
        # where partial lag and final latency are measured from.
        self._arrived_at = time.perf_counter()
        self.finals_sent = 0
        self.done = False
        """No more events: single_utterance reached its endpoint, or the stream finished."""

    @property
    def received_s(self) -> float:
        return self._received_samples / self.options.sample_rate_hz

    @property
    def audio_processed_s(self) -> float:
        return min(self._next_chunk / MODEL_SAMPLE_RATE_HZ, self.received_s)

    async def feed(self, data: bytes) -> AsyncIterator[StreamEvent]:
        """LINEAR16 bytes as the client sent them -> the results of every chunk they complete."""
        samples = decode_linear16(data, self.options.channels)  # (S,) at the client's rate
        if self.done:
            return
        self._arrived_at = time.perf_counter()
        self._received_samples += len(samples)
        if self.received_s > self._config.max_stream_duration_s + _TIME_EPSILON_S:
            raise StreamTooLong(
                f"the stream passed max_stream_duration_s = {self._config.max_stream_duration_s:g} s of audio; "
                "open a new stream to go on"
            )
        self._buffer.append(self._resampler.process(samples))
        async for event in self._decode_chunks():
            yield event

    async def finish(self) -> AsyncIterator[StreamEvent]:
        """The client sent everything: decode the rest and send the last utterance's final."""
        if self.done:
            return
        self._arrived_at = time.perf_counter()
        self._buffer.append(self._resampler.flush())
        async for event in self._decode_chunks():
            yield event
        if self.done or self._received_samples == 0:
            self.done = True
            return
        utterance = self._begin_utterance()
        # Every full window is decoded: what is left is the tail, fed if it holds a frame.
        tail = utterance.model.spec.next_window(self._next_chunk, self._buffer.end, final=True)
        if tail is not None:
            await self._decode(utterance, *tail)
            AUDIO_SECONDS.inc((tail[1] - tail[0]) / MODEL_SAMPLE_RATE_HZ)
        self._next_chunk = self._buffer.end
        async for event in self._end_utterance(None):
            yield event
        self.done = True

    def close(self) -> None:
        """The call is over, however it ended: let go of the open utterance's model. Idempotent."""
        utterance, self._utterance = self._utterance, None
        if utterance is not None:
            if utterance.segments is not None:
                utterance.segments.cancel()
            self._release(utterance)
        self.done = True

    # --- internals ---

    def _release(self, utterance: _Utterance) -> None:
        if self._leases is not None:
            self._leases.release(utterance.model)

    def _begin_utterance(self) -> _Utterance:
        if self._utterance is not None:
            return self._utterance
        model = self._leases.acquire() if self._leases is not None else self._current_model()
        if model is not self._model:  # the first utterance, or a new version: fresh state
            self._model, self._state, self._last_token = model, model.initial_state(), BLANK_ID
        decoder = model.new_decoder(self._last_token)
        segments = model.pause_segments(self._next_chunk / MODEL_SAMPLE_RATE_HZ, self.options.max_alternatives)
        self._utterance = _Utterance(uuid.uuid4().hex, model, decoder, self._next_chunk, segments)
        return self._utterance

    async def _decode(self, utterance: _Utterance, start: int, end: int) -> None:
        audio = self._buffer.view(start, end).copy()  # (S,): the batcher reads it in another thread
        log_probs, self._state = await utterance.model.infer(audio, self._state)  # (T, V)
        utterance.decoder.feed(log_probs, start / MODEL_SAMPLE_RATE_HZ)
        self._last_token = utterance.decoder.last_token

    async def _decode_chunks(self) -> AsyncIterator[StreamEvent]:
        while not self.done:
            utterance = self._begin_utterance()
            spec = utterance.model.spec
            window = spec.next_window(self._next_chunk, self._buffer.end)
            if window is None:
                return
            await self._decode(utterance, *window)
            self._next_chunk += spec.chunk_samples
            AUDIO_SECONDS.inc(spec.chunk_s)
            if utterance.segments is not None:  # the speech before a pause goes to the second pass now
                utterance.segments.update(self._buffer.view(utterance.start_sample,
                                                               min(self._next_chunk, self._buffer.end)))
            decoder = utterance.decoder
            rule = self._rules.detect(
                utterance_s=(self._next_chunk - utterance.start_sample) / MODEL_SAMPLE_RATE_HZ,
                trailing_silence_s=decoder.trailing_blank_frames * spec.frame_shift_s,
                has_speech=decoder.has_output,
            )
            if rule is not None:
                async for event in self._end_utterance(rule):
                    yield event
            elif self.options.interim_results:
                interim = self._interim(utterance)
                if interim is not None:
                    PARTIAL_LAG_SECONDS.observe(time.perf_counter() - self._arrived_at)
                    yield interim

    def _interim(self, utterance: _Utterance) -> RecognitionResult | None:
        """An interim result when the text changed or interim_interval_s of audio passed since the last."""
        hypothesis = utterance.decoder.hypothesis()
        processed_s = self.audio_processed_s
        due = processed_s - self._last_interim_s + _TIME_EPSILON_S >= self._config.interim_interval_s
        if hypothesis.transcript == utterance.last_interim_text and not due:
            return None
        utterance.last_interim_text = hypothesis.transcript
        self._last_interim_s = processed_s
        return RecognitionResult(utterance.utterance_id, utterance.model.version, hypothesis, False, processed_s,
                                 utterance.start_sample / MODEL_SAMPLE_RATE_HZ, processed_s)

    async def _end_utterance(self, rule: EndpointRule | None) -> AsyncIterator[StreamEvent]:
        """Close the current utterance at the next chunk start (all its audio is decoded)."""
        utterance, self._utterance = self._utterance, None
        boundary = self._next_chunk
        start_s = utterance.start_sample / MODEL_SAMPLE_RATE_HZ
        try:
            alternatives = await utterance.model.final_hypotheses(
                utterance.decoder, self._buffer.view(utterance.start_sample, boundary).copy(), start_s,
                self.options.max_alternatives, utterance.segments)
        finally:
            self._release(utterance)
        hypothesis = alternatives[0]
        processed_s = self.audio_processed_s if rule is not None else self.received_s
        # Silence between utterances is not an utterance: no final unless the client must hear of it.
        first_of_stream = rule is None and self.finals_sent == 0
        if hypothesis.transcript or self.options.single_utterance or first_of_stream:
            if self._on_utterance is not None:
                audio = self._buffer.view(utterance.start_sample, boundary)
                await self._on_utterance(FinishedUtterance(
                    utterance_id=utterance.utterance_id, model_version=utterance.model.version,
                    audio=float_to_int16(audio), sample_rate_hz=MODEL_SAMPLE_RATE_HZ,
                    transcript=hypothesis.transcript, confidence=hypothesis.confidence, words=hypothesis.words,
                    start_s=start_s, duration_s=len(audio) / MODEL_SAMPLE_RATE_HZ, user_id=self.options.user_id,
                    session_id=self.options.session_id, created_at=datetime.now(UTC), tenant=self.options.tenant,
                    alternatives=(tuple(a.transcript for a in alternatives) if self.options.max_alternatives > 1
                                  else None),
                ))
            if rule is not None and self.options.single_utterance:
                self.done = True
                yield EndOfSingleUtterance()
            self.finals_sent += 1
            FINAL_LATENCY_SECONDS.observe(time.perf_counter() - self._arrived_at)
            # Privacy: no transcript at INFO (only at DEBUG, which an operator turns on deliberately).
            log.info("final result", extra={"utterance_id": utterance.utterance_id,
                                            "model_version": utterance.model.version,
                                            "audio_s": round(processed_s - start_s, 3),
                                            "endpoint": rule.value if rule is not None else "end_of_audio"})
            log.debug("final transcript %r", hypothesis.transcript, extra={"utterance_id": utterance.utterance_id})
            yield RecognitionResult(utterance.utterance_id, utterance.model.version, hypothesis, True, processed_s,
                                    start_s, processed_s, rule, alternatives)
        self._buffer.drop_before(boundary)
        self._last_interim_s = processed_s
