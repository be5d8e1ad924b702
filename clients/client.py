"""The voxloop client library: sync (`RecognizerClient`) and asyncio (`AsyncRecognizerClient`).

    with RecognizerClient("127.0.0.1:50051") as client:
        result = client.transcribe_file("hello.wav")
        print(result.transcript, result.model_version)

Imports only grpcio and the `voxloop.v1` stubs (numpy and soundfile when it reads a file), never torch,
onnxruntime, server or trainer code: an application installs the client without them
(tests/test_import_rules.py imports it with those blocked).

The raw calls (`streaming_recognize`, `recognize`, `get_model_info`, and the Feedback service's
`submit_correction`, `accept_transcript`, `reject_transcript`, `choose_alternative`, `feedback_stats`,
`delete_user_data`, and the ModelAdmin
service's `list_models`, `activate_model`, `rollback_model`, `pin_model`, `unpin_model`) return the `voxloop.v1`
messages unchanged; `transcribe_file` returns a typed `FileTranscript` with the latencies a user feels.
Every gRPC failure surfaces as `VoxloopError` with the status code's name and details.

Calls that are safe to repeat are retried by gRPC itself on UNAVAILABLE (a replica shutting down or
killed, a proxy with no backend for a moment): `RETRY_SERVICE_CONFIG`, passed as the channel's service
config. Feedback calls are idempotent per (utterance, user) on the server, so a retried correction is
stored once; Rollback is not retried (twice would go back two versions).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from voxloop.v1 import feedback_pb2 as feedback_pb
from voxloop.v1 import feedback_pb2_grpc as feedback_grpc
from voxloop.v1 import model_admin_pb2 as admin_pb
from voxloop.v1 import model_admin_pb2_grpc as admin_grpc
from voxloop.v1 import recognizer_pb2 as pb
from voxloop.v1 import recognizer_pb2_grpc as pb_grpc

from .audio_files import CHUNK_DURATION_MS, AudioFile, read_audio_file

log = logging.getLogger(__name__)

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0
"""Deadline of unary calls; a streaming call of a file gets this plus the file's duration."""

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
"""gRPC retry policy (https://github.com/grpc/proposal/blob/master/A6-client-retries.md): up to 4 retries,
100 ms doubling to at most 2 s (jittered by gRPC), on UNAVAILABLE only."""
_RETRIED_METHODS = (
    ("voxloop.v1.Recognizer", ("Recognize", "GetModelInfo")),
    ("voxloop.v1.Feedback", ("SubmitCorrection", "AcceptTranscript", "RejectTranscript", "ChooseAlternative",
                             "GetFeedbackStats", "DeleteUserData")),
    ("voxloop.v1.ModelAdmin", ("ListModels", "ActivateModel", "PinModel", "UnpinModel")),
)
RETRY_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": service, "method": method} for service, methods in _RETRIED_METHODS for method in methods],
    "retryPolicy": RETRY_POLICY,
}]})
"""The channel's default service config: which unary calls gRPC retries (not StreamingRecognize, not Rollback)."""


