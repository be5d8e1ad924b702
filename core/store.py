"""The feedback store: decoded utterances, what users said about them, and the trainer's cycles.

Shared by the server (writes utterances, takes feedback) and the trainer (reads pending feedback,
records cycles); both open the same database. SQLAlchemy Core over SQLite by default (one file
under the data dir); every query is portable SQL, so a PostgreSQL URL runs the same code. Only
the connection setup is dialect-specific (SQLite pragmas and BEGIN IMMEDIATE, on connect/begin).

Guarantees (design.md invariants 1, 5, 7):
- Durable before acked: a write method returns only after its transaction committed. On SQLite
  the database runs in WAL mode with `synchronous=FULL`, so each commit is fsynced to the WAL and
  survives a process crash or a power loss; on PostgreSQL a commit is as durable as the server makes
  it (`synchronous_commit = on`, its default). tests/test_store.py runs on both engines.
- Exactly-once consumption: `record_cycle` marks exactly the feedback ids a training cycle used,
  in the transaction that records the cycle, and refuses ids already consumed. Feedback rows are
  never edited after insert (a re-submission supersedes a row, see `submit_feedback`), so the ids
  the trainer read name exactly the texts it trained on.
- Tenancy: utterances are read and corrected only by their own tenant (`PermissionDenied`).

Thread-safe: the engine pools connections; on SQLite, writes are serialized by a lock in this
process and by BEGIN IMMEDIATE (plus busy_timeout) across processes, so a read-then-write
transaction never fails on a lock upgrade; readers never block (WAL snapshots).

Times are timezone-aware UTC datetimes; audio is 16 kHz little-endian int16 mono PCM.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .pcm import PCM16_BYTES_PER_SAMPLE, pcm16_to_float

log = logging.getLogger(__name__)

PCM_SAMPLE_RATE_HZ = 16_000
"""Sample rate the server stores audio at."""
PCM_BYTES_PER_SAMPLE = 2
SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for another process's write lock before failing."""

_BEGIN_OPTION = "voxloop_sqlite_begin"  # execution option: the BEGIN statement a SQLite transaction starts with
_ID_LENGTH = 64
_NAME_LENGTH = 128


# --- errors -------------------------------------------------------------------------------------


class StoreError(RuntimeError):
    """The store cannot do what was asked (see subclasses); the RPC layer maps each to a status."""


class NotFound(StoreError, LookupError):
    """Unknown utterance (or cycle), or an utterance whose audio retention expired. -> NOT_FOUND."""


class UnknownUtterance(NotFound):
    """No utterance has this id (yet: with several replicas, another may still be writing it)."""


class PermissionDenied(StoreError):
    """The utterance belongs to another tenant. -> PERMISSION_DENIED."""


class InvalidFeedback(StoreError, ValueError):
    """Feedback whose fields do not fit its kind or the utterance. -> INVALID_ARGUMENT."""


class AlreadyConsumed(StoreError):
    """A training cycle tried to consume feedback another cycle already consumed."""

    def __init__(self, message: str, feedback_ids: Sequence[int]):
        super().__init__(message)
        self.feedback_ids = tuple(feedback_ids)


class SchemaTooNew(StoreError):
    """The database was migrated by a newer voxloop than this one; upgrade before opening it."""


# --- records ------------------------------------------------------------------------------------


