"""The feedback store on both engines it runs on, and the reward / poisoning-guard functions it stores.

Every store test runs twice (the `store_url` fixture, tests/conftest.py): on a real SQLite file and on a
fresh database of a throwaway PostgreSQL server (tests/postgres_support.py). Tests of one engine's own
setup say so in their names.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta

import jiwer
import numpy as np
import pytest
import sqlalchemy as sa
from rapidfuzz.distance import Levenshtein
from voxloop.core import store as store_module
from voxloop.core.pcm import float_to_pcm16
from voxloop.core.rewards import (
    char_edit_reward,
    char_similarity,
    edit_distance,
    is_suspicious,
    word_edit_reward,
)
from voxloop.core.store import (
    AlreadyConsumed,
    FeedbackKind,
    FeedbackStore,
    InvalidFeedback,
    NotFound,
    PermissionDenied,
    SchemaTooNew,
    UtteranceRecord,
)

TENANT = "acme"
HYPOTHESIS = "turn on the kitchen light"
CORRECTION = "turn on the kitchen lights"


def make_utterance(
    utterance_id: str,
    *,
    tenant: str = TENANT,
    user: str | None = "alice",
    age_s: float = 0.0,
    hypothesis: str = HYPOTHESIS,
    alternatives: tuple[str, ...] | None = None,
) -> UtteranceRecord:
    samples = np.sin(np.linspace(0, 100, 1600, dtype=np.float32)) * 0.5  # 0.1 s at 16 kHz
    return UtteranceRecord(
        id=utterance_id,
        tenant=tenant,
        user_id=user,
        session_id="s1",
        model_version="base-0001",
        created_at=datetime.now(UTC) - timedelta(seconds=age_s),
        duration_s=0.1,
        sample_rate_hz=16_000,
        audio=float_to_pcm16(samples),
        hypothesis=hypothesis,
        confidence=0.8,
        alternatives=alternatives,
    )


def correct(store: FeedbackStore, utterance_id: str, text: str = CORRECTION, *, user: str = "alice", **kwargs):
    return store.submit_feedback(
        utterance_id,
        tenant=kwargs.pop("tenant", TENANT),
        user=user,
        kind=FeedbackKind.CORRECTION,
        corrected_text=text,
        reward=word_edit_reward(HYPOTHESIS, text),
        **kwargs,
    )


@pytest.fixture
def store(store_url):
    with FeedbackStore.open(store_url) as opened:
        yield opened


# --- feedback round trip and idempotency ---------------------------------------------------------


def test_correction_round_trip_gives_the_trainer_the_text_audio_and_model_version(store):
    utterance = make_utterance("u1")
    store.add_utterance(utterance)

    submitted = correct(store, "u1")
    [item] = store.pending_feedback(10)

    assert submitted.reward == pytest.approx(-1 / 5)
    assert item.feedback == submitted
    assert item.feedback.kind is FeedbackKind.CORRECTION and item.feedback.corrected_text == CORRECTION
    assert item.utterance == utterance
    assert item.utterance.model_version == "base-0001"
    np.testing.assert_allclose(item.utterance.samples(), utterance.samples())
    assert store.get_utterance("u1", tenant=TENANT, with_audio=False).audio is None


def test_resubmitted_feedback_replaces_the_previous_one_latest_wins(store):
    store.add_utterance(make_utterance("u1"))
    first = correct(store, "u1", "turn on the kitchen night")
    second = correct(store, "u1", CORRECTION)
    other_user = correct(store, "u1", CORRECTION, user="bob")

    pending = store.pending_feedback(10)

    assert [p.feedback.id for p in pending] == [second.id, other_user.id]
    assert second.id != first.id and second.created_at >= first.created_at
    assert store.stats().feedback == 2


def test_retried_identical_feedback_is_not_counted_twice_even_after_training(store):
    store.add_utterance(make_utterance("u1"))
    first = correct(store, "u1")
    assert correct(store, "u1") == first

    store.record_cycle([first.id], "published", "base-0002")
    assert correct(store, "u1").id == first.id
    assert store.pending_count() == 0

    changed = correct(store, "u1", "turn off the kitchen lights")
    assert changed.id != first.id and changed.consumed_by_cycle is None
    assert [p.feedback.id for p in store.pending_feedback(10)] == [changed.id]


def test_feedback_replaced_mid_cycle_is_consumed_as_read_and_the_replacement_stays_pending(store):
    store.add_utterance(make_utterance("u1"))
    correct(store, "u1", "turn on the kitchen night")
    batch = store.pending_feedback(10)  # the trainer reads, then trains for a while...
    replacement = correct(store, "u1", CORRECTION)  # ...while the user fixes their correction

    cycle_id = store.record_cycle([p.feedback.id for p in batch], "published", "base-0002")

    assert store.get_cycle(cycle_id).feedback_ids == (batch[0].feedback.id,)
    assert [p.feedback.id for p in store.pending_feedback(10)] == [replacement.id]


def test_choice_feedback_records_the_chosen_alternative(store):
    store.add_utterance(make_utterance("u1", alternatives=(HYPOTHESIS, CORRECTION)))
    chosen = store.submit_feedback("u1", tenant=TENANT, user="alice", kind="choice", chosen_index=1, reward=0.0)
    [item] = store.pending_feedback(1)
    assert chosen.kind is FeedbackKind.CHOICE
    assert item.utterance.alternatives[item.feedback.chosen_index] == CORRECTION


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "correction"},  # no text
        {"kind": "acceptance", "corrected_text": CORRECTION},
        {"kind": "choice"},  # no index
        {"kind": "choice", "chosen_index": 2},  # two alternatives shown
        {"kind": "praise"},
        {"kind": "rejection", "reward": float("nan")},
    ],
)
def test_feedback_that_does_not_fit_its_kind_is_invalid(store, fields):
    store.add_utterance(make_utterance("u1", alternatives=("a", "b")))
    with pytest.raises(InvalidFeedback):
        store.submit_feedback("u1", tenant=TENANT, user="alice", **{"reward": -1.0, **fields})
    assert store.stats().feedback == 0


# --- not found, expired, other tenants -------------------------------------------------------------


def test_feedback_for_an_unknown_utterance_is_not_found(store):
    with pytest.raises(NotFound):
        correct(store, "no-such-utterance")
    with pytest.raises(NotFound):
        store.get_utterance("no-such-utterance", tenant=TENANT)


def test_feedback_for_an_expired_utterance_is_not_found(store):
    store.add_utterance(make_utterance("old", age_s=3600))
    store.add_utterance(make_utterance("new"))
    assert store.expire_audio(older_than_s=600) == 1
    with pytest.raises(NotFound, match="expired"):
        correct(store, "old")
    with pytest.raises(NotFound):
        store.get_utterance("old", tenant=TENANT)
    assert correct(store, "new").utterance_id == "new"


def test_another_tenants_utterance_is_permission_denied_not_not_found(store):
    store.add_utterance(make_utterance("u1", tenant="globex"))
    with pytest.raises(PermissionDenied):
        store.get_utterance("u1", tenant=TENANT)
    with pytest.raises(PermissionDenied):
        correct(store, "u1")
    assert store.stats().feedback == 0


# --- training cycles -------------------------------------------------------------------------------


def test_record_cycle_marks_exactly_the_given_ids_consumed(store):
    store.add_utterances([make_utterance(f"u{i}") for i in range(4)])
    items = [correct(store, f"u{i}") for i in range(4)]
    used = [items[0].id, items[2].id]

    cycle_id = store.record_cycle(used, "published", "base-0002", {"reward_mean": -0.2})

    cycle = store.get_cycle(cycle_id)
    assert cycle.feedback_ids == tuple(used)
    assert (cycle.outcome, cycle.model_version_out, cycle.stats) == ("published", "base-0002", {"reward_mean": -0.2})
    assert [p.feedback.id for p in store.pending_feedback(10)] == [items[1].id, items[3].id]
    assert store.stats().consumed == 2 and store.latest_cycle() == cycle


def test_consumed_feedback_is_the_texts_earlier_cycles_consumed_newest_first(store):
    """The trainer's rehearsal memory: consumed items naming a text, never a rejection, a flagged, superseded or
    expired one, nor a deleted user's."""
    store.add_utterances([make_utterance(f"u{i}", age_s=3600 if i == 5 else 0.0,
                                         alternatives=(HYPOTHESIS, CORRECTION)) for i in range(7)])
    first = correct(store, "u0")
    accepted = store.submit_feedback("u1", tenant=TENANT, user="alice", kind="acceptance", reward=0.0)
    rejected = store.submit_feedback("u2", tenant=TENANT, user="alice", kind="rejection", reward=-1.0)
    flagged = correct(store, "u3", flagged=True, flag_reason="too far from the transcript")
    bob = correct(store, "u4", user="bob")
    expired = correct(store, "u5")
    store.record_cycle([first.id, accepted.id, rejected.id, flagged.id, bob.id, expired.id], "published", "v2")
    chosen = store.submit_feedback("u6", tenant=TENANT, user="alice", kind="choice", chosen_index=1, reward=0.0)
    replaced = correct(store, "u0", "turn on the kitchen light please")  # a new text for an utterance trained on
    pending = correct(store, "u1", "turn off the kitchen lights", user="carol")
    store.record_cycle([chosen.id, replaced.id], "gated")
    assert store.expire_audio(older_than_s=600) == 1
    store.delete_user_data(TENANT, "bob")

    memory = store.consumed_feedback(10)

    # the later cycle's first; the superseded u0 text, the rejection, the flagged item, the expired audio, bob's
    # deleted data and the still pending item are left out
    assert [p.feedback.id for p in memory] == [replaced.id, chosen.id, accepted.id]
    assert memory[0].feedback.corrected_text == "turn on the kitchen light please" and memory[0].utterance.audio
    assert [p.feedback.id for p in store.consumed_feedback(1)] == [replaced.id]
    assert [p.feedback.id for p in store.consumed_feedback(10, exclude_ids=[chosen.id])] == [replaced.id, accepted.id]
    assert pending.id not in [p.feedback.id for p in memory]
    odd = store.consumed_feedback(1, keep=lambda feedback_id: feedback_id != replaced.id)  # the limit counts kept ones
    assert [p.feedback.id for p in odd] == [chosen.id] and odd[0].utterance.audio
    assert store.consumed_feedback(5, keep=lambda feedback_id: False) == []
    with pytest.raises(ValueError, match="positive"):
        store.consumed_feedback(0)


