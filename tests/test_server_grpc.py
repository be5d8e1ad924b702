"""The server over gRPC on 127.0.0.1 (port 0): protocol, bad input, limits, health, reflection, shutdown.

Every bad-input test ends by checking that the server still serves a normal stream and that the bad
stream's slot was freed. The model is the conftest's tiny random-weight policy (gibberish text, real
ids, versions, timings); single_utterance uses the voice-activity model from server_support.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from conftest import TINY_VERSION
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from server_support import chunked, noise, pcm16, silence, voiced
from support import wait_for
from voxloop.core.registry import RegistryError
from voxloop.server.app import BackgroundServer, create_server
from voxloop.server.config import ServerConfig
from voxloop.server.servicer import headline_metrics
from voxloop.v1 import recognizer_pb2 as pb
from voxloop.v1 import recognizer_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # real servers

LIMITS = dict(max_concurrent_streams=3, idle_timeout_s=1.5, max_message_bytes=64 * 1024, max_stream_duration_s=8.0,
              shutdown_grace_s=5.0)
CHUNK_100MS = 3200
Code = grpc.StatusCode


def linear16(sample_rate_hz: int = 16000, **fields) -> pb.RecognitionConfig:
    return pb.RecognitionConfig(encoding=pb.RecognitionConfig.LINEAR16, sample_rate_hz=sample_rate_hz, **fields)


def requests(config: pb.RecognitionConfig | None, *audio: bytes, gate: threading.Event | None = None,
             gate_after: int = 0):
    """Config then audio messages; with `gate`, waits for it before message number `gate_after`."""
    if config is not None:
        yield pb.StreamingRecognizeRequest(config=config)
    for i, message in enumerate(audio):
        if gate is not None and i == gate_after:
            gate.wait()
        yield pb.StreamingRecognizeRequest(audio_content=message)


def stream_status(stub, request_iterator, timeout=10.0) -> tuple[list, Code, str]:
    """Run a stream to its end: (responses, status code, details)."""
    responses = []
    call = stub.StreamingRecognize(request_iterator, timeout=timeout)
    with contextlib.suppress(grpc.RpcError):
        responses.extend(call)
    return responses, call.code(), call.details() or ""


@pytest.fixture(scope="module")
def running(tiny_registry_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-server")
    shutil.copytree(tiny_registry_template, root / "registry")
    finished = []
    config = ServerConfig(port=0, data_dir=root / "data", model_dir=root / "registry", **LIMITS)
    with BackgroundServer(config, utterance_sink=finished.append) as server:
        server.finished = finished
        yield server


@pytest.fixture
def stub(running):
    with grpc.insecure_channel(running.target) as channel:
        yield pb_grpc.RecognizerStub(channel)
    # every test's streams give their slot back
    wait_for(lambda: running.server.active_streams == 0, 5.0, "every stream's slot to be given back")


def assert_still_serving(stub):
    responses, code, _ = stream_status(stub, requests(linear16(), *chunked(pcm16(noise(0.5)), CHUNK_100MS)))
    assert code == Code.OK
    assert responses[-1].results[0].is_final and responses[-1].results[0].model_version == TINY_VERSION


# --- protocol -------------------------------------------------------------------------------------

def test_interim_results_precede_the_final_and_report_progress_every_200_ms(stub, running):
    audio = chunked(pcm16(noise(2.0, seed=3)), CHUNK_100MS)
    responses, code, _ = stream_status(stub, requests(linear16(interim_results=True, user_id="ann"), *audio))
    results = [r.results[0] for r in responses]

    assert code == Code.OK
    assert [r.is_final for r in results] == [False] * (len(results) - 1) + [True]
    processed = [r.audio_processed for r in results]
    assert processed == sorted(processed) and max(np.diff([0.0, *processed])) <= 0.2 + 1e-6
    assert processed[-1] == pytest.approx(2.0)
    assert {r.utterance_id for r in results} == {results[-1].utterance_id} and results[-1].utterance_id
    assert {r.model_version for r in results} == {TINY_VERSION}
    final = results[-1].alternatives[0]
    assert 0.0 <= final.confidence <= 1.0
    assert all(0 <= w.start_offset.ToNanoseconds() < w.end_offset.ToNanoseconds() <= 2e9 for w in final.words)
    assert " ".join(w.word for w in final.words) == final.transcript
    # The sink got the utterance before the client got its final.
    stored = next(u for u in running.finished if u.utterance_id == results[-1].utterance_id)
    assert (stored.model_version, stored.transcript, stored.user_id) == (TINY_VERSION, final.transcript, "ann")
    assert len(stored.audio) == 32000


def test_every_stream_gets_new_utterance_ids(stub):
    ids = set()
    for _ in range(3):
        responses, _, _ = stream_status(stub, requests(linear16(), *chunked(pcm16(noise(0.3)), CHUNK_100MS)))
        ids.add(responses[-1].results[0].utterance_id)
    assert len(ids) == 3


def test_recognize_returns_the_same_transcript_as_streaming(stub):
    audio = pcm16(noise(1.5, seed=5))
    streamed, _, _ = stream_status(stub, requests(linear16(), *chunked(audio, CHUNK_100MS)))
    response = stub.Recognize(pb.RecognizeRequest(config=linear16(), audio_content=audio), timeout=10)
    [result] = response.results
    assert result.alternatives[0].transcript == streamed[-1].results[0].alternatives[0].transcript
    assert result.model_version == TINY_VERSION and result.utterance_id
    assert response.total_audio_seconds == pytest.approx(1.5)


def test_model_info_names_the_serving_version_and_its_card(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.version == TINY_VERSION and info.sample_rate_hz == 16000
    assert info.alphabet == " 'abcdefghijklmnopqrstuvwxyz"
    assert '"description": "tiny random-weight test model"' in info.card_json
    assert info.loaded_at.seconds > 0


def test_model_info_metrics_are_the_cards_headline_figures():
    card = {"metrics": {"wer": 0.2, "note": "text is skipped", "ok": True},
            "evaluation": {"test": {"wer": 0.18, "cer": 0.07, "per_voice": {"en": {"wer": 0.1}}}}}
    assert headline_metrics(card) == {"wer": 0.2, "test_wer": 0.18, "test_cer": 0.07}


# --- bad input ------------------------------------------------------------------------------------

def test_audio_before_config_is_invalid_argument(stub):
    _, code, details = stream_status(stub, requests(None, b"\0\0" * 100))
    assert code == Code.INVALID_ARGUMENT and "first StreamingRecognizeRequest must carry config" in details
    assert_still_serving(stub)


def test_second_config_is_invalid_argument(stub):
    def twice():
        yield pb.StreamingRecognizeRequest(config=linear16())
        yield pb.StreamingRecognizeRequest(audio_content=b"\0\0" * 100)
        yield pb.StreamingRecognizeRequest(config=linear16())

    _, code, details = stream_status(stub, twice())
    assert code == Code.INVALID_ARGUMENT and "one RecognitionConfig" in details
    assert_still_serving(stub)


def test_odd_byte_count_is_invalid_argument(stub):
    _, code, details = stream_status(stub, requests(linear16(), b"\0\0" * 100, b"\0\0\0"))
    assert code == Code.INVALID_ARGUMENT and "even number of bytes" in details
    assert_still_serving(stub)


@pytest.mark.parametrize(("config", "expected"), [
    (pb.RecognitionConfig(sample_rate_hz=16000), "encoding must be LINEAR16"),
    (linear16(96000), "sample_rate_hz must be 8000..48000"),
    (linear16(0), "sample_rate_hz must be 8000..48000"),
    (linear16(audio_channel_count=12), "audio_channel_count must be 1..8"),
    (linear16(language_code="fr-FR"), "the model recognizes en-US"),
])
def test_unsupported_config_is_invalid_argument_naming_what_is_allowed(stub, config, expected):
    _, code, details = stream_status(stub, requests(config, b"\0\0" * 100))
    assert code == Code.INVALID_ARGUMENT and expected in details
    with pytest.raises(grpc.RpcError) as caught:
        stub.Recognize(pb.RecognizeRequest(config=config, audio_content=b"\0\0" * 100), timeout=5)
    assert caught.value.code() == Code.INVALID_ARGUMENT and expected in caught.value.details()
    assert_still_serving(stub)


def test_stream_without_config_is_invalid_argument(stub):
    _, code, details = stream_status(stub, iter(()))
    assert code == Code.INVALID_ARGUMENT and "ended before its RecognitionConfig" in details
    assert_still_serving(stub)


def test_config_without_audio_ends_ok_with_no_results(stub):
    responses, code, _ = stream_status(stub, requests(linear16(interim_results=True)))
    assert (responses, code) == ([], Code.OK)


def test_oversize_message_is_resource_exhausted(stub):
    _, code, _ = stream_status(stub, requests(linear16(), b"\0\0" * (32 * 1024 + 1)))
    assert code == Code.RESOURCE_EXHAUSTED
    assert_still_serving(stub)


def test_client_cancel_mid_stream_frees_the_slot(stub, running):
    gate = threading.Event()
    audio = chunked(pcm16(noise(1.0)), CHUNK_100MS)
    call = stub.StreamingRecognize(requests(linear16(interim_results=True), *audio, gate=gate, gate_after=5),
                                   timeout=10)
    assert not next(call).results[0].is_final  # the stream is running
    call.cancel()
    gate.set()
    wait_for(lambda: running.server.active_streams == 0, 5.0, "every stream's slot to be given back")
    assert_still_serving(stub)


def test_client_deadline_exceeded_frees_the_slot(stub, running):
    gate = threading.Event()  # never set: the client stalls until its deadline
    audio = chunked(pcm16(noise(0.5)), CHUNK_100MS)
    _, code, _ = stream_status(stub, requests(linear16(), *audio, gate=gate, gate_after=2), timeout=0.5)
    gate.set()
    assert code == Code.DEADLINE_EXCEEDED
    wait_for(lambda: running.server.active_streams == 0, 5.0, "every stream's slot to be given back")
    assert_still_serving(stub)


def test_idle_stream_is_ended_with_deadline_exceeded(stub):
    gate = threading.Event()
    audio = chunked(pcm16(noise(0.5)), CHUNK_100MS)
    started = time.monotonic()
    _, code, details = stream_status(stub, requests(linear16(), *audio, gate=gate, gate_after=2), timeout=10)
    gate.set()
    assert code == Code.DEADLINE_EXCEEDED and "idle_timeout_s" in details
    assert 1.4 < time.monotonic() - started < 5
    assert_still_serving(stub)


def test_stream_longer_than_the_maximum_is_out_of_range(stub):
    audio = chunked(pcm16(silence(9.0)), 60_000)  # 9 s in 1.9 s messages, past the 8 s maximum
    responses, code, details = stream_status(stub, requests(linear16(), *audio), timeout=20)
    assert code == Code.OUT_OF_RANGE and "max_stream_duration_s = 8 s" in details
    assert_still_serving(stub)


def test_streams_past_the_limit_are_resource_exhausted_with_the_limit(stub, running):
    gate = threading.Event()
    audio = chunked(pcm16(noise(0.3)), CHUNK_100MS)
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(stream_status, stub, requests(linear16(), *audio, gate=gate, gate_after=1))
                for _ in range(3)]
        wait_for(lambda: running.server.active_streams == 3, 5.0, "three open streams")
        _, code, details = stream_status(stub, requests(linear16(), *audio))
        gate.set()
        assert code == Code.RESOURCE_EXHAUSTED and "limit of 3 concurrent streams" in details
        assert [f.result()[1] for f in held] == [Code.OK] * 3
    assert_still_serving(stub)


# --- single utterance (a model that hears pauses) ---------------------------------------------------

def test_single_utterance_sends_end_of_single_utterance_then_the_final_and_closes(voice_registry, tmp_path):
    config = ServerConfig(port=0, data_dir=tmp_path, model_dir=voice_registry)
    audio = np.concatenate([voiced(0.8), silence(1.6), voiced(0.8), silence(0.4)])
    with BackgroundServer(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecognizerStub(channel)
        responses, code, _ = stream_status(
            stub, requests(linear16(single_utterance=True, interim_results=True), *chunked(pcm16(audio), CHUNK_100MS)))
    assert code == Code.OK
    assert responses[-2].speech_event_type == pb.StreamingRecognizeResponse.END_OF_SINGLE_UTTERANCE
    final = responses[-1].results[0]
    assert final.is_final and final.alternatives[0].transcript == "a" and final.audio_processed < 2.5


# --- lifecycle ------------------------------------------------------------------------------------

@pytest.fixture
def own_server(tiny_registry, tmp_path):
    config = ServerConfig(port=0, data_dir=tmp_path / "data", model_dir=tiny_registry, **LIMITS)
    server = BackgroundServer(config)
    yield server
    server.stop()


def test_health_reports_serving_then_not_serving_when_shutdown_begins(own_server):
    with grpc.insecure_channel(own_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "voxloop.v1.Recognizer"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="voxloop.v1.Recognizer"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping = threading.Thread(target=own_server.stop)
        stopping.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopping.join()


def refuses_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


def test_graceful_shutdown_stops_listening_and_lets_an_open_stream_finish(own_server):
    gate = threading.Event()
    audio = chunked(pcm16(noise(1.0)), CHUNK_100MS)
    with grpc.insecure_channel(own_server.target) as channel, ThreadPoolExecutor(2) as pool:
        stub = pb_grpc.RecognizerStub(channel)
        open_stream = pool.submit(stream_status, stub, requests(linear16(), *audio, gate=gate, gate_after=5))
        wait_for(lambda: own_server.server.active_streams == 1, 5.0, "the stream to open")
        assert not refuses_connections(own_server.port)
        stopping = pool.submit(own_server.stop, 5.0)
        # What a TCP-checking proxy sees: the port refuses connections while the open stream runs on.
        wait_for(lambda: refuses_connections(own_server.port), 5.0, "the port to refuse connections")
        assert own_server.server.slots.draining and own_server.server.active_streams == 1
        _, code, _ = stream_status(stub, requests(linear16(), *audio))
        assert code == Code.UNAVAILABLE  # a new stream reaches nothing (the client retries elsewhere)
        gate.set()  # the open stream sends the rest of its audio and half-closes
        responses, code, _ = open_stream.result(timeout=10)
        stopping.result(timeout=10)
    assert code == Code.OK
    assert responses[-1].results[0].is_final and responses[-1].results[0].audio_processed == pytest.approx(1.0)


def test_reflection_lists_the_recognizer_and_health(own_server):
    with grpc.insecure_channel(own_server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"voxloop.v1.Recognizer", "grpc.health.v1.Health"} <= set(services)


def test_an_empty_registry_is_seeded_with_the_shipped_model(tiny_registry_template, tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_registry_template / "versions" / TINY_VERSION, shipped)
    config = ServerConfig(port=0, data_dir=tmp_path / "home", shipped_model_dir=shipped)
    with BackgroundServer(config) as server, grpc.insecure_channel(server.target) as channel:
        assert pb_grpc.RecognizerStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5).version == TINY_VERSION
    assert (tmp_path / "home" / "registry" / "CURRENT").read_text().strip() == TINY_VERSION


def test_no_model_to_serve_is_an_error_saying_what_to_do(tmp_path):
    config = ServerConfig(port=0, data_dir=tmp_path, shipped_model_dir=tmp_path / "nothing")
    with pytest.raises(RegistryError, match="no model to serve.*--model-dir"):
        BackgroundServer(config)


def test_a_port_in_use_is_an_error_naming_the_fix(own_server, tmp_path, tiny_registry):
    config = ServerConfig(port=own_server.port, data_dir=tmp_path, model_dir=tiny_registry)
    with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
        BackgroundServer(config)


def test_create_server_returns_the_bound_port(tiny_registry, tmp_path):
    import asyncio

    async def bind():
        server, port = create_server(ServerConfig(port=0, data_dir=tmp_path, model_dir=tiny_registry))
        try:
            await server.start()
            return port
        finally:
            await server.stop(0)

    assert asyncio.run(bind()) > 0