class FeedbackKind(StrEnum):
    CORRECTION = "correction"
    """The user typed the right transcript: reward and a supervised target."""
    ACCEPTANCE = "acceptance"
    """The user saw the transcript and kept it: positive reward, the hypothesis is the target."""
    REJECTION = "rejection"
    """The transcript is wrong, no text given: negative reward, no target."""
    CHOICE = "choice"
    """The user picked alternative `chosen_index` of the n-best shown: a preference."""


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass an aware one, e.g. datetime.now(UTC)")
    return value.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class UtteranceRecord:
    """A finished utterance as the server decoded it."""

    id: str
    """Opaque id the server returned in the final result (e.g. a UUID), at most 64 characters."""
    tenant: str
    user_id: str | None
    """The speaking user, when the stream said or the token implies one."""
    session_id: str | None
    model_version: str
    """The one model version that decoded this utterance (invariant 2)."""
    created_at: datetime
    """When the utterance was finalized (aware; stored as UTC)."""
    duration_s: float
    sample_rate_hz: int
    """Sample rate of `audio` (PCM_SAMPLE_RATE_HZ as the server writes it)."""
    audio: bytes | None
    """Little-endian int16 mono PCM; None once retention expired it (or when read without audio)."""
    hypothesis: str
    """The final transcript shown to the user (normalized text)."""
    confidence: float | None = None
    alternatives: tuple[str, ...] | None = None
    """The n-best transcripts shown, when the client asked for them; `choice` feedback indexes these."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "created_at", _utc(self.created_at))
        if self.alternatives is not None:
            object.__setattr__(self, "alternatives", tuple(self.alternatives))
        if not self.id or len(self.id) > _ID_LENGTH:
            raise ValueError(f"utterance id must be 1..{_ID_LENGTH} characters (got {self.id!r})")
        if not self.tenant:
            raise ValueError("tenant must be non-empty; use the token's tenant (or 'default' in anonymous mode)")
        if self.sample_rate_hz <= 0 or self.duration_s < 0:
            raise ValueError(
                f"sample_rate_hz must be > 0 and duration_s >= 0 (got {self.sample_rate_hz}, {self.duration_s})"
            )
        if self.audio is not None and len(self.audio) % PCM16_BYTES_PER_SAMPLE:
            raise ValueError(f"audio must be int16 PCM: an even number of bytes (got {len(self.audio)})")

    def samples(self) -> np.ndarray:
        """The audio as float32 samples in [-1, 1), shape (n_samples,); raises NotFound once expired."""
        if self.audio is None:
            raise NotFound(f"utterance {self.id!r} has no audio (expired, or read without it)")
        return pcm16_to_float(self.audio)


@dataclass(frozen=True)
class FeedbackRecord:
    """One user's feedback on one utterance. Rows are immutable but for the bookkeeping fields."""

    id: int
    utterance_id: str
    tenant: str
    submitted_by: str
    kind: FeedbackKind
    corrected_text: str | None
    chosen_index: int | None
    reward: float
    flagged: bool
    flag_reason: str | None
    created_at: datetime
    updated_at: datetime
    """Last change of a bookkeeping field (superseded, consumed); created_at until then."""
    superseded_at: datetime | None
    """When a later submission by the same user on the same utterance replaced this one."""
    consumed_by_cycle: int | None


@dataclass(frozen=True)
class PendingFeedback:
    """A feedback item for the trainer, with the utterance (and its audio) it is about."""

    feedback: FeedbackRecord
    utterance: UtteranceRecord


@dataclass(frozen=True)
class CycleRecord:
    id: int
    started_at: datetime
    finished_at: datetime
    outcome: str
    model_version_out: str | None
    stats: dict[str, Any] | None
    feedback_ids: tuple[int, ...]
    """The feedback this cycle consumed (ids since deleted with delete_user_data are gone)."""


@dataclass(frozen=True)
class FeedbackStats:
    """Counts of current feedback (superseded submissions not counted)."""

    utterances: int
    utterances_with_audio: int
    feedback: int
    by_kind: dict[str, int]
    by_tenant: dict[str, int]
    by_model_version: dict[str, int]
    """Keyed by the model version that decoded the utterance the feedback is about."""
    by_user: dict[str, dict[str, int]]
    """tenant -> submitting user -> count."""
    pending: int
    """What the trainer can still use: not consumed, not flagged, audio not expired."""
    pending_flagged: int
    consumed: int
    flagged: int
    cycles: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeletedCounts:
    utterances: int
    feedback: int


# --- schema -------------------------------------------------------------------------------------


class _UTCDateTime(sa.TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out (timestamptz on PostgreSQL, ISO text on SQLite)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        value = _utc(value)
        # SQLite's DATETIME text has no offset; all values are UTC, so they also sort correctly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", _UTCDateTime, nullable=False),
)

utterances = sa.Table(
    "utterances",
    metadata,
    sa.Column("id", sa.String(_ID_LENGTH), primary_key=True),
    sa.Column("tenant", sa.String(_NAME_LENGTH), nullable=False),
    sa.Column("user_id", sa.String(_NAME_LENGTH)),
    sa.Column("session_id", sa.String(_NAME_LENGTH)),
    sa.Column("model_version", sa.String(_NAME_LENGTH), nullable=False),
    sa.Column("created_at", _UTCDateTime, nullable=False),
    sa.Column("duration_s", sa.Float, nullable=False),
    sa.Column("sample_rate_hz", sa.Integer, nullable=False),
    sa.Column("audio", sa.LargeBinary),  # NULL = retention expired
    sa.Column("hypothesis", sa.Text, nullable=False),
    sa.Column("confidence", sa.Float),
    sa.Column("alternatives", sa.JSON(none_as_null=True)),
    sa.Index("ix_utterances_tenant_user", "tenant", "user_id"),
    sa.Index("ix_utterances_created_at", "created_at"),
)