def test_record_cycle_refuses_double_consumption_and_changes_nothing(store):
    store.add_utterances([make_utterance(f"u{i}") for i in range(3)])
    items = [correct(store, f"u{i}") for i in range(3)]
    first = store.record_cycle([items[0].id], "published")

    with pytest.raises(AlreadyConsumed) as refused:
        store.record_cycle([items[0].id, items[1].id], "published")

    assert refused.value.feedback_ids == (items[0].id,)
    assert store.latest_cycle().id == first and store.stats().cycles == 1
    assert [p.feedback.id for p in store.pending_feedback(10)] == [items[1].id, items[2].id]


def test_feedback_ids_are_not_reused_after_a_deletion(store):
    store.add_utterance(make_utterance("u1", user="carol"))
    deleted = correct(store, "u1", user="carol")
    store.delete_user_data(TENANT, "carol")
    store.add_utterance(make_utterance("u2"))
    assert correct(store, "u2").id > deleted.id


# --- durability and concurrency --------------------------------------------------------------------

_WRITER = """
import os, signal, sys
from voxloop.core.store import FeedbackStore
store = FeedbackStore.open(sys.argv[1])
user, n = sys.argv[2], int(sys.argv[3])
for i in range(n):
    record = store.submit_feedback(f"u{i}", tenant="acme", user=user, kind="acceptance", reward=0.0)
    print(record.id, flush=True)  # the "ack": printed only after submit_feedback returned
os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit, no flush of anything
"""


