"""The parts of correction intake that need no server: the utterance writer, tokens, rate limits, text checks."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest
from voxloop.core.store import InvalidFeedback
from voxloop.server.auth import (
    ANONYMOUS,
    Authenticator,
    Identity,
    RateLimited,
    RateLimiter,
    Role,
    Unauthenticated,
    load_tokens,
)
from voxloop.server.feedback import normalized_correction
from voxloop.server.stream import FinishedUtterance
from voxloop.server.utterance_writer import UtteranceWriter


def finished(utterance_id: str, tenant: str = "acme") -> FinishedUtterance:
    return FinishedUtterance(
        utterance_id=utterance_id, model_version="v1", audio=np.zeros(160, dtype=np.int16), sample_rate_hz=16000,
        transcript="hello", confidence=0.9, words=(), start_s=0.0, duration_s=0.01, user_id="u", session_id="",
        created_at=datetime.now(UTC), tenant=tenant,
    )


class HeldStore:
    """add_utterances that blocks until released, recording what it was given."""

    def __init__(self):
        self.release = threading.Event()
        self.batches: list[list[str]] = []

    def add_utterances(self, records):
        self.release.wait(10)
        self.batches.append([r.id for r in records])
        return len(records)


# --- the utterance writer ------------------------------------------------------------------------

def test_writer_drops_and_counts_records_when_its_queue_is_full_without_blocking():
    store = HeldStore()
    writer = UtteranceWriter(store.add_utterances, max_queued=2, batch_size=1)
    assert writer.offer(finished("u0"))
    deadline = time.monotonic() + 5
    while writer.queued:  # until the writer thread holds u0 (blocked in the store)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    offered = [writer.offer(finished(f"u{i}")) for i in range(1, 6)]
    store.release.set()
    writer.close()

    assert offered == [True, True, False, False, False] and writer.dropped == 3
    assert [i for batch in store.batches for i in batch] == ["u0", "u1", "u2"] and writer.written == 3


def test_writer_close_writes_everything_queued_first():
    store = HeldStore()
    writer = UtteranceWriter(store.add_utterances, max_queued=100, batch_size=3)
    for i in range(10):
        assert writer.offer(finished(f"u{i}"))
    store.release.set()
    writer.close()

    assert sorted(i for batch in store.batches for i in batch) == sorted(f"u{i}" for i in range(10))
    assert max(len(b) for b in store.batches) <= 3 and writer.dropped == 0
    assert not writer.offer(finished("late")) and writer.dropped == 1


def test_wait_written_returns_once_the_row_is_committed():
    store = HeldStore()
    writer = UtteranceWriter(store.add_utterances, max_queued=10, batch_size=8)
    writer.offer(finished("u0"))
    assert not writer.wait_written("u0", 0.05)  # still held
    store.release.set()
    assert writer.wait_written("u0", 5.0) and writer.wait_written("never-offered", 0.0)
    writer.close()


def test_a_failed_batch_is_retried_row_by_row_and_only_the_bad_row_is_dropped():
    written = []

    def add_utterances(records):
        if any(r.id == "bad" for r in records):
            raise RuntimeError("duplicate id")
        written.extend(r.id for r in records)

    writer = UtteranceWriter(add_utterances, max_queued=10, batch_size=10)
    for utterance_id in ("first", "a", "bad", "b"):  # however they are batched, only "bad" fails
        writer.offer(finished(utterance_id))
    writer.close()
    assert sorted(written) == ["a", "b", "first"] and writer.dropped == 1


# --- tokens and identities -----------------------------------------------------------------------

def test_tokens_load_from_toml_and_json_alike(tmp_path):
    (tmp_path / "t.toml").write_text('[[tokens]]\ntoken = "k1"\ntenant = "acme"\nuser = "al"\nrole = "admin"\n')
    (tmp_path / "t.json").write_text('{"tokens": [{"token": "k1", "tenant": "acme", "user": "al", "role": "admin"}]}')
    assert load_tokens(tmp_path / "t.toml") == load_tokens(tmp_path / "t.json")
    auth = Authenticator(load_tokens(tmp_path / "t.toml"), allow_anonymous=False)
    assert auth.identify_metadata([("authorization", "Bearer k1")]) == Identity("acme", "al", Role.ADMIN)


@pytest.mark.parametrize("document, message", [
    ('{"tokens": [{"token": "k", "tenant": "t"}]}', "missing or empty user"),
    ('{"tokens": [{"token": "k", "tenant": "t", "user": "u", "role": "root"}]}', "role must be one of"),
    ('{"tokens": [{"token": "k", "tenant": "t", "user": "u"}, {"token": "k", "tenant": "t", "user": "v"}]}',
     "listed twice"),
    ('{"users": []}', "needs a list `tokens`"),
    ("{", "does not parse"),
])
def test_a_bad_tokens_file_is_refused_with_the_fix(tmp_path, document, message):
    path = tmp_path / "tokens.json"
    path.write_text(document)
    with pytest.raises(ValueError, match=message):
        load_tokens(path)


def test_missing_malformed_or_unknown_tokens_are_unauthenticated():
    auth = Authenticator({}, allow_anonymous=False)
    for metadata in ([], [("authorization", "Basic abc")], [("authorization", "Bearer ")],
                     [("authorization", "Bearer nope")]):
        with pytest.raises(Unauthenticated):
            auth.identify_metadata(metadata)


def test_anonymous_mode_serves_calls_without_a_token_but_not_unknown_tokens():
    auth = Authenticator(None, allow_anonymous=True)
    assert auth.identify_metadata([]) == ANONYMOUS and ANONYMOUS.tenant == "default"
    with pytest.raises(Unauthenticated):
        auth.identify_metadata([("authorization", "Bearer guess")])


# --- rate limits and text ------------------------------------------------------------------------

def test_rate_limiter_allows_a_burst_then_refills_at_the_rate_per_user():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.acquire("alice")
    with pytest.raises(RateLimited, match="retry in 0.5 s"):
        limiter.acquire("alice")
    limiter.acquire("bob")  # buckets are per user
    now[0] = 0.5
    limiter.acquire("alice")
    with pytest.raises(RateLimited):
        limiter.acquire("alice")


@pytest.mark.parametrize("text", ["", " \t", "#$%^*", "x" * 11])
def test_empty_unspeakable_or_too_long_corrections_are_invalid(text):
    with pytest.raises(InvalidFeedback):
        normalized_correction(text, max_chars=10)


def test_corrections_are_normalized_like_training_transcripts():
    assert normalized_correction("It's 5 O'Clock!", max_chars=100) == "it's five o'clock"


# --- feedback on another replica's utterance ------------------------------------------------------

def _intake(store_url: str, flush_wait_s: float):
    from voxloop.core.store import FeedbackStore
    from voxloop.server.config import ServerConfig
    from voxloop.server.feedback import FeedbackIntake

    store = FeedbackStore.open(store_url)
    config = ServerConfig(store_flush_wait_s=flush_wait_s)
    return store, FeedbackIntake(config, store, None, RateLimiter(100.0, 100))


def test_a_correction_for_an_utterance_another_replica_is_still_writing_waits_for_its_row(store_url):
    from voxloop.core.store import FeedbackStore
    from voxloop.server.utterance_writer import utterance_record

    utterance_id = "0f" * 16  # as servers name utterances (uuid4().hex)
    store, intake = _intake(store_url, flush_wait_s=5.0)
    caller = Identity("acme", "alice", Role.USER)
    with store, FeedbackStore.open(store_url) as other_replica:
        writes = threading.Timer(0.4, other_replica.add_utterance, [utterance_record(finished(utterance_id))])
        started = time.monotonic()
        writes.start()
        receipt = intake.submit_correction(caller, utterance_id, "hello there")
        waited = time.monotonic() - started
        writes.join()
        assert receipt.normalized_text == "hello there"
        assert 0.35 < waited < 3.0
        [pending] = store.pending_feedback(10)
        assert (pending.feedback.id, pending.utterance.id) == (receipt.feedback_id, utterance_id)


def test_an_utterance_no_replica_wrote_is_not_found_after_store_flush_wait_s(store_url):
    from voxloop.core.store import NotFound

    store, intake = _intake(store_url, flush_wait_s=0.5)
    caller = Identity("acme", "alice", Role.USER)
    with store:
        started = time.monotonic()
        with pytest.raises(NotFound, match="waited 0.5 s"):
            intake.accept_transcript(caller, "1a" * 16)
        assert 0.5 <= time.monotonic() - started < 2.0
        started = time.monotonic()
        with pytest.raises(NotFound):  # no server names utterances like this: no wait
            intake.accept_transcript(caller, "no-such-utterance")
        assert time.monotonic() - started < 0.3
