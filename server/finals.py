"""Finals of a two-pass (Whisper) version, and what happens when they back up.

Finals queue here; `second_pass_threads` workers take them. A final is decoded alone by the version's
own search (its card's `beam_size`: greedy or a beam), so it equals the offline decode of its utterance.
When finals back up (a worker comes free and more are queued than there are workers: many streams ended
in the same moment), the worker takes its share of the backlog (at most 1 / second_pass_threads of it,
and `second_pass_max_batch`) and decodes those one-best finals greedily together
(WhisperSecondPass.transcribe_batch): each utterance encoded on its own, the decoder stepping in
lockstep, one call per step for all, so the output projection's 20 M weights and the padding states'
keys and values are read once per step instead of once per final. While such a batch runs the backlog
is not over: a final another worker takes then, even alone, is decoded greedily too (a beam costs 2-3
times as much, and the burst's last finals would wait for it); and a final decoding alone with a beam
when others start waiting finishes its best beam greedily on one row (WhisperSecondPass.beam_search's
`hurry`): the finals of a burst do not wait behind beam searches begun just before it. A backlog's
finals trade bit-equality with the offline decode (and a beam's accuracy) for latency, as a loaded speech service
should; they are counted (voxloop_second_pass_backlog_finals_total). `second_pass_max_batch` = 1 turns
that off. A final asking for an n-best is always decoded on its own. Figures: docs/benchmarks.md,
"Finals in batches"."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..core.decoder import Hypothesis
from ..core.metrics import SECOND_PASS_BACKLOG_FINALS, observe_second_pass
from ..core.model import MODEL_SAMPLE_RATE_HZ
from ..core.whisper_decoder import WhisperSecondPass

log = logging.getLogger(__name__)


class FinalsStopped(RuntimeError):
    """The version's finals were closed (server stopping, model unloaded) before this one ran."""


@dataclass
class FinalsStats:
    """Counters for tests and benchmarks: how well finals shared decoder calls."""

    calls: int = 0
    finals: int = 0
    largest: int = 0
    backlog_finals: int = 0
    """Finals decoded greedily in a batch because finals were backing up."""


@dataclass(eq=False)
class _Final:
    audio: np.ndarray  # float32 (S,) at 16 kHz
    start_s: float
    max_alternatives: int
    future: asyncio.Future

    @property
    def batchable(self) -> bool:
        return self.max_alternatives == 1


class FinalsQueue:
    """The second pass of one loaded version. Create it in the event loop that will use it; `start()` it."""

    def __init__(self, second_pass: WhisperSecondPass, *, threads: int, max_batch: int, version: str):
        self.second_pass = second_pass
        self.max_batch = max_batch
        self.stats = FinalsStats()
        self._threads = threads
        self._pending: deque[_Final] = deque()
        self._arrived = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"final-{version}")
        self._workers: list[asyncio.Task] = []
        self._backlog_batches = 0  # backlog batches being decoded now
        self._closed = False
        self._version = version

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._run(), name=f"finals-{self._version}-{i}")
                         for i in range(self._threads)]

    async def transcribe(self, audio: np.ndarray, start_s: float, max_alternatives: int) -> tuple[Hypothesis, ...]:
        """One endpointed utterance's n-best (best first), decoded by the next free worker."""
        if self._closed or not self._workers:
            raise FinalsStopped("the server is stopping; retry on another replica")
        future = asyncio.get_running_loop().create_future()
        async with self._arrived:
            self._pending.append(_Final(audio, start_s, max_alternatives, future))
            self._arrived.notify()
        return await future

    async def close(self) -> None:
        """Stop the workers and fail what is still queued."""
        self._closed = True
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while self._pending:
            final = self._pending.popleft()
            if not final.future.done():
                final.future.set_exception(FinalsStopped("the server is stopping; retry on another replica"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> tuple[list[_Final], bool]:
        """(finals, greedily together): the oldest queued final alone, by the version's own search, or, when
        finals back up (more queued than workers, or a backlog batch still running), it and the one-best
        finals behind it, greedily: at most max_batch and an even share among the threads."""
        first = self._pending.popleft()
        backlog = len(self._pending) >= self._threads or self._backlog_batches > 0
        if not first.batchable or self.max_batch == 1 or not backlog:
            return [first], False
        share = min(self.max_batch, math.ceil((len(self._pending) + 1) / self._threads))
        taken, kept = [first], deque()
        while self._pending:
            final = self._pending.popleft()
            (taken if final.batchable and len(taken) < share else kept).append(final)
        self._pending = kept
        return taken, True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._arrived:
                await self._arrived.wait_for(lambda: bool(self._pending))
                taken, together = self._take()
                batch = [final for final in taken if not final.future.done()]  # done: stream cancelled
            if not batch:
                continue
            started = time.perf_counter()
            self._backlog_batches += together
            try:
                results, backlog = await loop.run_in_executor(self._executor, self._decode, batch, together)
            except Exception as e:  # fail this batch's finals, keep serving the others
                if not self._closed:
                    log.exception("second pass of %s failed on %d utterance(s)", self._version, len(batch))
                error = FinalsStopped("the server is stopping; retry on another replica") if self._closed else e
                for final in batch:
                    if not final.future.done():
                        final.future.set_exception(error)
                continue
            finally:
                self._backlog_batches -= together
            self.stats.calls += 1
            self.stats.finals += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            if backlog:
                self.stats.backlog_finals += len(batch)
                SECOND_PASS_BACKLOG_FINALS.inc(len(batch))
            elapsed = time.perf_counter() - started
            for final, hypotheses in zip(batch, results, strict=True):
                observe_second_pass(elapsed, len(final.audio) / MODEL_SAMPLE_RATE_HZ)
                if not final.future.done():
                    final.future.set_result(hypotheses)

    def _decode(self, batch: list[_Final], together: bool) -> tuple[list[tuple[Hypothesis, ...]], bool]:
        """In a worker thread: one final alone (the version's search, its n-best; hurried when finals start
        waiting), or a backlog's one-best finals greedily together. -> (their n-bests, decoded as a backlog)."""
        if together:
            best = self.second_pass.transcribe_batch([(final.audio, final.start_s) for final in batch])
            return [(hypothesis,) for hypothesis in best], True
        hurried = False

        def hurry() -> bool:  # a final is waiting: every worker is busy
            nonlocal hurried
            hurried = hurried or bool(self._pending)
            return hurried

        final = batch[0]
        hypotheses = self.second_pass.transcribe(final.audio, final.start_s, final.max_alternatives,
                                                 hurry=hurry if self.max_batch > 1 else None)
        return [hypotheses], hurried
