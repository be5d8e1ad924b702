"""Prometheus metrics and structured logs, read from a real server: every server metric moves when it should.

The metrics live in prometheus_client's default registry (one per process), which other tests' servers
also move: each test reads a sample before and after what it does and asserts on the difference.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import threading
import time
import urllib.request

import grpc
import pytest
from conftest import TINY_VERSION
from prometheus_client import REGISTRY
from server_support import chunked, noise, pcm16
from support import wait_for
from voxloop.clients.client import RecognizerClient, recognition_config
from voxloop.core.logging_setup import JsonFormatter, RequestIdFilter, TextFormatter, configure_logging
from voxloop.core.metrics import start_metrics_server
from voxloop.core.store import UtteranceRecord
from voxloop.server.app import BackgroundServer
from voxloop.server.config import ServerConfig
from voxloop.server.stream import FinishedUtterance
from voxloop.server.utterance_writer import UtteranceWriter
from voxloop.v1 import recognizer_pb2 as pb
from voxloop.v1 import recognizer_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # real servers

CHUNK_100MS = 3200  # bytes of 16 kHz LINEAR16
STREAMING = "/voxloop.v1.Recognizer/StreamingRecognize"
RECOGNIZE = "/voxloop.v1.Recognizer/Recognize"
SUBMIT_CORRECTION = "/voxloop.v1.Feedback/SubmitCorrection"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rpcs(method: str, code: str) -> float:
    return sample("voxloop_rpcs_total", method=method, code=code)


@pytest.fixture(scope="module")
def running(tiny_registry_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-server")
    shutil.copytree(tiny_registry_template, root / "registry")
    config = ServerConfig(port=0, metrics_port=0, data_dir=root / "data", model_dir=root / "registry",
                          shutdown_grace_s=5.0)
    with BackgroundServer(config) as server:
        yield server


@pytest.fixture
def client(running):
    with RecognizerClient(running.target, timeout=30) as client:
        yield client


def stream_final(client: RecognizerClient, seconds: float, *, interim_results: bool) -> pb.StreamingRecognitionResult:
    config = recognition_config(16000, interim_results=interim_results)
    results = [r for response in client.streaming_recognize(chunked(pcm16(noise(seconds)), CHUNK_100MS), config,
                                                            timeout=30) for r in response.results]
    finals = [r for r in results if r.is_final]
    assert len(finals) == 1
    return finals[0]


def test_metrics_endpoint_serves_every_voxloop_metric_and_frees_its_port_on_stop():
    with start_metrics_server(0) as metrics:
        assert metrics.port > 0
        body = urllib.request.urlopen(metrics.url, timeout=5).read().decode()
        for name in ("voxloop_rpcs_total", "voxloop_active_streams", "voxloop_partial_lag_seconds_bucket",
                     "voxloop_trainer_cycles_total", "voxloop_model_info"):
            assert f"\n{name}" in body or body.startswith(name) or f"# TYPE {name}" in body, name
        with pytest.raises(OSError, match="--metrics-port"):
            start_metrics_server(metrics.port)
    with pytest.raises(OSError):
        urllib.request.urlopen(metrics.url, timeout=2)
    with socket.create_server(("127.0.0.1", metrics.port)):  # the port is free again
        pass


def test_a_stream_moves_rpc_audio_inference_and_latency_metrics(client):
    before = {
        "ok": rpcs(STREAMING, "OK"),
        "audio": sample("voxloop_audio_processed_seconds_total"),
        "calls": sample("voxloop_inference_seconds_count"),
        "batches": sample("voxloop_inference_batch_size_count"),
        "partials": sample("voxloop_partial_lag_seconds_count"),
        "finals": sample("voxloop_final_latency_seconds_count"),
        "final_latency_sum": sample("voxloop_final_latency_seconds_sum"),
    }
    final = stream_final(client, 2.0, interim_results=True)
    assert final.model_version == TINY_VERSION
    assert rpcs(STREAMING, "OK") == before["ok"] + 1
    # All 2.0 s went through the model: whole chunks, then the tail at the half-close.
    assert sample("voxloop_audio_processed_seconds_total") - before["audio"] == pytest.approx(2.0, abs=0.01)
    calls = sample("voxloop_inference_seconds_count") - before["calls"]
    assert calls >= 2
    assert sample("voxloop_inference_batch_size_count") - before["batches"] == calls
    assert sample("voxloop_partial_lag_seconds_count") > before["partials"]
    assert sample("voxloop_final_latency_seconds_count") == before["finals"] + 1
    assert 0 < sample("voxloop_final_latency_seconds_sum") - before["final_latency_sum"] < 5
    assert 0 < sample("voxloop_real_time_factor") < 10


def test_rpcs_are_counted_by_method_and_status_code(running, client):
    bad_config = recognition_config(1234)  # below 8000 Hz: INVALID_ARGUMENT
    before_bad, before_recognize = rpcs(STREAMING, "INVALID_ARGUMENT"), rpcs(RECOGNIZE, "OK")
    with pytest.raises(Exception, match="INVALID_ARGUMENT|sample_rate"):
        list(client.streaming_recognize([pcm16(noise(0.1))], bad_config, timeout=10))
    client.recognize(pcm16(noise(0.5)), recognition_config(16000))
    assert wait_for(lambda: rpcs(STREAMING, "INVALID_ARGUMENT") == before_bad + 1)
    assert rpcs(RECOGNIZE, "OK") == before_recognize + 1

    # An unknown method is UNIMPLEMENTED by grpc itself and creates no label value.
    with grpc.insecure_channel(running.target) as channel:
        unknown = channel.unary_unary("/voxloop.v1.Recognizer/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as raised:
            unknown(b"", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert REGISTRY.get_sample_value("voxloop_rpcs_total", {"method": "/voxloop.v1.Recognizer/NoSuchMethod",
                                                            "code": "UNIMPLEMENTED"}) is None


def test_active_streams_counts_open_recognitions(client):
    release = threading.Event()
    before = sample("voxloop_active_streams")

    def audio():
        yield pcm16(noise(0.2))
        release.wait(10)

    def run():
        list(client.streaming_recognize(audio(), recognition_config(16000), timeout=30))

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert wait_for(lambda: sample("voxloop_active_streams") == before + 1)
    finally:
        release.set()
        worker.join(30)
    assert wait_for(lambda: sample("voxloop_active_streams") == before)


def test_corrections_and_acceptances_are_counted_by_kind(client):
    corrections = sample("voxloop_feedback_received_total", kind="correction")
    acceptances = sample("voxloop_feedback_received_total", kind="acceptance")
    rpc_before = rpcs(SUBMIT_CORRECTION, "OK")
    first = stream_final(client, 1.0, interim_results=False)
    second = stream_final(client, 1.0, interim_results=False)
    client.submit_correction(first.utterance_id, "what was really said")
    client.accept_transcript(second.utterance_id)
    assert sample("voxloop_feedback_received_total", kind="correction") == corrections + 1
    assert sample("voxloop_feedback_received_total", kind="acceptance") == acceptances + 1
    assert rpcs(SUBMIT_CORRECTION, "OK") == rpc_before + 1


def _utterance(utterance_id: str) -> FinishedUtterance:
    from datetime import UTC, datetime

    import numpy as np
    return FinishedUtterance(utterance_id=utterance_id, model_version="v", audio=np.zeros(160, np.int16),
                             sample_rate_hz=16000, transcript="a", confidence=1.0, words=(), start_s=0.0,
                             duration_s=0.01, user_id="", session_id="", created_at=datetime.now(UTC))


def test_store_writes_dropped_for_a_full_queue_or_a_failed_insert_are_counted():
    gate = threading.Event()

    def slow_insert(records: list[UtteranceRecord]) -> None:
        gate.wait(10)
        if any(r.id.startswith("bad") for r in records):
            raise RuntimeError("insert failed")

    before = sample("voxloop_store_writes_dropped_total")
    writer = UtteranceWriter(slow_insert, max_queued=1, batch_size=1)
    try:
        assert writer.offer(_utterance("first"))  # the writer thread takes it and blocks in the insert
        assert wait_for(lambda: writer.queued == 0)
        assert writer.offer(_utterance("bad-second"))  # queued
        assert not writer.offer(_utterance("third"))  # queue full: dropped
        assert sample("voxloop_store_writes_dropped_total") == before + 1
    finally:
        gate.set()
        writer.close()
    assert sample("voxloop_store_writes_dropped_total") == before + 2  # plus the failed insert
    assert writer.dropped == 2


@pytest.fixture
def json_log():
    """Records of every logger at INFO and above, as the JSON lines `log_format = "json"` writes."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_json_logs_carry_request_utterance_and_model_ids_but_no_transcript(running, json_log):
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.RecognizerStub(channel)
        requests = [pb.StreamingRecognizeRequest(config=recognition_config(16000))]
        requests += [pb.StreamingRecognizeRequest(audio_content=c) for c in chunked(pcm16(noise(1.0)), CHUNK_100MS)]
        responses = list(stub.StreamingRecognize(iter(requests), timeout=30,
                                                 metadata=(("x-request-id", "req-0042"),)))
        final = next(r for response in responses for r in response.results if r.is_final)
        with pytest.raises(grpc.RpcError):  # a failed call is logged at INFO with its code
            list(stub.StreamingRecognize(iter([pb.StreamingRecognizeRequest(config=recognition_config(1234))]),
                                         timeout=10, metadata=(("x-request-id", "req-0043"),)))
    transcript = final.alternatives[0].transcript
    assert transcript  # the tiny model always says something: the privacy check below is not vacuous
    assert wait_for(lambda: any(e.get("request_id") == "req-0043" for e in json_log()))
    entries = json_log()
    finals = [e for e in entries if e.get("utterance_id") == final.utterance_id]
    assert len(finals) == 1
    assert finals[0]["request_id"] == "req-0042"
    assert finals[0]["model_version"] == TINY_VERSION
    assert finals[0]["level"] == "INFO" and finals[0]["time"].endswith("+00:00")
    failed = next(e for e in entries if e.get("request_id") == "req-0043" and e.get("code"))
    assert failed["code"] == "INVALID_ARGUMENT" and failed["method"] == STREAMING
    assert not any(transcript in json.dumps(e) for e in entries)


