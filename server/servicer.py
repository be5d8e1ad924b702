"""The `voxloop.v1.Recognizer` servicer: protobuf in and out, errors to gRPC statuses; the work is elsewhere.

Status codes a client sees:
- UNAUTHENTICATED: no usable bearer token where the server needs one (auth.py);
- INVALID_ARGUMENT: bad config (encoding, sample rate, channels, language), audio before the config, a
  second config, LINEAR16 with an odd byte count, a stream that ends before its config;
- RESOURCE_EXHAUSTED: past max_concurrent_streams, or a message over max_message_bytes (gRPC's own);
- DEADLINE_EXCEEDED: nothing received for idle_timeout_s (or the client's own deadline);
- OUT_OF_RANGE: the stream passed max_stream_duration_s;
- UNAVAILABLE: the server is shutting down (retry on another replica);
- INTERNAL: a bug; the server logs it with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
from google.protobuf.duration_pb2 import Duration
from voxloop.v1 import recognizer_pb2 as pb
from voxloop.v1 import recognizer_pb2_grpc as pb_grpc

from ..core.decoder import WordTiming
from ..core.model import MODEL_SAMPLE_RATE_HZ
from .auth import ANONYMOUS_USER, Authenticator, Identity, Unauthenticated
from .batcher import ModelUnavailable, ServingModel
from .config import ServerConfig
from .resample import KERNELS
from .status import StatusTable, abort_with
from .stream import (
    EndOfSingleUtterance,
    ModelLeases,
    RecognitionOptions,
    RecognitionResult,
    RecognitionStream,
    StreamEvent,
    StreamTooLong,
    UtteranceSink,
)

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recognizer"].full_name


class TooManyStreams(Exception):
    """max_concurrent_streams recognitions are open (-> RESOURCE_EXHAUSTED)."""


class IdleTimeout(Exception):
    """Nothing arrived for idle_timeout_s (-> DEADLINE_EXCEEDED)."""


class ClientGone(Exception):
    """The call ended on the client's side (cancel, deadline) while the server still worked on it."""


class ShuttingDown(Exception):
    """The server is draining for shutdown (-> UNAVAILABLE)."""


