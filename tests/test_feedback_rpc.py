"""Corrections and acceptances against a real server and a real SQLite store: statuses, tenants, tokens, limits.

The server is the conftest's tiny random-weight model on 127.0.0.1 (port 0): its transcripts are
gibberish, but utterance ids, stored rows and rewards are real. Most tests share one server that
needs tokens (tenants "acme" and "globex"); the anonymous-mode, shutdown and CLI tests start their own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_support import chunked, noise, pcm16
from support import free_port
from voxloop.clients.cli import main
from voxloop.clients.client import RecognizerClient, VoxloopError, recognition_config
from voxloop.core.rewards import is_suspicious, word_edit_reward
from voxloop.core.store import FeedbackKind, FeedbackStore
from voxloop.core.text import normalize_text
from voxloop.server.app import BackgroundServer
from voxloop.server.config import ServerConfig

pytestmark = pytest.mark.slow  # real servers

CHUNK_100MS = 3200
BURST = 40
TOKENS_TOML = """
[[tokens]]
token = "tok-alice"
tenant = "acme"
user = "alice"

[[tokens]]
token = "tok-ann"
tenant = "acme"
user = "ann"

[[tokens]]
token = "tok-bob"
tenant = "globex"
user = "bob"

[[tokens]]
token = "tok-root"
tenant = "acme"
user = "root"
role = "admin"

[[tokens]]
token = "tok-rita"
tenant = "acme"
user = "rita"