@pytest.mark.slow  # writer processes, killed
def test_acked_feedback_survives_the_writing_processes_being_killed(store_url):
    n = 15
    with FeedbackStore.open(store_url) as setup:
        setup.add_utterances([make_utterance(f"u{i}") for i in range(n)])
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_WRITER), store_url, user, str(n)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for user in ("alice", "bob")  # two processes writing at once: cross-process locking too
    ]
    acked = set()
    for writer in writers:
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == -signal.SIGKILL
        acked |= {int(line) for line in out.split()}

    with FeedbackStore.open(store_url) as reopened:
        pending = reopened.pending_feedback(100)
    assert len(acked) == 2 * n
    assert {p.feedback.id for p in pending} == acked


@pytest.mark.slow
def test_postgresql_keeps_acked_feedback_when_the_database_server_is_killed_mid_burst():
    from postgres_support import PostgresServer

    n = 400
    with PostgresServer.start() as server:
        url = server.create_database()
        with FeedbackStore.open(url) as setup:
            setup.add_utterances([make_utterance(f"u{i}") for i in range(n)])
        acked: list[int] = []
        failure: list[BaseException] = []
        writer_store = FeedbackStore.open(url)

        def write() -> None:
            try:
                for i in range(n):
                    acked.append(correct(writer_store, f"u{i}").id)  # appended only once submit returned
            except Exception as e:  # noqa: BLE001 - the server's death, expected
                failure.append(e)

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 60
        while len(acked) < 25 and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill()  # SIGKILL: no checkpoint, no clean shutdown, mid-transaction
        writer.join(60)
        writer_store.close()
        assert failure and 25 <= len(acked) < n, (len(acked), failure)

        server.start_again()  # crash recovery replays the WAL
        with FeedbackStore.open(url) as reopened:
            stored = {p.feedback.id for p in reopened.pending_feedback(n)}
    assert set(acked) <= stored
    assert len(stored) - len(acked) <= 1  # at most the one in flight: committed, not yet acked


