"""Finals of a two-pass (Whisper) version: endpointed utterances queue here and share decoder calls.

`second_pass_threads` workers each take what is queued when they come free and decode it in one call:
greedy one-best finals (the default) as a batch whose decoder steps run in lockstep
(WhisperSecondPass.transcribe_batch), a final asking for an n-best or a beam-search version's final on
its own. Nothing waits for a batch to fill: under light load a final runs alone at once; under load
finals queue while the threads work and the next call shares the output projection's 20 M weights
(docs/benchmarks.md: a 7 s utterance's final costs 267 ms alone, 185 ms each in fours).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..core.decoder import Hypothesis
from ..core.metrics import observe_second_pass
from ..core.model import MODEL_SAMPLE_RATE_HZ
from ..core.whisper_decoder import WhisperSecondPass

log = logging.getLogger(__name__)


class FinalsStopped(RuntimeError):
    """The version's finals were closed (server stopping, model unloaded) before this one ran."""


@dataclass(eq=False)
class _Final:
    audio: np.ndarray  # float32 (S,) at 16 kHz
    start_s: float
    max_alternatives: int
    future: asyncio.Future

    @property
    def batchable(self) -> bool:
        return self.max_alternatives == 1


@dataclass
class FinalsStats:
    """Counters for tests and benchmarks: how well finals shared decoder calls."""

    calls: int = 0
    finals: int = 0
    largest: int = 0


class FinalsQueue:
    """The second pass of one loaded version. Create it in the event loop that will use it; `start()` it."""

    def __init__(self, second_pass: WhisperSecondPass, *, threads: int, max_batch: int, version: str):
        self.second_pass = second_pass
        self.max_batch = max_batch if second_pass.settings.beam_size == 1 else 1
        self._threads = threads
        self.stats = FinalsStats()
        self._pending: deque[_Final] = deque()
        self._arrived = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"final-{version}")
        self._workers: list[asyncio.Task] = []
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

    def _take(self) -> list[_Final]:
        """The oldest queued final, with the other batchable ones queued behind it when it is batchable."""
        first = self._pending.popleft()
        if not first.batchable:
            return [first]
        taken, kept = [first], deque()
        while self._pending:
            final = self._pending.popleft()
            (taken if final.batchable and len(taken) < self.max_batch else kept).append(final)
        self._pending = kept
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._arrived:
                await self._arrived.wait_for(lambda: bool(self._pending))
                batch = [final for final in self._take() if not final.future.done()]  # done: stream cancelled
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._decode, batch)
            except Exception as e:  # fail this batch's finals, keep serving the others
                log.exception("second pass of %s failed on %d utterance(s)", self._version, len(batch))
                for final in batch:
                    if not final.future.done():
                        final.future.set_exception(e)
                continue
            elapsed = time.perf_counter() - started
            self.stats.calls += 1
            self.stats.finals += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            for final, hypotheses in zip(batch, results, strict=True):
                observe_second_pass(elapsed, len(final.audio) / MODEL_SAMPLE_RATE_HZ)
                if not final.future.done():
                    final.future.set_result(hypotheses)

    def _decode(self, batch: list[_Final]) -> list[tuple[Hypothesis, ...]]:
        """In a worker thread: one n-best final alone, or greedy one-best finals together."""
        if len(batch) == 1:
            final = batch[0]
            return [self.second_pass.transcribe(final.audio, final.start_s, final.max_alternatives)]
        best = self.second_pass.transcribe_batch([(final.audio, final.start_s) for final in batch])
        return [(hypothesis,) for hypothesis in best]