[[tokens]]
token = "tok-ops"
tenant = "ops"
user = "olga"
role = "operator"
"""


def server_config(root, **fields) -> ServerConfig:
    return ServerConfig(port=0, metrics_port=0, data_dir=root / "data", model_dir=root / "registry",
                        shutdown_grace_s=5.0, **fields)


def stream_utterance(client: RecognizerClient, seconds: float = 1.0, seed: int = 0,
                     user_id: str = "") -> tuple[str, str]:
    """Stream noise through the tiny model; (utterance_id, transcript) of its final."""
    config = recognition_config(16000, interim_results=False, user_id=user_id)
    finals = [r for response in client.streaming_recognize(chunked(pcm16(noise(seconds, seed=seed)), CHUNK_100MS),
                                                           config, timeout=30)
              for r in response.results if r.is_final]
    assert len(finals) == 1 and finals[0].utterance_id
    return finals[0].utterance_id, finals[0].alternatives[0].transcript


def error_code(call) -> str:
    with pytest.raises(VoxloopError) as raised:
        call()
    return raised.value.code


@pytest.fixture(scope="module")
def secured(tiny_registry_template, tmp_path_factory):
    """A server that needs tokens; the tests read its store file directly."""
    root = tmp_path_factory.mktemp("feedback-server")
    shutil.copytree(tiny_registry_template, root / "registry")
    (root / "tokens.toml").write_text(TOKENS_TOML)
    config = server_config(root, tokens_file=root / "tokens.toml", feedback_burst=BURST, feedback_rate_per_s=1e-3,
                           flag_similarity_threshold=0.2, max_correction_chars=200)
    with BackgroundServer(config) as running:
        running.store_file = config.data_dir / "feedback.sqlite3"
        yield running


def client_for(running, token: str | None) -> RecognizerClient:
    return RecognizerClient(running.target, token=token, timeout=10)


@pytest.fixture
def alice(secured):
    with client_for(secured, "tok-alice") as client:
        yield client


@pytest.fixture
def store(secured):
    with FeedbackStore.sqlite(secured.store_file) as opened:
        yield opened


# --- the round trip -------------------------------------------------------------------------------

def test_correction_round_trip_stores_the_normalized_text_and_returns_its_reward(alice, store):
    utterance_id, transcript = stream_utterance(alice, seed=1)

    response = alice.submit_correction(utterance_id, "Turn on the lights in Room 42!")

    normalized = normalize_text("Turn on the lights in Room 42!")
    assert response.normalized_text == normalized == "turn on the lights in room forty two"
    assert response.reward == pytest.approx(word_edit_reward(transcript, normalized))
    assert response.flagged == is_suspicious(transcript, normalized, 0.2)
    utterance = store.get_utterance(utterance_id, tenant="acme")
    assert (utterance.tenant, utterance.user_id, utterance.hypothesis) == ("acme", "alice", transcript)
    assert len(utterance.audio) == 2 * 16000  # 1 s of 16 kHz int16, kept for training
    [pending] = [p for p in store.pending_feedback(1000, include_flagged=True) if p.utterance.id == utterance_id]
    assert (pending.feedback.id, pending.feedback.kind, pending.feedback.corrected_text) == (
        response.feedback_id, FeedbackKind.CORRECTION, normalized)
    assert pending.feedback.reward == pytest.approx(response.reward)
    assert (pending.feedback.tenant, pending.feedback.submitted_by) == ("acme", "alice")


def test_accepting_a_transcript_stores_a_zero_reward_acceptance(alice, store):
    utterance_id, _ = stream_utterance(alice, seed=2)

    response = alice.accept_transcript(utterance_id)

    assert response.reward == 0.0
    [pending] = [p for p in store.pending_feedback(1000, include_flagged=True) if p.utterance.id == utterance_id]
    assert pending.feedback.id == response.feedback_id and pending.feedback.kind == FeedbackKind.ACCEPTANCE


def test_resubmitting_a_correction_is_idempotent_and_the_latest_text_wins(alice, store):
    utterance_id, _ = stream_utterance(alice, seed=3)

    first = alice.submit_correction(utterance_id, "call my mother")
    retry = alice.submit_correction(utterance_id, "call my mother")
    changed = alice.submit_correction(utterance_id, "call my brother")

    assert retry.feedback_id == first.feedback_id
    assert changed.feedback_id != first.feedback_id
    current = [p.feedback for p in store.pending_feedback(1000, include_flagged=True) if p.utterance.id == utterance_id]
    assert [(f.id, f.corrected_text) for f in current] == [(changed.feedback_id, "call my brother")]


def test_correction_right_after_the_final_waits_for_the_queued_utterance(secured, alice, monkeypatch):
    gate = threading.Event()
    writer = secured.server.writer
    original = writer._add_utterances  # the store's insert, injected into the writer

    def held(records):
        gate.wait(10)
        return original(records)

    monkeypatch.setattr(writer, "_add_utterances", held)
    utterance_id, _ = stream_utterance(alice, seed=4)  # the final arrives while its row is held back
    with ThreadPoolExecutor(1) as pool:
        correction = pool.submit(alice.submit_correction, utterance_id, "what was said")
        time.sleep(0.3)
        assert not correction.done()  # waiting for the writer, not NOT_FOUND
        gate.set()
        assert correction.result(10).normalized_text == "what was said"


# --- bad requests ---------------------------------------------------------------------------------

def test_correction_for_unknown_utterance_is_not_found(alice):
    assert error_code(lambda: alice.submit_correction("no-such-utterance", "hello")) == "NOT_FOUND"
    assert error_code(lambda: alice.accept_transcript("no-such-utterance")) == "NOT_FOUND"


def test_a_bug_in_feedback_intake_is_internal_without_internals_and_the_server_keeps_serving(
        alice, monkeypatch, caplog):
    from voxloop.server.feedback import FeedbackIntake

    utterance_id, _ = stream_utterance(alice, seed=7)

    def broken(*args, **kwargs):
        raise KeyError("store internals")

    monkeypatch.setattr(FeedbackIntake, "submit_correction", broken)
    with pytest.raises(VoxloopError) as raised:
        alice.submit_correction(utterance_id, "hello")
    assert raised.value.code == "INTERNAL"
    assert "KeyError" in str(raised.value) and "store internals" not in str(raised.value)
    assert any("internal error in a feedback call" in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    assert alice.submit_correction(utterance_id, "hello").normalized_text == "hello"


def test_correction_for_an_expired_utterance_is_not_found(alice, store):
    utterance_id, _ = stream_utterance(alice, seed=5)
    alice.accept_transcript(utterance_id)  # written by now
    assert store.expire_audio(0.0) >= 1

    assert error_code(lambda: alice.submit_correction(utterance_id, "hello")) == "NOT_FOUND"


@pytest.mark.parametrize("text", ["", "   ", "x" * 201, "?!%#@ ☺ ✓", "日本語"],
                         ids=["empty", "blank", "too-long", "symbols-only", "other-script"])
def test_correction_text_that_is_empty_too_long_or_unspeakable_is_invalid(secured, text):
    with client_for(secured, "tok-ann") as ann:
        utterance_id, _ = stream_utterance(ann, seed=6)
        assert error_code(lambda: ann.submit_correction(utterance_id, text)) == "INVALID_ARGUMENT"


# --- tenants, tokens, limits ----------------------------------------------------------------------

def test_correcting_another_tenants_utterance_is_permission_denied(secured, alice):
    utterance_id, _ = stream_utterance(alice, seed=7)
    with client_for(secured, "tok-bob") as bob:
        assert error_code(lambda: bob.submit_correction(utterance_id, "mine now")) == "PERMISSION_DENIED"
        assert error_code(lambda: bob.accept_transcript(utterance_id)) == "PERMISSION_DENIED"
    with client_for(secured, "tok-ann") as ann:  # same tenant, another user: allowed
        assert ann.submit_correction(utterance_id, "ours").normalized_text == "ours"


def test_stream_records_the_token_users_tenant_not_the_config_user_id(secured, alice, store):
    utterance_id, _ = stream_utterance(alice, seed=8, user_id="mallory")
    alice.accept_transcript(utterance_id)
    utterance = store.get_utterance(utterance_id, tenant="acme", with_audio=False)
    assert (utterance.tenant, utterance.user_id) == ("acme", "alice")


@pytest.mark.parametrize("token", [None, "tok-forged"], ids=["without-token", "bad-token"])
def test_every_rpc_without_a_valid_token_is_unauthenticated(secured, token):
    with client_for(secured, token) as client:
        assert error_code(lambda: client.submit_correction("any", "hello")) == "UNAUTHENTICATED"
        assert error_code(lambda: client.accept_transcript("any")) == "UNAUTHENTICATED"
        assert error_code(lambda: client.feedback_stats()) == "UNAUTHENTICATED"
        assert error_code(lambda: client.get_model_info()) == "UNAUTHENTICATED"
        assert error_code(lambda: stream_utterance(client)) == "UNAUTHENTICATED"
    with grpc.insecure_channel(secured.target) as channel:  # health stays open for load balancers
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_feedback_past_the_users_rate_limit_is_resource_exhausted(secured, alice):
    with client_for(secured, "tok-rita") as rita:
        codes = [error_code(lambda: rita.accept_transcript("unknown")) for _ in range(BURST + 1)]
    assert codes == ["NOT_FOUND"] * BURST + ["RESOURCE_EXHAUSTED"]
    utterance_id, _ = stream_utterance(alice, seed=9)  # other users keep their own budget
    assert alice.accept_transcript(utterance_id).reward == 0.0


def test_feedback_stats_show_the_callers_tenant_and_all_tenants_to_an_operator(secured, alice):
    with client_for(secured, "tok-bob") as bob:
        bob_id, _ = stream_utterance(bob, seed=10)
        bob.accept_transcript(bob_id)
        own = bob.feedback_stats()
        assert set(own.by_tenant) == {"globex"} and own.by_kind["acceptance"] >= 1
        assert error_code(lambda: bob.feedback_stats("acme")) == "PERMISSION_DENIED"
    with client_for(secured, "tok-root") as root:  # acme's admin: acme only
        assert set(root.feedback_stats().by_tenant) <= {"acme"}
        assert error_code(lambda: root.feedback_stats("globex")) == "PERMISSION_DENIED"
    with client_for(secured, "tok-ops") as operator:
        everything = operator.feedback_stats()
        assert set(operator.feedback_stats("globex").by_tenant) == {"globex"}
    assert {"globex"} <= set(everything.by_tenant) and everything.feedback >= own.feedback


# --- the store writer: durability on shutdown, anonymous mode, CLI --------------------------------

@pytest.fixture
def anonymous_config(tiny_registry, tmp_path) -> ServerConfig:
    return ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=tiny_registry,
                        shutdown_grace_s=5.0)


def test_queued_utterances_survive_a_graceful_stop(anonymous_config, monkeypatch):
    gate = threading.Event()
    original = FeedbackStore.add_utterances

    def held(self, records):
        gate.wait(10)
        return original(self, records)

    monkeypatch.setattr(FeedbackStore, "add_utterances", held)
    running = BackgroundServer(anonymous_config)
    try:
        with RecognizerClient(running.target) as client:
            ids = [stream_utterance(client, seconds=0.5, seed=seed, user_id="u")[0] for seed in range(4)]
        assert running.server.writer.queued >= 1  # finals were sent while their rows waited
        gate.set()
    finally:
        running.stop()
    monkeypatch.setattr(FeedbackStore, "add_utterances", original)

    assert running.server.utterances_dropped == 0
    with FeedbackStore.sqlite(anonymous_config.data_dir / "feedback.sqlite3") as store:
        assert [store.get_utterance(i, tenant="default").user_id for i in ids] == ["u"] * 4
    with BackgroundServer(anonymous_config) as restarted, RecognizerClient(restarted.target) as client:
        assert client.submit_correction(ids[0], "after the restart").normalized_text == "after the restart"


def test_anonymous_mode_serves_tenant_default_and_refuses_tokens(anonymous_config):
    with BackgroundServer(anonymous_config) as running:
        with RecognizerClient(running.target) as client:
            utterance_id, _ = stream_utterance(client, seed=11)
            assert client.accept_transcript(utterance_id).reward == 0.0
            assert client.feedback_stats().by_tenant["default"] == 1
        with RecognizerClient(running.target, token="tok-anything") as client:
            assert error_code(lambda: client.accept_transcript(utterance_id)) == "UNAUTHENTICATED"


def test_cli_correct_and_accept_print_the_reward_and_exit_1_on_errors(anonymous_config, capsys):
    with BackgroundServer(anonymous_config) as running:
        with RecognizerClient(running.target) as client:
            utterance_id, transcript = stream_utterance(client, seed=12)
        server = ["--server", running.target]

        assert main(["correct", *server, utterance_id, "Open the door"]) == 0
        expected = word_edit_reward(transcript, "open the door")
        assert capsys.readouterr().out.startswith(f"reward {expected:.3f}: open the door")
        assert main(["accept", *server, "--json", utterance_id]) == 0
        assert json.loads(capsys.readouterr().out)["reward"] == 0.0
        assert main(["feedback", "stats", *server, "--json"]) == 0
        stats = json.loads(capsys.readouterr().out)
        # The acceptance replaced the same user's correction of the same utterance: the latest wins.
        assert stats["by_kind"] == {"acceptance": 1} and stats["utterances"] == 1 and stats["feedback"] == 1

        assert main(["correct", *server, "no-such-utterance", "hello"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("voxloop: error: NOT_FOUND")
        assert main(["correct", *server, utterance_id, "%%%"]) == 1
        assert "INVALID_ARGUMENT" in capsys.readouterr().err
        assert main(["accept", *server, "--token", "forged", utterance_id]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err


# --- TLS and retention ----------------------------------------------------------------------------

def self_signed_certificate(directory) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) for 127.0.0.1, from the openssl command line."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert.read_bytes(), key.read_bytes()


def test_tls_server_corrects_over_a_verified_handshake_and_refuses_plaintext(tiny_registry, tmp_path):
    cert, _ = self_signed_certificate(tmp_path)
    (tmp_path / "tokens.toml").write_text(TOKENS_TOML)
    config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=tiny_registry,
                          tokens_file=tmp_path / "tokens.toml", tls_cert_file=tmp_path / "cert.pem",
                          tls_key_file=tmp_path / "key.pem")
    with BackgroundServer(config) as running:
        trusted = grpc.ssl_channel_credentials(root_certificates=cert)
        with RecognizerClient(running.target, token="tok-alice", tls=trusted, timeout=10) as client:
            utterance_id, _ = stream_utterance(client, seed=13)
            assert client.submit_correction(utterance_id, "secure").normalized_text == "secure"
        with RecognizerClient(running.target, token="tok-alice", timeout=3) as plaintext:
            assert error_code(plaintext.get_model_info) == "UNAVAILABLE"


def test_tls_without_a_tokens_file_is_refused_at_startup(tmp_path):
    with pytest.raises(ValueError, match="tokens_file must be set when TLS is on"):
        ServerConfig(tls_cert_file=tmp_path / "cert.pem", tls_key_file=tmp_path / "key.pem")
    with pytest.raises(ValueError, match="tls_key_file must be set too"):
        ServerConfig(tls_cert_file=tmp_path / "cert.pem", tokens_file=tmp_path / "tokens.toml")


def test_retention_deletes_old_audio_and_its_utterance_takes_no_more_feedback(tiny_registry, tmp_path):
    config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=tiny_registry,
                          audio_retention_s=0.3, retention_interval_s=0.1)
    with BackgroundServer(config) as running, RecognizerClient(running.target) as client:
        utterance_id, _ = stream_utterance(client, seed=14)
        with FeedbackStore.sqlite(config.data_dir / "feedback.sqlite3") as store:
            deadline = time.monotonic() + 10
            while True:  # one snapshot: the row may still be on its way from the writer
                stats = store.stats()
                if stats.utterances == 1 and stats.utterances_with_audio == 0:
                    break
                assert time.monotonic() < deadline, "retention did not expire the audio"
                time.sleep(0.1)
        assert error_code(lambda: client.accept_transcript(utterance_id)) == "NOT_FOUND"


def test_delete_user_data_needs_an_admin_and_removes_the_users_utterances_and_feedback(secured, store):
    with client_for(secured, "tok-ann") as ann, client_for(secured, "tok-alice") as alice:
        own_id, _ = stream_utterance(ann, seed=15)
        alices_id, _ = stream_utterance(alice, seed=16)
        ann.accept_transcript(alices_id)  # feedback ann gave on someone else's utterance
        alice.accept_transcript(own_id)  # feedback on ann's utterance by someone else
        assert error_code(lambda: ann.delete_user_data("ann")) == "PERMISSION_DENIED"
    with client_for(secured, "tok-root") as root:
        deleted = root.delete_user_data("ann")
        assert error_code(lambda: root.delete_user_data("")) == "INVALID_ARGUMENT"

    assert deleted.utterances_deleted >= 1 and deleted.feedback_deleted >= 2
    with pytest.raises(LookupError):
        store.get_utterance(own_id, tenant="acme")
    assert store.get_utterance(alices_id, tenant="acme").user_id == "alice"
    assert "ann" not in store.stats(tenant="acme").by_user.get("acme", {})


# --- durability -----------------------------------------------------------------------------------

def test_acked_corrections_from_concurrent_clients_survive_sigkill_exactly_once(tiny_registry, tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "voxloop.clients.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "0", "--model-dir", str(tiny_registry), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"

    def correct_some(worker: int) -> list[int]:
        acked = []
        with RecognizerClient(target, timeout=20) as client:
            for i in range(3):
                utterance_id, _ = stream_utterance(client, seconds=0.5, seed=100 + 10 * worker + i,
                                                   user_id=f"speaker{worker}")
                text = f"worker {worker} sentence {i}"
                acked.append(client.submit_correction(utterance_id, text).feedback_id)
                assert client.submit_correction(utterance_id, text).feedback_id == acked[-1]  # a retry
        return acked

    try:
        with RecognizerClient(target, timeout=2) as probe:
            deadline = time.monotonic() + 60
            while True:
                try:
                    probe.get_model_info()
                    break
                except VoxloopError:
                    assert process.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
        with ThreadPoolExecutor(4) as pool:
            acked = [i for ids in pool.map(correct_some, range(4)) for i in ids]
        process.kill()  # SIGKILL: no shutdown path runs
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    with FeedbackStore.sqlite(tmp_path / "data" / "feedback.sqlite3") as store:
        stored = [p.feedback for p in store.pending_feedback(1000, include_flagged=True)]
    assert len(acked) == len(set(acked)) == 12
    assert sorted(f.id for f in stored) == sorted(acked)
    sent = {normalize_text(f"worker {w} sentence {i}") for w in range(4) for i in range(3)}
    assert {f.corrected_text for f in stored} == sent