@pytest.mark.parametrize("overlap", [False, True])
def test_racing_trainers_consume_each_feedback_item_exactly_once(store_url, overlap):
    n, trainers = 12, 4
    with FeedbackStore.open(store_url) as setup:
        setup.add_utterances([make_utterance(f"u{i}") for i in range(n)])
        ids = [correct(setup, f"u{i}").id for i in range(n)]
    # Without overlap every trainer read the same whole batch; with it, windows that share items.
    batches = [ids if not overlap else ids[3 * t : 3 * t + 6] for t in range(trainers)]
    stores = [FeedbackStore.open(store_url) for _ in range(trainers)]  # separate engines, as separate processes
    barrier = threading.Barrier(trainers)
    recorded: dict[int, int] = {}
    refused: list[int] = []
    errors = []

    def train(t: int) -> None:
        barrier.wait()
        try:
            recorded[t] = stores[t].record_cycle(batches[t], "published", f"v{t}")
        except AlreadyConsumed:
            refused.append(t)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=train, args=(t,)) for t in range(trainers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for opened in stores:
        opened.close()

    assert errors == [] and len(recorded) + len(refused) == trainers and recorded
    with FeedbackStore.open(store_url) as check:
        consumed_by = {}
        for t, cycle_id in recorded.items():
            cycle = check.get_cycle(cycle_id)
            assert cycle.feedback_ids == tuple(sorted(batches[t]))  # all it asked for, or (refused) nothing
            for i in cycle.feedback_ids:
                assert i not in consumed_by, f"feedback {i} consumed by two cycles"
                consumed_by[i] = cycle_id
        assert check.stats().cycles == len(recorded)  # a refused trainer recorded no cycle row
        assert check.pending_count() == n - len(consumed_by)
    if not overlap:
        assert len(recorded) == 1


def test_concurrent_writers_from_threads_lose_no_rows(store):
    threads_n, per_thread = 6, 8
    errors = []

    def write(thread: int) -> None:
        try:
            for i in range(per_thread):
                utterance_id = f"t{thread}-{i}"
                store.add_utterance(make_utterance(utterance_id, user=f"user{thread}"))
                correct(store, utterance_id, user=f"user{thread}")
                store.pending_count()  # readers run beside the writers
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    stats = store.stats()
    assert stats.utterances == stats.feedback == stats.pending == threads_n * per_thread
    assert stats.by_user[TENANT] == {f"user{t}": per_thread for t in range(threads_n)}


def test_racing_resubmissions_by_one_user_leave_one_current_feedback(store):
    store.add_utterance(make_utterance("u1"))
    texts = [f"turn on the kitchen light number {i}" for i in range(8)]
    barrier = threading.Barrier(len(texts))
    errors = []

    def submit(text: str) -> None:
        barrier.wait()
        try:
            correct(store, "u1", text)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=submit, args=(text,)) for text in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    [current] = store.pending_feedback(10)
    assert current.feedback.corrected_text in texts and store.stats().feedback == 1


def test_sqlite_commits_are_durable_wal_full_sync_with_foreign_keys(tmp_path):
    with FeedbackStore.sqlite(tmp_path / "feedback.sqlite") as store, store._engine.connect() as conn:
        pragma = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in ("journal_mode", "synchronous")}
        pragma["foreign_keys"] = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
    assert pragma == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}  # 2 = FULL


# --- retention, deletion, poisoning guard ----------------------------------------------------------