training_cycles = sa.Table(
    "training_cycles",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("started_at", _UTCDateTime, nullable=False),
    sa.Column("finished_at", _UTCDateTime, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("model_version_out", sa.String(_NAME_LENGTH)),
    sa.Column("stats", sa.JSON(none_as_null=True)),
    sqlite_autoincrement=True,  # never reuse a deleted id: ids name what a cycle consumed
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("utterance_id", sa.String(_ID_LENGTH), sa.ForeignKey("utterances.id"), nullable=False),
    sa.Column("tenant", sa.String(_NAME_LENGTH), nullable=False),
    sa.Column("submitted_by", sa.String(_NAME_LENGTH), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("corrected_text", sa.Text),
    sa.Column("chosen_index", sa.Integer),
    sa.Column("reward", sa.Float, nullable=False),
    sa.Column("flagged", sa.Boolean, nullable=False),
    sa.Column("flag_reason", sa.Text),
    sa.Column("created_at", _UTCDateTime, nullable=False),
    sa.Column("updated_at", _UTCDateTime, nullable=False),
    sa.Column("superseded_at", _UTCDateTime),
    sa.Column("consumed_by_cycle", sa.Integer, sa.ForeignKey("training_cycles.id")),
    sa.CheckConstraint("kind IN (" + ", ".join(f"'{k.value}'" for k in FeedbackKind) + ")", name="ck_feedback_kind"),
    sa.Index("ix_feedback_utterance", "utterance_id"),
    sa.Index("ix_feedback_pending", "consumed_by_cycle", "created_at"),
    sa.Index("ix_feedback_tenant_user", "tenant", "submitted_by"),
    sqlite_autoincrement=True,  # a trainer holding id 7 must never meet a different row 7 after a deletion
)
_current = feedback.c.superseded_at.is_(None)
_FEEDBACK_WITH_UTTERANCE = feedback.join(utterances, feedback.c.utterance_id == utterances.c.id)
# At most one current (not superseded) submission per (utterance, user); a partial unique index,
# which SQLite and PostgreSQL both support with the same WHERE clause.
sa.Index(
    "uq_feedback_current",
    feedback.c.utterance_id,
    feedback.c.submitted_by,
    unique=True,
    sqlite_where=_current,
    postgresql_where=_current,
)


def _migrate_v1(conn: Connection) -> None:
    # Creates the tables as defined above. When a later migration changes a table, first freeze
    # the version-1 definition here, so a fresh database still goes v1 -> v2 -> ...
    metadata.create_all(conn, tables=[utterances, training_cycles, feedback])


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_migrate_v1,)
"""Schema history: MIGRATIONS[i] takes a database from version i to i + 1 (append, never edit)."""


MIGRATION_LOCK_KEY = 0x766F786C6F6F70  # "voxloop": the PostgreSQL advisory lock migrations hold
"""Replicas starting at once against a new database must not create the same tables twice: on PostgreSQL
each takes this transaction-scoped advisory lock first (SQLite's BEGIN IMMEDIATE serializes them already)."""


def _apply_migrations(conn: Connection) -> int:
    migrations = MIGRATIONS  # read at call time (tests extend it)
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    metadata.create_all(conn, tables=[schema_version])
    current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
    if current > len(migrations):
        raise SchemaTooNew(
            f"database schema is version {current}, this voxloop knows up to {len(migrations)}: upgrade voxloop"
        )
    for version in range(current + 1, len(migrations) + 1):
        migrations[version - 1](conn)
        conn.execute(sa.insert(schema_version).values(version=version, applied_at=_now()))
        log.info("feedback store: migrated schema to version %d", version)
    return len(migrations)


# --- the store ----------------------------------------------------------------------------------


def _switch_to_wal(cursor: Any) -> str:
    """Ask for WAL and return the journal mode SQLite settled on.

    Switching a new database to WAL needs its exclusive lock, and SQLite answers "database is locked"
    at once, without the busy handler, when another connection holds it (replicas opening the same new
    file together): retry that until the busy timeout instead of failing the open."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _install_sqlite_hooks(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We emit BEGIN ourselves (below): sqlite3's implicit transactions skip SELECTs and
        # cannot start a write transaction up front.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            mode = _switch_to_wal(cursor)
            if mode.lower() != "wal":
                log.warning(
                    "feedback store: SQLite refused WAL (journal_mode=%s); commits stay durable, readers block", mode
                )
            cursor.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit: durable before ack
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get(_BEGIN_OPTION, "BEGIN"))


def _sqlite_url(path: Path | str) -> str:
    if str(path) in ("", ":memory:"):
        raise ValueError("an in-memory SQLite database is not shared between pooled connections; give a file path")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class FeedbackStore:
    """Utterances, feedback and training cycles in one database. Open with `open` or `sqlite`."""

    def __init__(self, engine: Engine):
        """Use `engine` (hooks already installed for SQLite) and migrate its schema to the latest version."""
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        # SQLite takes one writer at a time: queue this process's writers on a lock (blocking, not
        # busy_timeout's sleep-and-retry) and take the database write lock up front with BEGIN
        # IMMEDIATE, which other processes' writers wait for.
        self._write_lock: contextlib.AbstractContextManager = (
            threading.Lock() if self._sqlite else contextlib.nullcontext()
        )
        self._write_engine = engine.execution_options(**{_BEGIN_OPTION: "BEGIN IMMEDIATE"}) if self._sqlite else engine
        with self._write() as conn:
            self.schema_version = _apply_migrations(conn)

    @classmethod
    def open(cls, url_or_path: str | Path) -> FeedbackStore:
        """A SQLAlchemy URL ("postgresql+psycopg://…", "sqlite:///…") or a path to a SQLite file."""
        text = str(url_or_path)
        if "://" not in text:
            return cls.sqlite(text)
        url = sa.make_url(text)
        if url.get_backend_name() == "sqlite":
            return cls.sqlite(url.database or "")
        return cls(sa.create_engine(url, pool_pre_ping=True))

    @classmethod
    def sqlite(cls, path: Path | str) -> FeedbackStore:
        """The SQLite file at `path` (created, with its parent directories, if missing)."""
        engine = sa.create_engine(_sqlite_url(path))
        _install_sqlite_hooks(engine)
        return cls(engine)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction, committed (and on SQLite fsynced) when the block exits normally."""
        with self._write_lock, self._write_engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot, rolled back at exit."""
        with self._engine.connect() as conn:
            yield conn

    # --- utterances ---

    def add_utterance(self, record: UtteranceRecord) -> None:
        self.add_utterances([record])

    def add_utterances(self, records: Iterable[UtteranceRecord]) -> int:
        """Insert utterances in one transaction (the server's background writer batches); returns the count.

        A duplicate id fails the whole batch (ids are unique by construction, so it is a bug).
        """
        rows = [_utterance_row(r) for r in records]
        if not rows:
            return 0
        with self._write() as conn:
            conn.execute(sa.insert(utterances), rows)
        return len(rows)

    def get_utterance(self, utterance_id: str, *, tenant: str, with_audio: bool = True) -> UtteranceRecord:
        """The utterance, as seen by `tenant`.

        Raises NotFound when the id is unknown or its audio expired, PermissionDenied when it
        belongs to another tenant. `with_audio=False` skips loading the blob (audio is then None).
        """
        columns = list(utterances.c) if with_audio else [c for c in utterances.c if c.name != "audio"]
        with self._read() as conn:
            row = conn.execute(
                sa.select(*columns, utterances.c.audio.is_(None).label("expired")).where(
                    utterances.c.id == utterance_id
                )
            ).one_or_none()
        _check_access(row, utterance_id, tenant)
        return _utterance_record(row._mapping)

    # --- feedback ---

    def submit_feedback(
        self,
        utterance_id: str,
        *,
        tenant: str,
        user: str,
        kind: FeedbackKind | str,
        reward: float,
        corrected_text: str | None = None,
        chosen_index: int | None = None,
        flagged: bool = False,
        flag_reason: str | None = None,
    ) -> FeedbackRecord:
        """Record `user`'s feedback on an utterance of their tenant; returns after the commit.

        Idempotent per (utterance, user), latest wins: a submission supersedes the user's current
        one on that utterance (its superseded_at is set; only the newest counts in stats and
        pending_feedback). We insert a new row instead of editing the old one, consumed or not:
        a trainer may have read the old row mid-cycle, and record_cycle must mark consumed the text
        it trained on, not a replacement it never saw; the replacement stays pending for the next
        cycle. Re-submitting identical feedback (a retried RPC) changes nothing and returns the
        current row, even if it was consumed, so a retry is never counted twice.

        Raises NotFound (unknown id, audio expired), PermissionDenied (other tenant's utterance),
        InvalidFeedback (fields that do not fit the kind, chosen_index outside the alternatives).
        """
        kind = _feedback_kind(kind)
        _check_feedback_fields(kind, corrected_text, chosen_index, reward, user)
        content = {
            "kind": kind.value,
            "corrected_text": corrected_text,
            "chosen_index": chosen_index,
            "reward": float(reward),
            "flagged": bool(flagged),
            "flag_reason": flag_reason,
        }
        with self._write() as conn:
            utterance = conn.execute(
                sa.select(utterances.c.tenant, utterances.c.alternatives, utterances.c.audio.is_(None).label("expired"))
                .where(utterances.c.id == utterance_id)
                # Submissions on one utterance queue on its row (PostgreSQL; SQLite has one writer
                # anyway), so two racing first submissions cannot both see "no current feedback".
                .with_for_update()
            ).one_or_none()
            _check_access(utterance, utterance_id, tenant)
            if kind is FeedbackKind.CHOICE and not chosen_index < len(utterance.alternatives or ()):
                raise InvalidFeedback(
                    f"chosen_index {chosen_index} is outside the {len(utterance.alternatives or ())} alternatives "
                    f"shown for utterance {utterance_id!r}"
                )
            current = conn.execute(
                sa.select(feedback)
                .where(feedback.c.utterance_id == utterance_id, feedback.c.submitted_by == user, _current)
                .with_for_update()
            ).one_or_none()
            if current is not None and all(current._mapping[k] == v for k, v in content.items()):
                return _feedback_record(current._mapping)
            now = _now()
            if current is not None:
                conn.execute(
                    sa.update(feedback).where(feedback.c.id == current.id).values(superseded_at=now, updated_at=now)
                )
            row = {
                "utterance_id": utterance_id,
                "tenant": utterance.tenant,
                "submitted_by": user,
                **content,
                "created_at": now,
                "updated_at": now,
                "superseded_at": None,
                "consumed_by_cycle": None,
            }
            row["id"] = conn.execute(sa.insert(feedback).values(row)).inserted_primary_key[0]
        return _feedback_record(row)

    def pending_feedback(
        self, limit: int, *, max_share_per_user: float | None = None, include_flagged: bool = False
    ) -> list[PendingFeedback]:
        """Up to `limit` current, unconsumed feedback items with their utterances, oldest first.

        Only trainable items: feedback on utterances whose audio expired is left out (it stays
        unconsumed, counted nowhere as pending). `max_share_per_user` (0..1] caps what one user
        (tenant, submitted_by) contributes to this batch at max(1, floor(share * limit)) items, their
        oldest; the poisoning guard. Flagged items are left out unless `include_flagged`.
        """
        if limit <= 0:
            raise ValueError(f"limit must be a positive number of items (got {limit})")
        conditions = _pending_conditions(include_flagged)
        order = (feedback.c.created_at, feedback.c.id)
        query = _feedback_rows().where(*conditions)
        if max_share_per_user is not None:
            if not 0.0 < max_share_per_user <= 1.0:
                raise ValueError(f"max_share_per_user must be in (0, 1] (got {max_share_per_user}); 1 means no cap")
            per_user_cap = max(1, math.floor(max_share_per_user * limit))
            ranked = (
                sa.select(
                    feedback.c.id,
                    sa.func.row_number()
                    .over(partition_by=(feedback.c.tenant, feedback.c.submitted_by), order_by=order)
                    .label("rank"),
                )
                .select_from(_FEEDBACK_WITH_UTTERANCE)
                .where(*conditions)
                .subquery()
            )
            query = query.join(ranked, ranked.c.id == feedback.c.id).where(ranked.c.rank <= per_user_cap)
        with self._read() as conn:
            return [_pending_feedback(row) for row in conn.execute(query.order_by(*order).limit(limit)).all()]

    def consumed_feedback(self, limit: int, *, exclude_ids: Iterable[int] = (),
                          keep: Callable[[int], bool] | None = None) -> list[PendingFeedback]:
        """Up to `limit` items earlier cycles consumed that name a text (corrections, acceptances, choices), with
        their utterances, the most recently consumed first: the trainer's rehearsal memory and the gate's
        pool of earlier held-out items.

        Only current, unflagged items whose audio is still stored: a superseded correction, a flagged one,
        an expired utterance or a deleted user's data is never returned. `exclude_ids` leaves some out;
        `keep(feedback_id)` picks among the rest (ids are read first, audio only for the `limit` kept).
        """
        if limit <= 0:
            raise ValueError(f"limit must be a positive number of items (got {limit})")
        named = [FeedbackKind.CORRECTION.value, FeedbackKind.ACCEPTANCE.value, FeedbackKind.CHOICE.value]
        conditions = [_current, feedback.c.consumed_by_cycle.is_not(None), utterances.c.audio.is_not(None),
                      sa.not_(feedback.c.flagged), feedback.c.kind.in_(named),
                      feedback.c.id.not_in([int(i) for i in exclude_ids])]
        order = (feedback.c.consumed_by_cycle.desc(), feedback.c.id.desc())
        with self._read() as conn:
            if keep is None:
                query = _feedback_rows().where(*conditions).order_by(*order).limit(limit)
                return [_pending_feedback(row) for row in conn.execute(query).all()]
            ids_query = sa.select(feedback.c.id).select_from(_FEEDBACK_WITH_UTTERANCE).where(*conditions)
            chosen = []
            for feedback_id in conn.execute(ids_query.order_by(*order)).scalars():
                if keep(feedback_id):
                    chosen.append(feedback_id)
                    if len(chosen) == limit:
                        break
            if not chosen:
                return []
            rows = conn.execute(_feedback_rows().where(feedback.c.id.in_(chosen)).order_by(*order)).all()
            return [_pending_feedback(row) for row in rows]

    def pending_count(self, *, include_flagged: bool = False) -> int:
        """How many items pending_feedback could return with no limit (the trainer's wake-up test)."""
        query = (
            sa.select(sa.func.count())
            .select_from(feedback.join(utterances, feedback.c.utterance_id == utterances.c.id))
            .where(*_pending_conditions(include_flagged))
        )
        with self._read() as conn:
            return conn.execute(query).scalar_one()

    # --- training cycles ---

    def record_cycle(
        self,
        feedback_ids: Iterable[int],
        outcome: str,
        model_version_out: str | None = None,
        stats: Mapping[str, Any] | None = None,
        *,
        started_at: datetime | None = None,
    ) -> int:
        """Record a finished training cycle and mark exactly `feedback_ids` consumed by it; one transaction.

        Either the cycle row and every mark commit together, or nothing does (invariant 5): a
        trainer killed before this returns finds its items still pending. Raises AlreadyConsumed,
        changing nothing, if any id was consumed by an earlier cycle (no double counting). Ids that
        no longer exist (deleted by delete_user_data mid-cycle) are skipped with a warning.
        `outcome` is how the cycle ended: a trainer/cycle.py CycleOutcome ("published", "gated", "skipped").
        """
        ids = [int(i) for i in feedback_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("feedback_ids contains duplicates; pass each consumed item once")
        if not outcome:
            raise ValueError("outcome must be non-empty, e.g. 'published' or 'gated'")
        finished_at = _now()
        with self._write() as conn:
            cycle_id = conn.execute(
                sa.insert(training_cycles).values(
                    started_at=started_at or finished_at,
                    finished_at=finished_at,
                    outcome=outcome,
                    model_version_out=model_version_out,
                    stats=dict(stats) if stats is not None else None,
                )
            ).inserted_primary_key[0]
            if not ids:
                return cycle_id
            found = dict(
                conn.execute(
                    sa.select(feedback.c.id, feedback.c.consumed_by_cycle)
                    .where(feedback.c.id.in_(ids))
                    .order_by(feedback.c.id)  # rows locked in one order: racing trainers cannot deadlock
                    .with_for_update()
                ).all()
            )
            consumed = sorted(i for i, cycle in found.items() if cycle is not None)
            if consumed:
                raise AlreadyConsumed(
                    f"{len(consumed)} feedback items were already consumed (ids {consumed[:10]}…); "
                    "read the batch again with pending_feedback",
                    consumed,
                )
            missing = sorted(set(ids) - found.keys())
            if missing:
                log.warning(
                    "cycle %d: %d feedback ids no longer exist (user data deleted): %s",
                    cycle_id,
                    len(missing),
                    missing[:10],
                )
            marked = conn.execute(
                sa.update(feedback)
                .where(feedback.c.id.in_(list(found)), feedback.c.consumed_by_cycle.is_(None))
                .values(consumed_by_cycle=cycle_id, updated_at=finished_at)
            ).rowcount
            if marked != len(found):  # only if a concurrent writer slipped past the row locks
                raise AlreadyConsumed(f"expected to mark {len(found)} feedback items, marked {marked}", [])
        log.info("cycle %d (%s): consumed %d feedback items", cycle_id, outcome, len(found))
        return cycle_id

    def get_cycle(self, cycle_id: int) -> CycleRecord:
        with self._read() as conn:
            row = conn.execute(sa.select(training_cycles).where(training_cycles.c.id == cycle_id)).one_or_none()
            if row is None:
                raise NotFound(f"no training cycle {cycle_id}")
            ids = conn.execute(
                sa.select(feedback.c.id).where(feedback.c.consumed_by_cycle == cycle_id).order_by(feedback.c.id)
            ).scalars()
            return CycleRecord(**row._mapping, feedback_ids=tuple(ids))

    def latest_cycle(self) -> CycleRecord | None:
        """The most recently recorded cycle, or None before the first."""
        with self._read() as conn:
            cycle_id = conn.execute(sa.select(sa.func.max(training_cycles.c.id))).scalar()
        return None if cycle_id is None else self.get_cycle(cycle_id)

    # --- statistics ---

    def stats(self, *, tenant: str | None = None) -> FeedbackStats:
        """Counts for `voxloop feedback stats`: of one tenant, or of all when tenant is None."""
        feedback_filter = [_current] + ([feedback.c.tenant == tenant] if tenant is not None else [])
        utterance_filter = [utterances.c.tenant == tenant] if tenant is not None else []
        joined = feedback.join(utterances, feedback.c.utterance_id == utterances.c.id)

        def grouped(conn: Connection, *keys: sa.ColumnElement) -> list[sa.Row]:
            query = sa.select(*keys, sa.func.count()).select_from(joined).where(*feedback_filter).group_by(*keys)
            return conn.execute(query).all()

        def count(conn: Connection, table: sa.FromClause, *conditions: sa.ColumnElement) -> int:
            return conn.execute(sa.select(sa.func.count()).select_from(table).where(*conditions)).scalar_one()

        with self._read() as conn:
            by_user: dict[str, dict[str, int]] = {}
            for tenant_name, user, n in grouped(conn, feedback.c.tenant, feedback.c.submitted_by):
                by_user.setdefault(tenant_name, {})[user] = n
            return FeedbackStats(
                utterances=count(conn, utterances, *utterance_filter),
                utterances_with_audio=count(conn, utterances, *utterance_filter, utterances.c.audio.is_not(None)),
                feedback=count(conn, feedback, *feedback_filter),
                by_kind=dict(grouped(conn, feedback.c.kind)),
                by_tenant=dict(grouped(conn, feedback.c.tenant)),
                by_model_version=dict(grouped(conn, utterances.c.model_version)),
                by_user=by_user,
                pending=count(conn, joined, *feedback_filter, *_pending_conditions(include_flagged=False)),
                pending_flagged=count(
                    conn, joined, *feedback_filter, *_pending_conditions(include_flagged=True), feedback.c.flagged
                ),
                consumed=count(conn, feedback, *feedback_filter, feedback.c.consumed_by_cycle.is_not(None)),
                flagged=count(conn, feedback, *feedback_filter, feedback.c.flagged),
                cycles=count(conn, training_cycles),
            )

    # --- retention and deletion ---

    def expire_audio(self, older_than_s: float) -> int:
        """Delete the audio of utterances created more than `older_than_s` seconds ago; returns how many.

        Kept: the row with its hypothesis, alternatives, model version and timestamps, and all
        feedback, so stats and the record of past cycles stay whole. An utterance without audio
        counts as expired: new feedback on it is NotFound and its pending feedback is no longer
        offered to the trainer. Erasing a user's texts too is delete_user_data.
        """
        if older_than_s < 0:
            raise ValueError(f"older_than_s must be >= 0 (got {older_than_s})")
        cutoff = _now() - timedelta(seconds=older_than_s)
        with self._write() as conn:
            expired = conn.execute(
                sa.update(utterances)
                .where(utterances.c.created_at < cutoff, utterances.c.audio.is_not(None))
                .values(audio=None)
            ).rowcount
        if expired:
            log.info("feedback store: expired the audio of %d utterances older than %.0f s", expired, older_than_s)
        return expired

    def delete_user_data(self, tenant: str, user_id: str) -> DeletedCounts:
        """Delete a user's utterances (with all feedback on them) and all feedback they submitted.

        Consumed feedback goes too; cycles keep their stats. Models already trained on it are not
        changed by this.
        """
        own_utterances = sa.select(utterances.c.id).where(
            utterances.c.tenant == tenant, utterances.c.user_id == user_id
        )
        their_feedback = sa.and_(feedback.c.tenant == tenant, feedback.c.submitted_by == user_id)
        with self._write() as conn:
            # Lock the utterances involved before any feedback row, the order submit_feedback
            # takes, so a concurrent submission cannot deadlock with this on PostgreSQL.
            conn.execute(
                sa.select(utterances.c.id)
                .where(
                    sa.or_(
                        utterances.c.id.in_(own_utterances),
                        utterances.c.id.in_(sa.select(feedback.c.utterance_id).where(their_feedback)),
                    )
                )
                .with_for_update()
            ).all()
            deleted_feedback = conn.execute(
                sa.delete(feedback).where(sa.or_(their_feedback, feedback.c.utterance_id.in_(own_utterances)))
            ).rowcount
            deleted_utterances = conn.execute(
                sa.delete(utterances).where(utterances.c.tenant == tenant, utterances.c.user_id == user_id)
            ).rowcount
        log.info(
            "feedback store: deleted %d utterances and %d feedback items of user %r (tenant %r)",
            deleted_utterances,
            deleted_feedback,
            user_id,
            tenant,
        )
        return DeletedCounts(utterances=deleted_utterances, feedback=deleted_feedback)


# --- helpers ------------------------------------------------------------------------------------


def _feedback_rows() -> sa.Select:
    """Feedback rows with their utterance's columns (labelled u_<name>): what _pending_feedback reads."""
    return sa.select(*feedback.c, *(c.label(f"u_{c.name}") for c in utterances.c)).select_from(_FEEDBACK_WITH_UTTERANCE)


def _pending_feedback(row: sa.Row) -> PendingFeedback:
    """A _feedback_rows row -> PendingFeedback."""
    mapping = row._mapping
    utterance = {c.name: mapping[f"u_{c.name}"] for c in utterances.c}
    return PendingFeedback(_feedback_record(mapping), _utterance_record(utterance))


def _pending_conditions(include_flagged: bool) -> list[sa.ColumnElement]:
    conditions = [_current, feedback.c.consumed_by_cycle.is_(None), utterances.c.audio.is_not(None)]
    if not include_flagged:
        conditions.append(sa.not_(feedback.c.flagged))
    return conditions


def _check_access(row: sa.Row | None, utterance_id: str, tenant: str) -> None:
    if row is None:
        raise UnknownUtterance(f"no utterance {utterance_id!r}")
    if row.tenant != tenant:
        raise PermissionDenied(f"utterance {utterance_id!r} belongs to another tenant")
    if row.expired:
        raise NotFound(f"utterance {utterance_id!r} has expired (its audio was deleted by retention)")


def _feedback_kind(kind: FeedbackKind | str) -> FeedbackKind:
    try:
        return FeedbackKind(kind)
    except ValueError:
        raise InvalidFeedback(f"unknown feedback kind {kind!r}; use one of {[k.value for k in FeedbackKind]}") from None


def _check_feedback_fields(
    kind: FeedbackKind, corrected_text: str | None, chosen_index: int | None, reward: float, user: str
) -> None:
    if not user:
        raise InvalidFeedback("user must be non-empty; anonymous mode should submit as a fixed user name")
    if not math.isfinite(reward):
        raise InvalidFeedback(f"reward must be finite (got {reward})")
    if (kind is FeedbackKind.CORRECTION) != (corrected_text is not None):
        raise InvalidFeedback(f"corrected_text is required for a correction and only for one (kind={kind.value})")
    if (kind is FeedbackKind.CHOICE) != (chosen_index is not None):
        raise InvalidFeedback(f"chosen_index is required for a choice and only for one (kind={kind.value})")
    if chosen_index is not None and chosen_index < 0:
        raise InvalidFeedback(f"chosen_index must be >= 0 (got {chosen_index})")


def _utterance_row(record: UtteranceRecord) -> dict[str, Any]:
    row = {f.name: getattr(record, f.name) for f in _UTTERANCE_FIELDS}
    row["alternatives"] = list(record.alternatives) if record.alternatives is not None else None
    return row


def _utterance_record(mapping: Mapping[str, Any]) -> UtteranceRecord:
    values = {f.name: mapping.get(f.name) for f in _UTTERANCE_FIELDS}
    return UtteranceRecord(**values)


def _feedback_record(mapping: Mapping[str, Any]) -> FeedbackRecord:
    values = {name: mapping[name] for name in FeedbackRecord.__dataclass_fields__}
    values["kind"] = FeedbackKind(values["kind"])
    values["flagged"] = bool(values["flagged"])
    return FeedbackRecord(**values)


_UTTERANCE_FIELDS = tuple(UtteranceRecord.__dataclass_fields__.values())