def _channel_options(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The caller's channel arguments, plus the retry service config unless the caller set their own."""
    merged = list(options)
    given = {name for name, _ in merged}
    if "grpc.service_config" not in given:
        merged.append(("grpc.service_config", RETRY_SERVICE_CONFIG))
    if "grpc.enable_retries" not in given:
        merged.append(("grpc.enable_retries", 1))
    return merged


RecognitionConfig = pb.RecognitionConfig
StreamingRecognizeResponse = pb.StreamingRecognizeResponse
RecognizeResponse = pb.RecognizeResponse
ModelInfo = pb.ModelInfo
SubmitCorrectionResponse = feedback_pb.SubmitCorrectionResponse
AcceptTranscriptResponse = feedback_pb.AcceptTranscriptResponse
RejectTranscriptResponse = feedback_pb.RejectTranscriptResponse
ChooseAlternativeResponse = feedback_pb.ChooseAlternativeResponse
FeedbackStats = feedback_pb.FeedbackStats


class VoxloopError(Exception):
    """A failed call: the gRPC status code's name (e.g. "UNAVAILABLE") and the server's details."""

    def __init__(self, code: str, details: str, target: str = ""):
        super().__init__(code, details, target)
        self.code = code
        self.details = details
        self.target = target

    def __str__(self) -> str:
        where = f" from {self.target}" if self.target else ""
        # One line: some transport errors carry newlines, and the CLI prints this as one error line.
        details = " ".join(self.details.split())
        return f"{self.code}{where}: {details}"


def _voxloop_error(error: grpc.RpcError, target: str) -> VoxloopError:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else None
    return VoxloopError(code.name if code is not None else "UNKNOWN", details or str(error), target)


def recognition_config(
    sample_rate_hz: int,
    *,
    interim_results: bool = True,
    language_code: str = "",
    user_id: str = "",
    session_id: str = "",
    single_utterance: bool = False,
    audio_channel_count: int = 1,
    max_alternatives: int = 1,
) -> pb.RecognitionConfig:
    """A LINEAR16 `RecognitionConfig` (the only encoding the API takes)."""
    return pb.RecognitionConfig(
        encoding=pb.RecognitionConfig.LINEAR16, sample_rate_hz=sample_rate_hz, interim_results=interim_results,
        language_code=language_code, user_id=user_id, session_id=session_id, single_utterance=single_utterance,
        audio_channel_count=audio_channel_count, max_alternatives=max_alternatives,
    )


def _seconds(duration) -> float:
    return duration.seconds + duration.nanos / 1e9


@dataclass(frozen=True)
class Word:
    word: str
    start_s: float
    """Offset from the start of the stream's audio."""
    end_s: float
    confidence: float


@dataclass(frozen=True)
class Utterance:
    """One final result: what SubmitCorrection refers to by `utterance_id`."""

    utterance_id: str
    transcript: str
    confidence: float
    words: tuple[Word, ...]
    model_version: str
    """The model version that decoded this utterance."""
    start_s: float
    end_s: float
    alternatives: tuple[str, ...] = ()
    """The n-best transcripts, best first (alternatives[0] is `transcript`); ChooseAlternative indexes them."""

    @classmethod
    def from_result(cls, result: pb.StreamingRecognitionResult | pb.SpeechRecognitionResult) -> Utterance:
        best = result.alternatives[0] if result.alternatives else pb.SpeechRecognitionAlternative()
        words = tuple(Word(w.word, _seconds(w.start_offset), _seconds(w.end_offset), w.confidence) for w in best.words)
        return cls(result.utterance_id, best.transcript, best.confidence, words, result.model_version,
                   _seconds(result.utterance_start_offset), _seconds(result.result_end_offset),
                   tuple(a.transcript for a in result.alternatives))


@dataclass(frozen=True)
class FileTranscript:
    """A file streamed through StreamingRecognize: its final results and the latencies seen."""

    file: str
    utterances: tuple[Utterance, ...]
    model_version: str
    """The version of the last result received (each utterance carries its own)."""
    first_partial_ms: float | None
    """From sending the first audio to the first result with text; None if no result had text."""
    final_ms: float | None
    """From the end of sending (all audio out) to the last final result; 0 if it came before; None without
    finals."""
    audio_duration_s: float

    @property
    def transcript(self) -> str:
        """All final transcripts joined."""
        return " ".join(u.transcript for u in self.utterances if u.transcript)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; `utterance_id` is the first utterance's (what a one-sentence file's correction uses)."""
        return {
            "file": self.file,
            "utterance_id": self.utterances[0].utterance_id if self.utterances else None,
            "transcript": self.transcript,
            "model_version": self.model_version,
            "first_partial_ms": _round_ms(self.first_partial_ms),
            "final_ms": _round_ms(self.final_ms),
            "audio_duration_s": round(self.audio_duration_s, 3),
            "utterances": [
                {"utterance_id": u.utterance_id, "transcript": u.transcript, "confidence": round(u.confidence, 4),
                 "model_version": u.model_version, "start_s": round(u.start_s, 3), "end_s": round(u.end_s, 3),
                 "alternatives": list(u.alternatives),
                 "words": [{"word": w.word, "start_s": round(w.start_s, 3), "end_s": round(w.end_s, 3),
                            "confidence": round(w.confidence, 4)} for w in u.words]}
                for u in self.utterances
            ],
        }


def _round_ms(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 1)


@dataclass
class _StreamRecorder:
    """Clock marks and final results of one streamed file; shared by the sync and asyncio clients."""

    clock: Callable[[], float] = time.perf_counter
    audio_started: float | None = None
    audio_finished: float | None = None
    first_partial: float | None = None
    last_final: float | None = None
    model_version: str = ""
    utterances: list[Utterance] = field(default_factory=list)

    def on_response(self, response: pb.StreamingRecognizeResponse) -> None:
        now = self.clock()
        for result in response.results:
            if result.model_version:
                self.model_version = result.model_version
            if self.first_partial is None and result.alternatives and result.alternatives[0].transcript:
                self.first_partial = now
            if result.is_final:
                self.last_final = now
                self.utterances.append(Utterance.from_result(result))

    def transcript(self, audio: AudioFile) -> FileTranscript:
        first_partial_ms = final_ms = None
        if self.first_partial is not None and self.audio_started is not None:
            first_partial_ms = (self.first_partial - self.audio_started) * 1000
        if self.last_final is not None and self.audio_finished is not None:
            final_ms = max(0.0, self.last_final - self.audio_finished) * 1000
        return FileTranscript(str(audio.path), tuple(self.utterances), self.model_version, first_partial_ms,
                              final_ms, audio.duration_s)


def _chunk_seconds(chunk: bytes, sample_rate_hz: int) -> float:
    return len(chunk) / 2 / sample_rate_hz


def _file_requests(audio: AudioFile, config: pb.RecognitionConfig, recorder: _StreamRecorder,
                   realtime: bool) -> Iterator[pb.StreamingRecognizeRequest]:
    """Config, then the file's 100 ms chunks; with `realtime`, each leaves when its audio would have been heard."""
    yield pb.StreamingRecognizeRequest(config=config)
    sent_s = 0.0
    for chunk in audio.chunks(CHUNK_DURATION_MS):
        if recorder.audio_started is None:
            recorder.audio_started = recorder.clock()
        elif realtime:
            time.sleep(max(0.0, recorder.audio_started + sent_s - recorder.clock()))
        yield pb.StreamingRecognizeRequest(audio_content=chunk)
        sent_s += _chunk_seconds(chunk, audio.sample_rate_hz)
    # Reached when gRPC asks for the request after the last one: all audio is out.
    recorder.audio_finished = recorder.clock()