def test_expire_audio_deletes_old_audio_and_keeps_texts_and_counts(store):
    store.add_utterance(make_utterance("old", age_s=7200))
    correct(store, "old")  # given before expiry, never trained on
    store.add_utterance(make_utterance("new"))

    assert store.expire_audio(older_than_s=3600) == 1
    assert store.expire_audio(older_than_s=3600) == 0

    stats = store.stats()
    assert (stats.utterances, stats.utterances_with_audio, stats.feedback) == (2, 1, 1)
    assert stats.pending == 0 and store.pending_feedback(10) == []  # nothing to train on without audio


def test_delete_user_data_removes_their_utterances_and_all_feedback_on_them(store):
    store.add_utterances([make_utterance("a1", user="alice"), make_utterance("b1", user="bob")])
    store.add_utterance(make_utterance("a-other-tenant", tenant="globex", user="alice"))
    correct(store, "a1", user="alice")
    correct(store, "a1", user="bob")  # bob's feedback on alice's utterance goes with it
    correct(store, "b1", user="alice")  # alice's feedback on bob's utterance goes too
    kept = correct(store, "b1", user="bob")

    deleted = store.delete_user_data(TENANT, "alice")

    assert (deleted.utterances, deleted.feedback) == (1, 3)
    with pytest.raises(NotFound):
        store.get_utterance("a1", tenant=TENANT)
    assert store.get_utterance("a-other-tenant", tenant="globex").user_id == "alice"
    assert [p.feedback.id for p in store.pending_feedback(10)] == [kept.id]


def test_pending_feedback_caps_each_users_share_of_a_batch(store):
    store.add_utterances([make_utterance(f"u{i}") for i in range(10)])
    flooded = [correct(store, f"u{i}", user="mallory") for i in range(8)]
    honest = [correct(store, f"u{i}", user="bob") for i in range(8, 10)]

    batch = store.pending_feedback(8, max_share_per_user=0.25)

    assert [p.feedback.id for p in batch] == [f.id for f in flooded[:2] + honest]
    assert len(store.pending_feedback(8)) == 8


def test_flagged_feedback_is_left_out_of_batches_unless_asked_for(store):
    store.add_utterances([make_utterance("u1"), make_utterance("u2")])
    clean = correct(store, "u1")
    flagged = correct(store, "u2", "buy cheap watches", flagged=True, flag_reason="similarity 0.12 < 0.2")

    assert [p.feedback.id for p in store.pending_feedback(10)] == [clean.id]
    assert [p.feedback.id for p in store.pending_feedback(10, include_flagged=True)] == [clean.id, flagged.id]
    stats = store.stats()
    assert (stats.pending, stats.pending_flagged, stats.flagged) == (1, 1, 1)


def test_stats_count_by_kind_tenant_model_version_and_user(store):
    store.add_utterances([make_utterance("u1"), make_utterance("u2"), make_utterance("g1", tenant="globex")])
    correct(store, "u1")
    store.submit_feedback("u2", tenant=TENANT, user="bob", kind="acceptance", reward=0.0)
    store.submit_feedback("g1", tenant="globex", user="zed", kind="rejection", reward=-1.0)

    stats = store.stats()
    assert stats.by_kind == {"correction": 1, "acceptance": 1, "rejection": 1}
    assert stats.by_tenant == {TENANT: 2, "globex": 1}
    assert stats.by_model_version == {"base-0001": 3}
    assert stats.by_user == {TENANT: {"alice": 1, "bob": 1}, "globex": {"zed": 1}}
    assert store.stats(tenant="globex").feedback == 1
    assert stats.as_dict()["pending"] == 3


# --- schema migrations ------------------------------------------------------------------------------


def _add_language_column(conn: sa.Connection) -> None:
    conn.execute(sa.text("ALTER TABLE utterances ADD COLUMN language VARCHAR(16)"))


def test_opening_an_older_schema_version_migrates_it_and_keeps_its_rows(store_url, monkeypatch):
    with FeedbackStore.open(store_url) as old:
        old.add_utterance(make_utterance("u1"))
        submitted = correct(old, "u1")
        old_version = old.schema_version
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, _add_language_column))

    with FeedbackStore.open(store_url) as new:
        assert new.schema_version == old_version + 1
        assert new.pending_feedback(10)[0].feedback == submitted
        with new._engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("utterances")}
            versions = conn.execute(sa.select(store_module.schema_version.c.version)).scalars().all()
    assert "language" in columns
    assert versions == list(range(1, old_version + 2))