_STATUS_OF: StatusTable = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (TooManyStreams, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (IdleTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (StreamTooLong, grpc.StatusCode.OUT_OF_RANGE),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (ModelUnavailable, grpc.StatusCode.UNAVAILABLE),
)


class StreamSlots:
    """Counts open recognitions (streams and Recognize calls) against max_concurrent_streams."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry (on another replica)")
        if self.active >= self.limit:
            raise TooManyStreams(
                f"the server is at its limit of {self.limit} concurrent streams (max_concurrent_streams); "
                "retry later with backoff, or raise max_concurrent_streams"
            )
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new recognitions and wait up to timeout_s for the open ones; True if all finished."""
        self.draining = True
        if self.active == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def options_from_proto(config: pb.RecognitionConfig, *, interim_results: bool | None = None) -> RecognitionOptions:
    try:
        encoding = pb.RecognitionConfig.AudioEncoding.Name(config.encoding)
    except ValueError:
        encoding = f"encoding number {config.encoding}"
    return RecognitionOptions(
        sample_rate_hz=config.sample_rate_hz,
        encoding=encoding,
        channels=config.audio_channel_count or 1,
        interim_results=config.interim_results if interim_results is None else interim_results,
        single_utterance=config.single_utterance,
        language_code=config.language_code,
        user_id=config.user_id,
        session_id=config.session_id,
        max_alternatives=config.max_alternatives or 1,
    )


async def prepare_resampling(sample_rate_hz: int) -> None:
    """Build the stream's resampling kernel (if not cached) in a worker thread, not on the event loop: the
    largest take tens of milliseconds, which every other stream would wait out."""
    if sample_rate_hz != MODEL_SAMPLE_RATE_HZ:
        await asyncio.to_thread(KERNELS.get, sample_rate_hz, MODEL_SAMPLE_RATE_HZ)


def caller_options(options: RecognitionOptions, caller: Identity) -> RecognitionOptions:
    """The stream's options with the caller's tenant and user: a token's user wins over the config's user_id."""
    user_id = (options.user_id or ANONYMOUS_USER) if caller.anonymous else caller.user
    return dataclasses.replace(options, tenant=caller.tenant, user_id=user_id)


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _word_proto(word: WordTiming) -> pb.WordInfo:
    return pb.WordInfo(word=word.word, start_offset=_duration(word.start_s), end_offset=_duration(word.end_s),
                       confidence=word.confidence)


def _alternatives(result: RecognitionResult) -> list[pb.SpeechRecognitionAlternative]:
    """Interims: the best transcript only (words and confidence come with the final); finals: the n-best."""
    if not result.is_final:
        return [pb.SpeechRecognitionAlternative(transcript=result.hypothesis.transcript)]
    return [pb.SpeechRecognitionAlternative(transcript=h.transcript, confidence=h.confidence,
                                            words=[_word_proto(w) for w in h.words])
            for h in result.alternatives or (result.hypothesis,)]


def streaming_response(event: StreamEvent) -> pb.StreamingRecognizeResponse:
    if isinstance(event, EndOfSingleUtterance):
        return pb.StreamingRecognizeResponse(speech_event_type=pb.StreamingRecognizeResponse.END_OF_SINGLE_UTTERANCE)
    result = pb.StreamingRecognitionResult(
        alternatives=_alternatives(event), is_final=event.is_final, utterance_id=event.utterance_id,
        model_version=event.model_version, audio_processed=event.audio_processed_s,
        utterance_start_offset=_duration(event.start_s), result_end_offset=_duration(event.end_s),
    )
    if not event.is_final:
        result.stability = event.hypothesis.stability
        result.stable_transcript = event.hypothesis.stable_transcript
    return pb.StreamingRecognizeResponse(results=[result])


def recognize_result(event: RecognitionResult) -> pb.SpeechRecognitionResult:
    return pb.SpeechRecognitionResult(
        alternatives=_alternatives(event), utterance_id=event.utterance_id, model_version=event.model_version,
        utterance_start_offset=_duration(event.start_s), result_end_offset=_duration(event.end_s),
    )


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def headline_metrics(card: dict) -> dict[str, float]:
    """card["metrics"]'s numbers, and each evaluation split's as "<split>_<figure>" (e.g. "test_wer")."""
    metrics = {k: float(v) for k, v in (card.get("metrics") or {}).items() if _is_number(v)}
    for split, figures in (card.get("evaluation") or {}).items():
        if isinstance(figures, dict):
            metrics.update({f"{split}_{k}": float(v) for k, v in figures.items() if _is_number(v)})
    return metrics


def model_info(model: ServingModel) -> pb.ModelInfo:
    card = model.card
    metrics = headline_metrics(card)
    info = pb.ModelInfo(version=model.version, parent_version=card.get("parent_version") or "",
                        card_json=json.dumps(card, sort_keys=True), metrics=metrics,
                        sample_rate_hz=model.spec.sample_rate_hz, alphabet=model.spec.alphabet)
    info.loaded_at.FromDatetime(model.loaded_at)
    return info


class RecognizerServicer(pb_grpc.RecognizerServicer):
    """StreamingRecognize, Recognize and GetModelInfo over `RecognitionStream`s (grpc.aio)."""

    def __init__(self, config: ServerConfig, current_model: Callable[[], ServingModel], slots: StreamSlots,
                 on_utterance: UtteranceSink | None = None, authenticator: Authenticator | None = None,
                 leases: ModelLeases | None = None):
        self._config = config
        self._leases = leases  # each utterance holds its model until it ends (hot-swap)
        self._auth = authenticator or Authenticator.from_config(config)
        self._current_model = current_model
        self._slots = slots
        self._on_utterance = on_utterance

    async def StreamingRecognize(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        try:
            caller = self._auth.identify(context)
            with self._slots.hold():
                try:
                    async with asyncio.timeout(self._config.max_stream_duration_s):
                        await self._stream(context, caller)
                except TimeoutError:
                    raise StreamTooLong(
                        f"the stream passed max_stream_duration_s = {self._config.max_stream_duration_s:g} s; "
                        "open a new stream to go on"
                    ) from None
        except ClientGone as e:
            log.debug("stream ended by the client: %s", e)
        except Exception as e:  # asyncio.CancelledError (the client cancelled) is not an Exception
            await abort_with(context, e, _STATUS_OF, "a recognition call")

    async def _read(self, context: grpc.aio.ServicerContext) -> pb.StreamingRecognizeRequest | None:
        """The next request, None at the client's half-close."""
        try:
            async with asyncio.timeout(self._config.idle_timeout_s):
                request = await context.read()
        except TimeoutError:
            raise IdleTimeout(
                f"nothing received for {self._config.idle_timeout_s:g} s (idle_timeout_s); send audio as it is "
                "recorded (silence too) and close the stream when done"
            ) from None
        if request is grpc.aio.EOF:
            remaining_s = context.time_remaining()
            if remaining_s is not None and remaining_s <= 0:
                raise ClientGone("the client's deadline passed")  # grpc ends the reads as if half-closed
            return None
        return request

    async def _write(self, context: grpc.aio.ServicerContext, response: pb.StreamingRecognizeResponse) -> None:
        try:
            # A client that stops reading stalls our writes (flow control): it gets idle_timeout_s too.
            async with asyncio.timeout(self._config.idle_timeout_s):
                await context.write(response)
        except TimeoutError:
            raise IdleTimeout(f"the client read no results for {self._config.idle_timeout_s:g} s "
                              "(idle_timeout_s); read the responses while sending audio") from None
        except Exception as e:  # grpc.aio raises its internal ExecuteBatchError once the call is gone
            raise ClientGone(f"cannot send: {type(e).__name__}") from e

    async def _stream(self, context: grpc.aio.ServicerContext, caller: Identity) -> None:
        request = await self._read(context)
        if request is None:
            raise ValueError("the stream ended before its RecognitionConfig; send a StreamingRecognizeRequest "
                             "with config first, then audio_content")
        if request.WhichOneof("streaming_request") != "config":
            raise ValueError("the first StreamingRecognizeRequest must carry config (RecognitionConfig); "
                             "send audio_content only after it")
        options = caller_options(options_from_proto(request.config), caller)
        await prepare_resampling(options.sample_rate_hz)
        stream = RecognitionStream(options, self._config, self._current_model, on_utterance=self._on_utterance,
                                   leases=self._leases)
        try:
            await self._run_stream(context, stream)
        finally:
            stream.close()

    async def _run_stream(self, context: grpc.aio.ServicerContext, stream: RecognitionStream) -> None:
        while not stream.done:
            request = await self._read(context)
            if request is None:
                events: AsyncIterator[StreamEvent] = stream.finish()
            elif request.WhichOneof("streaming_request") == "audio_content":
                events = stream.feed(request.audio_content)
            elif request.WhichOneof("streaming_request") == "config":
                raise ValueError("a stream takes one RecognitionConfig, in its first message; "
                                 "this one came later (open a new stream to change the config)")
            else:
                raise ValueError("empty StreamingRecognizeRequest: set audio_content")
            async for event in events:
                await self._write(context, streaming_response(event))
            if request is None:
                return

    async def Recognize(self, request: pb.RecognizeRequest, context: grpc.aio.ServicerContext) -> pb.RecognizeResponse:
        try:
            caller = self._auth.identify(context)
            with self._slots.hold():
                options = caller_options(options_from_proto(request.config, interim_results=False), caller)
                await prepare_resampling(options.sample_rate_hz)
                stream = RecognitionStream(options, self._config, self._current_model,
                                           on_utterance=self._on_utterance, leases=self._leases)
                try:
                    finals = [e async for e in stream.feed(request.audio_content)
                              if isinstance(e, RecognitionResult)]
                    finals += [e async for e in stream.finish() if isinstance(e, RecognitionResult)]
                finally:
                    stream.close()
                return pb.RecognizeResponse(results=[recognize_result(e) for e in finals],
                                            total_audio_seconds=stream.received_s)
        except Exception as e:
            await abort_with(context, e, _STATUS_OF, "a recognition call")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            self._auth.identify(context)
        except Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        return model_info(self._current_model())
