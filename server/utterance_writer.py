"""Finished utterances to the feedback store, off the streaming path: a bounded queue and one writer thread.

The stream only enqueues (never blocks on the database): `offer` is a non-blocking put, and when the
queue is full the record is dropped and counted (`dropped`) while the final still goes to the client.
The writer thread takes what is queued (up to `batch_size`) and inserts it in one transaction.

So a final reaches the client before its utterance is durable: from `offer` to the commit (measured
as voxloop_store_write_lag_seconds; a commit takes ~5 ms for one utterance, ~70 ms for a batch of
64 on a busy 2-core VM) a crash that runs no shutdown path (SIGKILL, OOM kill, power loss) loses the
utterance, and a correction of it then gets NOT_FOUND. Waiting for the commit before sending each
final would add that commit (an fsync) to every final's latency and make recognition stall whenever
the store is slow or down; the transcript is the product, the stored utterance is for learning
(README, "Durability").

An id returned to a client must be correctable right away, though its row may still be queued:
`wait_written(id, timeout_s)` blocks until the writer has committed it (or it is not queued at all).
Feedback calls it before reading the store, so a fast correction waits a few ms instead of seeing
NOT_FOUND; only a dropped record (queue full, or a failed insert) stays NOT_FOUND.

`close()` drains the queue, so nothing already handed to the writer is lost on a graceful stop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from ..core.metrics import STORE_WRITE_LAG_SECONDS, UTTERANCES_DROPPED
from ..core.store import UtteranceRecord
from .auth import DEFAULT_TENANT
from .stream import FinishedUtterance

log = logging.getLogger(__name__)

_CLOSE = object()  # queue sentinel: drain what is before it, then stop


def utterance_record(utterance: FinishedUtterance) -> UtteranceRecord:
    """The store's row for a finished utterance (int16 audio -> little-endian PCM bytes)."""
    return UtteranceRecord(
        id=utterance.utterance_id, tenant=utterance.tenant or DEFAULT_TENANT, user_id=utterance.user_id or None,
        session_id=utterance.session_id or None, model_version=utterance.model_version,
        created_at=utterance.created_at, duration_s=utterance.duration_s, sample_rate_hz=utterance.sample_rate_hz,
        audio=utterance.audio.astype("<i2").tobytes(), hypothesis=utterance.transcript,
        confidence=float(utterance.confidence), alternatives=utterance.alternatives,
    )


class UtteranceWriter:
    """A bounded queue of utterance records and the thread that batch-inserts them.

    `add_utterances` is the store's batch insert (FeedbackStore.add_utterances), injected so tests
    can slow it down.
    """

    def __init__(self, add_utterances: Callable[[list[UtteranceRecord]], object], *, max_queued: int,
                 batch_size: int):
        self._add_utterances = add_utterances
        self._batch_size = batch_size
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._pending: set[str] = set()  # ids offered and not yet committed (or given up)
        self._changed = threading.Condition()
        self.dropped = 0
        """Records not stored: the queue was full, or their insert failed (also voxloop_store_writes_dropped_total)."""
        self.written = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="utterance-writer", daemon=True)
        self._thread.start()

    def offer(self, utterance: FinishedUtterance) -> bool:
        """Queue an utterance without blocking; False (and counted in `dropped`) when the queue is full."""
        record = utterance_record(utterance)
        with self._changed:
            if self._closed:
                self.dropped += 1
                UTTERANCES_DROPPED.inc()
                log.warning("utterance %s not stored: the writer is closed", record.id)
                return False
            self._pending.add(record.id)
        try:
            self._queue.put_nowait((record, time.monotonic()))
        except queue.Full:
            with self._changed:
                self._pending.discard(record.id)
                self.dropped += 1
            UTTERANCES_DROPPED.inc()
            log.warning("utterance %s not stored: the writer's queue is full (%d queued; raise "
                        "utterance_queue_size or check the store's latency)", record.id, self._queue.maxsize)
            return False
        return True

    def wait_written(self, utterance_id: str, timeout_s: float) -> bool:
        """Wait until `utterance_id` is no longer queued; True unless the timeout passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: utterance_id not in self._pending, timeout_s)

    def wait_all_written(self, timeout_s: float) -> bool:
        """Wait until nothing offered so far is still queued; True unless the timeout passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending, timeout_s)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        """Write everything queued, then stop the thread. Idempotent."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_CLOSE)  # blocking: the writer is draining, a slot frees up
        self._thread.join()
        log.info("utterance writer closed: %d written, %d dropped", self.written, self.dropped)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]  # blocks: no polling
            while len(batch) < self._batch_size and batch[-1] is not _CLOSE:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = batch[-1] is _CLOSE
            queued = [item for item in batch if item is not _CLOSE]  # (record, monotonic time it was queued)
            if queued:
                self._write(queued)
            if closing:
                return

    def _write(self, queued: list[tuple[UtteranceRecord, float]]) -> None:
        records = [record for record, _ in queued]
        written = 0
        try:
            self._add_utterances(records)
            written = len(records)
            committed_at = time.monotonic()
            for _, queued_at in queued:
                STORE_WRITE_LAG_SECONDS.observe(committed_at - queued_at)
        except Exception:
            # One bad row (a duplicate id is a bug) fails the batch: save the others one by one.
            log.exception("storing %d utterances failed; retrying them one by one", len(records))
            for record, queued_at in queued:
                try:
                    self._add_utterances([record])
                    written += 1
                    STORE_WRITE_LAG_SECONDS.observe(time.monotonic() - queued_at)
                except Exception:
                    log.exception("utterance %s not stored", record.id)
        with self._changed:
            self.written += written
            self.dropped += len(records) - written
            self._pending.difference_update(r.id for r in records)
            self._changed.notify_all()
        UTTERANCES_DROPPED.inc(len(records) - written)


__all__ = ["UtteranceWriter", "utterance_record"]
