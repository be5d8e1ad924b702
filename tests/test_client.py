"""The client library's own behaviour: metadata, error mapping, latency bookkeeping, dependencies.

The recognizer here is a scripted stand-in servicer, so these tests can say exactly what the server
sent and when; the client against the real server is tested in test_client_cli.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import soundfile as sf
from voxloop.clients.client import (
    AsyncRecognizerClient,
    RecognizerClient,
    VoxloopError,
    recognition_config,
)
from voxloop.v1 import feedback_pb2, feedback_pb2_grpc, model_admin_pb2, model_admin_pb2_grpc
from voxloop.v1 import recognizer_pb2 as pb
from voxloop.v1 import recognizer_pb2_grpc as pb_grpc

SCRIPTED_VERSION = "scripted-1"


class ScriptedRecognizer(pb_grpc.RecognizerServicer):
    """An interim after every chunk, one final per stream at its end; refuses the token "bad"."""

    def __init__(self):
        self.metadata: list[dict[str, str]] = []
        self.configs: list[pb.RecognitionConfig] = []
        self.chunk_bytes: list[int] = []

    def _check_token(self, context) -> None:
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        if metadata.get("authorization") == "Bearer bad":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "token rejected")

    def StreamingRecognize(self, request_iterator, context):
        self._check_token(context)
        config = next(request_iterator).config
        self.configs.append(config)
        processed_s = 0.0
        for request in request_iterator:
            self.chunk_bytes.append(len(request.audio_content))
            processed_s += len(request.audio_content) / 2 / config.sample_rate_hz
            yield pb.StreamingRecognizeResponse(results=[pb.StreamingRecognitionResult(
                alternatives=[pb.SpeechRecognitionAlternative(transcript="hel")], utterance_id="u-1",
                model_version=SCRIPTED_VERSION, audio_processed=processed_s)])
        word = pb.WordInfo(word="hello", confidence=0.75)
        word.start_offset.FromMilliseconds(100)
        word.end_offset.FromMilliseconds(400)
        yield pb.StreamingRecognizeResponse(results=[pb.StreamingRecognitionResult(
            alternatives=[pb.SpeechRecognitionAlternative(transcript="hello", confidence=0.75, words=[word])],
            is_final=True, utterance_id="u-1", model_version=SCRIPTED_VERSION, audio_processed=processed_s)])

    def GetModelInfo(self, request, context):
        self._check_token(context)
        return pb.ModelInfo(version=SCRIPTED_VERSION, sample_rate_hz=16000)

    def Recognize(self, request, context):
        self._check_token(context)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sample_rate_hz must be 8000..48000")


@pytest.fixture
def scripted():
    servicer = ScriptedRecognizer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_RecognizerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture
def wav_1s(tmp_path):
    path = tmp_path / "one-second.wav"
    sf.write(path, 0.1 * np.sin(np.linspace(0, 2000, 16000)).astype(np.float32), 16000, subtype="PCM_16")
    return path


def test_token_is_sent_as_bearer_authorization_metadata(scripted):
    servicer, target = scripted
    with RecognizerClient(target, token="s3cret") as client:
        client.get_model_info()
    assert servicer.metadata[-1]["authorization"] == "Bearer s3cret"


def test_no_token_sends_no_authorization_metadata(scripted):
    servicer, target = scripted
    with RecognizerClient(target) as client:
        client.get_model_info()
    assert "authorization" not in servicer.metadata[-1]


def test_failed_call_raises_voxloop_error_with_status_name_and_details(scripted):
    _, target = scripted
    with RecognizerClient(target) as client, pytest.raises(VoxloopError) as caught:
        client.recognize(b"\0\0", recognition_config(16000))
    assert (caught.value.code, caught.value.details) == ("INVALID_ARGUMENT", "sample_rate_hz must be 8000..48000")


def test_rejected_token_on_a_stream_raises_voxloop_error(scripted, wav_1s):
    _, target = scripted
    with RecognizerClient(target, token="bad") as client, pytest.raises(VoxloopError) as caught:
        client.transcribe_file(wav_1s)
    assert caught.value.code == "UNAUTHENTICATED"


def test_unreachable_server_raises_unavailable(unused_port):
    with RecognizerClient(f"127.0.0.1:{unused_port}", timeout=5) as client, pytest.raises(VoxloopError) as caught:
        client.get_model_info()
    assert caught.value.code == "UNAVAILABLE"
    assert "\n" not in str(caught.value)


def test_transcribe_file_sends_config_then_100_ms_chunks_and_collects_the_final(scripted, wav_1s):
    servicer, target = scripted
    with RecognizerClient(target) as client:
        result = client.transcribe_file(wav_1s)

    config = servicer.configs[-1]
    assert (config.encoding, config.sample_rate_hz, config.interim_results) == (pb.RecognitionConfig.LINEAR16,
                                                                                16000, True)
    assert servicer.chunk_bytes == [3200] * 10
    assert result.transcript == "hello"
    assert result.model_version == SCRIPTED_VERSION
    [utterance] = result.utterances
    assert (utterance.utterance_id, utterance.confidence) == ("u-1", 0.75)
    assert (utterance.words[0].word, utterance.words[0].start_s, utterance.words[0].end_s) == ("hello", 0.1, 0.4)
    assert result.first_partial_ms is not None and result.first_partial_ms >= 0
    assert result.final_ms is not None and result.final_ms >= 0
    assert set(result.to_dict()) >= {"file", "utterance_id", "transcript", "model_version", "first_partial_ms",
                                     "final_ms"}


def test_realtime_transcription_takes_as_long_as_the_audio(scripted, wav_1s):
    _, target = scripted
    with RecognizerClient(target) as client:
        start = time.perf_counter()
        client.transcribe_file(wav_1s, realtime=True)
        elapsed = time.perf_counter() - start
    # Ten 100 ms chunks, the first sent at once: the last leaves 0.9 s after the first.
    assert 0.85 <= elapsed < 3.0


def test_async_client_transcribes_like_the_sync_one(scripted, wav_1s):
    _, target = scripted

    async def transcribe():
        async with AsyncRecognizerClient(target) as client:
            info = await client.get_model_info()
            return info, await client.transcribe_file(wav_1s)

    info, result = asyncio.run(transcribe())
    assert info.version == SCRIPTED_VERSION
    assert (result.transcript, result.utterances[0].utterance_id) == ("hello", "u-1")


def test_async_streaming_recognize_takes_an_async_iterable_of_chunks(scripted):
    _, target = scripted

    async def chunks():
        for _ in range(3):
            yield b"\0\0" * 1600

    async def stream():
        async with AsyncRecognizerClient(target) as client:
            return [r async for r in client.streaming_recognize(chunks(), recognition_config(16000))]

    responses = asyncio.run(stream())
    assert [r.results[0].is_final for r in responses] == [False, False, False, True]
    assert responses[-1].results[0].audio_processed == pytest.approx(0.3)


class FlakyReplicas(feedback_pb2_grpc.FeedbackServicer, model_admin_pb2_grpc.ModelAdminServicer):
    """Answers UNAVAILABLE (a replica going away) the first `failures` times of each method, then succeeds."""

    def __init__(self, failures: int):
        self.failures = failures
        self.attempts: dict[str, int] = {}

    def _attempt(self, method: str, context) -> None:
        self.attempts[method] = self.attempts.get(method, 0) + 1
        if self.attempts[method] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry (on another replica)")

    def SubmitCorrection(self, request, context):
        self._attempt("SubmitCorrection", context)
        return feedback_pb2.SubmitCorrectionResponse(feedback_id=7, normalized_text=request.corrected_text)

    def Rollback(self, request, context):
        self._attempt("Rollback", context)
        return model_admin_pb2.ModelChange(serving_version="v1")


@pytest.fixture
def flaky():
    servicer = FlakyReplicas(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    feedback_pb2_grpc.add_FeedbackServicer_to_server(servicer, server)
    model_admin_pb2_grpc.add_ModelAdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_an_idempotent_call_is_retried_on_unavailable_until_it_succeeds(flaky):
    servicer, target = flaky
    with RecognizerClient(target, timeout=10) as client:
        response = client.submit_correction("u-1", "turn on the lights")
    assert (response.feedback_id, servicer.attempts["SubmitCorrection"]) == (7, 3)


def test_the_async_client_retries_too(flaky):
    servicer, target = flaky

    async def correct():
        async with AsyncRecognizerClient(target, timeout=10) as client:
            return await client.submit_correction("u-1", "turn on the lights")

    assert asyncio.run(correct()).feedback_id == 7 and servicer.attempts["SubmitCorrection"] == 3


def test_rollback_is_not_retried_and_retries_can_be_turned_off(flaky):
    servicer, target = flaky
    with RecognizerClient(target, timeout=10) as client, pytest.raises(VoxloopError) as caught:
        client.rollback_model()  # twice would go back two versions
    assert caught.value.code == "UNAVAILABLE" and servicer.attempts["Rollback"] == 1
    with RecognizerClient(target, timeout=10, options=[("grpc.enable_retries", 0)]) as client, \
            pytest.raises(VoxloopError):
        client.submit_correction("u-2", "lights")
    assert servicer.attempts["SubmitCorrection"] == 1


@pytest.mark.parametrize("module", ["voxloop.clients.client", "voxloop.clients.cli"])
def test_client_modules_import_neither_torch_nor_onnxruntime_nor_the_server(module):
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime', 'torchaudio') "
            "or m.startswith('voxloop.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