def test_text_logs_append_structured_fields_and_configure_logging_checks_its_arguments():
    record = logging.LogRecord("voxloop.server.stream", logging.INFO, __file__, 1, "final result", (), None)
    record.utterance_id, record.model_version = "u1", "v1"
    line = TextFormatter().format(record)
    assert line.endswith("INFO voxloop.server.stream: final result utterance_id=u1 model_version=v1")
    with pytest.raises(ValueError, match="log_format"):
        configure_logging("info", "xml")
    with pytest.raises(ValueError, match="log_format"):
        ServerConfig(log_format="xml")
    with pytest.raises(ValueError, match="log_level"):
        ServerConfig(log_level="loud")


def test_a_training_cycle_moves_the_trainer_metrics(tmp_path, tiny_version_dir, toy_corpus):
    import torch
    from trainer_support import add_feedback, tone
    from voxloop.core.registry import Registry
    from voxloop.core.store import FeedbackStore
    from voxloop.trainer.config import PPOConfig, TrainerConfig
    from voxloop.trainer.cycle import run_cycle

    torch.set_num_threads(1)
    registry = Registry(tmp_path / "registry")
    registry.seed_from(tiny_version_dir)
    corpus = toy_corpus
    ppo = PPOConfig(epochs=2, minibatch_size=8, learning_rate=3e-3, replay_per_minibatch=2, samples_per_utterance=4)
    config = TrainerConfig(data_dir=tmp_path / "data", corpus_dir=corpus, heldout_share=0.0,
                           min_heldout_utterances=0, anchor_size=3,
                           replay_pool_size=6, max_anchor_regression=1.0, ppo=ppo)
    before = {outcome: sample("voxloop_trainer_cycles_total", outcome=outcome)
              for outcome in ("published", "gated", "failed")}
    cycles_timed = sample("voxloop_trainer_cycle_seconds_count")
    consumed = sample("voxloop_trainer_feedback_consumed_total")
    started = time.time()
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        for i, word in enumerate("abcabc"):
            add_feedback(store, tone(word, seed=10 + i), text=word)
        report = run_cycle(store, registry, config)
    assert report.outcome in ("published", "gated")
    assert sample("voxloop_trainer_cycles_total", outcome=report.outcome) == before[report.outcome] + 1
    assert sample("voxloop_trainer_cycle_seconds_count") == cycles_timed + 1
    assert sample("voxloop_trainer_feedback_consumed_total") == consumed + 6
    assert sample("voxloop_trainer_last_cycle_timestamp_seconds") >= started
    for statistic in ("reward_mean", "approx_kl", "clip_fraction", "entropy", "kl_coef", "kl"):
        assert REGISTRY.get_sample_value("voxloop_trainer_ppo", {"statistic": statistic}) == pytest.approx(
            getattr(report.last_step, statistic)), statistic
    for model in ("candidate", "serving"):
        wer = REGISTRY.get_sample_value("voxloop_trainer_gate_wer", {"set": "anchor", "model": model})
        assert wer is not None and 0 <= wer <= 1.5
    assert 0 <= sample("voxloop_trainer_export_parity_max_abs_diff") < 1e-2