async def _file_requests_async(audio: AudioFile, config: pb.RecognitionConfig, recorder: _StreamRecorder,
                               realtime: bool) -> AsyncIterator[pb.StreamingRecognizeRequest]:
    yield pb.StreamingRecognizeRequest(config=config)
    sent_s = 0.0
    for chunk in audio.chunks(CHUNK_DURATION_MS):
        if recorder.audio_started is None:
            recorder.audio_started = recorder.clock()
        elif realtime:
            await asyncio.sleep(max(0.0, recorder.audio_started + sent_s - recorder.clock()))
        yield pb.StreamingRecognizeRequest(audio_content=chunk)
        sent_s += _chunk_seconds(chunk, audio.sample_rate_hz)
    recorder.audio_finished = recorder.clock()


def _config_for(audio: AudioFile, interim_results: bool, max_alternatives: int = 1) -> pb.RecognitionConfig:
    return recognition_config(audio.sample_rate_hz, interim_results=interim_results,
                              max_alternatives=max_alternatives)


def _channel_credentials(tls: bool | grpc.ChannelCredentials) -> grpc.ChannelCredentials | None:
    if tls is True:
        return grpc.ssl_channel_credentials()
    if tls is False or tls is None:
        return None
    return tls


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class RecognizerClient:
    """Blocking client of `voxloop.v1.Recognizer` and `voxloop.v1.Feedback`.

    target: "host:port". token: sent as `authorization: Bearer <token>`. tls: True for the system's
    root certificates, or a `grpc.ChannelCredentials`. timeout: deadline of unary calls in seconds (retries
    included). options: gRPC channel arguments, e.g. `[("grpc.keepalive_time_ms", 30000)]`; a
    `grpc.service_config` of your own replaces RETRY_SERVICE_CONFIG, `("grpc.enable_retries", 0)` turns
    retries off.
    """

    def __init__(self, target: str = DEFAULT_SERVER, *, token: str | None = None,
                 tls: bool | grpc.ChannelCredentials = False, timeout: float = DEFAULT_TIMEOUT_S,
                 options: Sequence[tuple[str, Any]] = ()):
        credentials = _channel_credentials(tls)
        self.target = target
        self.timeout = timeout
        self._metadata = _metadata(token)
        options = _channel_options(options)
        self._channel = (grpc.secure_channel(target, credentials, options) if credentials is not None
                         else grpc.insecure_channel(target, options))
        self._stub = pb_grpc.RecognizerStub(self._channel)
        self._feedback = feedback_grpc.FeedbackStub(self._channel)
        self._admin = admin_grpc.ModelAdminStub(self._channel)

    def __enter__(self) -> RecognizerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def streaming_recognize(self, audio_chunks: Iterable[bytes], config: pb.RecognitionConfig, *,
                            timeout: float | None = None) -> Iterator[pb.StreamingRecognizeResponse]:
        """Stream `audio_chunks` (LINEAR16 as `config` says) and yield the responses as they arrive."""
        def requests() -> Iterator[pb.StreamingRecognizeRequest]:
            yield pb.StreamingRecognizeRequest(config=config)
            for chunk in audio_chunks:
                yield pb.StreamingRecognizeRequest(audio_content=chunk)

        return self._stream(requests(), timeout)

    def _stream(self, requests: Iterator[pb.StreamingRecognizeRequest],
                timeout: float | None) -> Iterator[pb.StreamingRecognizeResponse]:
        call = self._stub.StreamingRecognize(requests, timeout=timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise _voxloop_error(e, self.target) from None
        finally:
            call.cancel()  # a no-op once the call has finished; stops it when the caller stops early

    def _call(self, rpc, request):
        """One unary call with the client's timeout and credentials; gRPC errors become VoxloopError."""
        try:
            return rpc(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _voxloop_error(e, self.target) from None

    def recognize(self, audio_bytes: bytes, config: pb.RecognitionConfig) -> pb.RecognizeResponse:
        """Recognize a whole recording in one call."""
        return self._call(self._stub.Recognize, pb.RecognizeRequest(config=config, audio_content=audio_bytes))

    def get_model_info(self) -> pb.ModelInfo:
        """The serving model: version, parent, card, load time."""
        return self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    def submit_correction(self, utterance_id: str, corrected_text: str) -> feedback_pb.SubmitCorrectionResponse:
        """Tell the server what was said in an utterance; returns the reward once the correction is stored.

        Idempotent: a retry returns the same feedback_id; a new text replaces this user's earlier one.
        """
        request = feedback_pb.SubmitCorrectionRequest(utterance_id=utterance_id, corrected_text=corrected_text)
        return self._call(self._feedback.SubmitCorrection, request)

    def accept_transcript(self, utterance_id: str) -> feedback_pb.AcceptTranscriptResponse:
        """Tell the server the transcript of an utterance was right (positive feedback)."""
        request = feedback_pb.AcceptTranscriptRequest(utterance_id=utterance_id)
        return self._call(self._feedback.AcceptTranscript, request)

    def reject_transcript(self, utterance_id: str) -> feedback_pb.RejectTranscriptResponse:
        """Tell the server the transcript of an utterance was wrong, without the right text (negative feedback)."""
        request = feedback_pb.RejectTranscriptRequest(utterance_id=utterance_id)
        return self._call(self._feedback.RejectTranscript, request)

    def choose_alternative(self, utterance_id: str, index: int) -> feedback_pb.ChooseAlternativeResponse:
        """Tell the server which of a final's n-best alternatives (0 = the first) was right."""
        request = feedback_pb.ChooseAlternativeRequest(utterance_id=utterance_id, alternative_index=index)
        return self._call(self._feedback.ChooseAlternative, request)

    def feedback_stats(self, tenant: str = "") -> feedback_pb.FeedbackStats:
        """Feedback counts of the caller's tenant (an operator token: `tenant`'s, or all tenants' when empty)."""
        return self._call(self._feedback.GetFeedbackStats, feedback_pb.GetFeedbackStatsRequest(tenant=tenant))

    def delete_user_data(self, user_id: str, tenant: str = "") -> feedback_pb.DeleteUserDataResponse:
        """Delete a user's utterances and feedback (`tenant` empty: the caller's own). Needs an admin token of
        that tenant or an operator token."""
        request = feedback_pb.DeleteUserDataRequest(user_id=user_id, tenant=tenant)
        return self._call(self._feedback.DeleteUserData, request)

    # --- ModelAdmin (admin tokens only) ---

    def list_models(self) -> admin_pb.ListModelsResponse:
        """Every published version with parent, gate figures and state (serving / available / refused)."""
        return self._call(self._admin.ListModels, admin_pb.ListModelsRequest())

    def activate_model(self, version: str, *, force: bool = False) -> admin_pb.ModelChange:
        """Load, warm up and serve `version`, then point CURRENT at it (force: retry a refused version)."""
        return self._call(self._admin.ActivateModel, admin_pb.ActivateModelRequest(version=version, force=force))

    def rollback_model(self) -> admin_pb.ModelChange:
        """Go back to the version that served before the serving one (which is then refused)."""
        return self._call(self._admin.Rollback, admin_pb.RollbackRequest())

    def pin_model(self, version: str = "") -> admin_pb.ModelChange:
        """Serve `version` (default: the serving one) and stop automatic activation until unpin_model()."""
        return self._call(self._admin.PinModel, admin_pb.PinModelRequest(version=version))

    def unpin_model(self) -> admin_pb.ModelChange:
        """Resume automatic activation (CURRENT is served again)."""
        return self._call(self._admin.UnpinModel, admin_pb.UnpinModelRequest())

    def transcribe_file(self, path: str | Path, *, realtime: bool = False,
                        interim_results: bool = True, max_alternatives: int = 1) -> FileTranscript:
        """Stream a WAV/FLAC file in 100 ms chunks (at real-time pace with `realtime`) and collect the finals.

        `max_alternatives` > 1 asks for n-best finals (each Utterance's `alternatives`).
        Raises ValueError for a file it cannot read, VoxloopError for a failed call.
        """
        audio = read_audio_file(path)
        recorder = _StreamRecorder()
        requests = _file_requests(audio, _config_for(audio, interim_results, max_alternatives), recorder, realtime)
        for response in self._stream(requests, self.timeout + audio.duration_s):
            recorder.on_response(response)
        log.debug("transcribed %s (%.2f s of audio)", audio.path, audio.duration_s)
        return recorder.transcript(audio)


class AsyncRecognizerClient:
    """asyncio client of `voxloop.v1.Recognizer` and `voxloop.v1.Feedback`; arguments as `RecognizerClient`'s."""

    def __init__(self, target: str = DEFAULT_SERVER, *, token: str | None = None,
                 tls: bool | grpc.ChannelCredentials = False, timeout: float = DEFAULT_TIMEOUT_S,
                 options: Sequence[tuple[str, Any]] = ()):
        credentials = _channel_credentials(tls)
        self.target = target
        self.timeout = timeout
        self._metadata = _metadata(token)
        options = _channel_options(options)
        self._channel = (grpc.aio.secure_channel(target, credentials, options) if credentials is not None
                         else grpc.aio.insecure_channel(target, options))
        self._stub = pb_grpc.RecognizerStub(self._channel)
        self._feedback = feedback_grpc.FeedbackStub(self._channel)
        self._admin = admin_grpc.ModelAdminStub(self._channel)

    async def __aenter__(self) -> AsyncRecognizerClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def streaming_recognize(self, audio_chunks: Iterable[bytes] | AsyncIterable[bytes],
                                  config: pb.RecognitionConfig, *,
                                  timeout: float | None = None) -> AsyncIterator[pb.StreamingRecognizeResponse]:
        """Stream `audio_chunks` (sync or async iterable) and yield the responses as they arrive."""
        async def requests() -> AsyncIterator[pb.StreamingRecognizeRequest]:
            yield pb.StreamingRecognizeRequest(config=config)
            if isinstance(audio_chunks, AsyncIterable):
                async for chunk in audio_chunks:
                    yield pb.StreamingRecognizeRequest(audio_content=chunk)
            else:
                for chunk in audio_chunks:
                    yield pb.StreamingRecognizeRequest(audio_content=chunk)

        async for response in self._stream(requests(), timeout):
            yield response

    async def _stream(self, requests: AsyncIterator[pb.StreamingRecognizeRequest],
                      timeout: float | None) -> AsyncIterator[pb.StreamingRecognizeResponse]:
        call = self._stub.StreamingRecognize(requests, timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        except grpc.RpcError as e:
            raise _voxloop_error(e, self.target) from None
        finally:
            call.cancel()  # a no-op once the call has finished; stops it when the caller stops early

    async def _call(self, rpc, request):
        """One unary call with the client's timeout and credentials; gRPC errors become VoxloopError."""
        try:
            return await rpc(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _voxloop_error(e, self.target) from None

    async def recognize(self, audio_bytes: bytes, config: pb.RecognitionConfig) -> pb.RecognizeResponse:
        return await self._call(self._stub.Recognize, pb.RecognizeRequest(config=config, audio_content=audio_bytes))

    async def get_model_info(self) -> pb.ModelInfo:
        return await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    async def submit_correction(self, utterance_id: str,
                                corrected_text: str) -> feedback_pb.SubmitCorrectionResponse:
        request = feedback_pb.SubmitCorrectionRequest(utterance_id=utterance_id, corrected_text=corrected_text)
        return await self._call(self._feedback.SubmitCorrection, request)

    async def accept_transcript(self, utterance_id: str) -> feedback_pb.AcceptTranscriptResponse:
        request = feedback_pb.AcceptTranscriptRequest(utterance_id=utterance_id)
        return await self._call(self._feedback.AcceptTranscript, request)

    async def reject_transcript(self, utterance_id: str) -> feedback_pb.RejectTranscriptResponse:
        request = feedback_pb.RejectTranscriptRequest(utterance_id=utterance_id)
        return await self._call(self._feedback.RejectTranscript, request)

    async def choose_alternative(self, utterance_id: str, index: int) -> feedback_pb.ChooseAlternativeResponse:
        request = feedback_pb.ChooseAlternativeRequest(utterance_id=utterance_id, alternative_index=index)
        return await self._call(self._feedback.ChooseAlternative, request)

    async def feedback_stats(self, tenant: str = "") -> feedback_pb.FeedbackStats:
        return await self._call(self._feedback.GetFeedbackStats, feedback_pb.GetFeedbackStatsRequest(tenant=tenant))

    async def delete_user_data(self, user_id: str, tenant: str = "") -> feedback_pb.DeleteUserDataResponse:
        request = feedback_pb.DeleteUserDataRequest(user_id=user_id, tenant=tenant)
        return await self._call(self._feedback.DeleteUserData, request)

    # --- ModelAdmin (admin tokens only) ---

    async def list_models(self) -> admin_pb.ListModelsResponse:
        return await self._call(self._admin.ListModels, admin_pb.ListModelsRequest())

    async def activate_model(self, version: str, *, force: bool = False) -> admin_pb.ModelChange:
        return await self._call(self._admin.ActivateModel, admin_pb.ActivateModelRequest(version=version, force=force))

    async def rollback_model(self) -> admin_pb.ModelChange:
        return await self._call(self._admin.Rollback, admin_pb.RollbackRequest())

    async def pin_model(self, version: str = "") -> admin_pb.ModelChange:
        return await self._call(self._admin.PinModel, admin_pb.PinModelRequest(version=version))

    async def unpin_model(self) -> admin_pb.ModelChange:
        return await self._call(self._admin.UnpinModel, admin_pb.UnpinModelRequest())

    async def transcribe_file(self, path: str | Path, *, realtime: bool = False,
                              interim_results: bool = True, max_alternatives: int = 1) -> FileTranscript:
        """As `RecognizerClient.transcribe_file`; the file is read in a worker thread."""
        audio = await asyncio.to_thread(read_audio_file, path)
        recorder = _StreamRecorder()
        requests = _file_requests_async(audio, _config_for(audio, interim_results, max_alternatives), recorder,
                                        realtime)
        async for response in self._stream(requests, self.timeout + audio.duration_s):
            recorder.on_response(response)
        return recorder.transcript(audio)