def test_a_failing_migration_leaves_the_database_as_it_was(store_url, monkeypatch):
    with FeedbackStore.open(store_url) as old:
        old.add_utterance(make_utterance("u1"))

    def broken(conn: sa.Connection) -> None:
        _add_language_column(conn)
        raise RuntimeError("migration bug")

    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, broken))
    with pytest.raises(RuntimeError, match="migration bug"):
        FeedbackStore.open(store_url)
    monkeypatch.undo()

    with FeedbackStore.open(store_url) as reopened:
        assert reopened.get_utterance("u1", tenant=TENANT).hypothesis == HYPOTHESIS
        with reopened._engine.connect() as conn:
            assert "language" not in {c["name"] for c in sa.inspect(conn).get_columns("utterances")}


def test_replicas_opening_a_new_database_at_once_migrate_it_once(store_url):
    opened, errors = [], []
    barrier = threading.Barrier(4)

    def open_store() -> None:
        barrier.wait()
        try:
            opened.append(FeedbackStore.open(store_url))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == [] and len(opened) == 4
        with opened[0]._engine.connect() as conn:
            versions = conn.execute(sa.select(store_module.schema_version.c.version)).scalars().all()
        assert versions == list(range(1, len(store_module.MIGRATIONS) + 1))
    finally:
        for store in opened:
            store.close()


def test_a_database_from_a_newer_voxloop_is_refused(store_url, monkeypatch):
    FeedbackStore.open(store_url).close()
    monkeypatch.setattr(store_module, "MIGRATIONS", ())
    with pytest.raises(SchemaTooNew, match="upgrade"):
        FeedbackStore.open(store_url)


def test_open_accepts_a_sqlite_path_or_a_sqlite_url(tmp_path):
    for target in (tmp_path / "a" / "feedback.sqlite", f"sqlite:///{tmp_path / 'b.sqlite'}"):
        with FeedbackStore.open(target) as opened:
            opened.add_utterance(make_utterance("u1"))
    assert (tmp_path / "a" / "feedback.sqlite").is_file() and (tmp_path / "b.sqlite").is_file()


# --- rewards and the poisoning guard ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("hypothesis", "reference", "word_reward", "char_reward"),
    [
        ("turn on the light", "turn on the light", 0.0, 0.0),
        ("turn on the night", "turn on the light", -1 / 4, -1 / 17),
        ("turn the light", "turn on the light", -1 / 4, -3 / 17),
        ("", "turn on", -1.0, -1.0),
        ("um turn on", "", -3.0, -10.0),  # empty reference: edits / 1
        ("a b c d", "x", -4.0, -7.0),
    ],
)
def test_rewards_on_known_pairs(hypothesis, reference, word_reward, char_reward):
    assert word_edit_reward(hypothesis, reference) == pytest.approx(word_reward)
    assert char_edit_reward(hypothesis, reference) == pytest.approx(char_reward)


def test_edit_distance_agrees_with_jiwer_and_rapidfuzz_on_random_texts():
    rng = random.Random(0)
    vocabulary = ["the", "kitchen", "light", "lights", "turn", "on", "off", "a"]
    for _ in range(200):
        reference = " ".join(rng.choices(vocabulary, k=rng.randint(1, 8)))
        hypothesis = " ".join(rng.choices(vocabulary, k=rng.randint(1, 8)))
        assert -word_edit_reward(hypothesis, reference) == pytest.approx(jiwer.wer(reference, hypothesis))
        assert -char_edit_reward(hypothesis, reference) == pytest.approx(jiwer.cer(reference, hypothesis))
        assert edit_distance(reference, hypothesis) == Levenshtein.distance(reference, hypothesis)


def test_corrections_sharing_almost_nothing_with_the_hypothesis_are_suspicious():
    assert char_similarity("kitchen", "kitchen") == 1.0
    assert not is_suspicious(HYPOTHESIS, CORRECTION, threshold=0.3)
    assert not is_suspicious("", "what the user actually said", threshold=0.3)  # model heard nothing
    assert is_suspicious(HYPOTHESIS, "buy cheap watches at example dot com", threshold=0.3)
    with pytest.raises(ValueError, match="0..1"):
        is_suspicious(HYPOTHESIS, CORRECTION, threshold=30)
