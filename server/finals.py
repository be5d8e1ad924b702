"""Finals of a two-pass (Whisper) version: endpointed utterances share the decoder's calls.

A greedy one-best final (the default) is encoded as soon as it arrives, on one of the version's
`second_pass_threads` threads, then queues for the decoder; `second_pass_threads` decode workers each
take a share of what is queued when they come free and run it in lockstep
(WhisperSecondPass.decode_batch): one decoder call per step for all, so the output projection's 20 M
weights are read once per step instead of once per final. Nothing waits for a batch to fill: under
light load a final is decoded alone at once; under load finals queue while the workers decode, and the
next call takes them together (docs/benchmarks.md: a 7 s utterance's final costs 267 ms alone, 185 ms
each in fours). A final asking for an n-best, and every final of a beam-search version, is decoded on
its own.
"""

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
from ..core.metrics import observe_second_pass
from ..core.model import MODEL_SAMPLE_RATE_HZ
from ..core.whisper_decoder import EncodedUtterance, WhisperSecondPass

log = logging.getLogger(__name__)


class FinalsStopped(RuntimeError):
    """The version's finals were closed (server stopping, model unloaded) before this one ran."""


@dataclass
class FinalsStats:
    """Counters for tests and benchmarks: how well finals shared decoder calls."""

    calls: int = 0
    finals: int = 0
    largest: int = 0


@dataclass(eq=False)
class _Queued:
    utterance: EncodedUtterance
    future: asyncio.Future


class FinalsQueue:
    """The second pass of one loaded version. Create it in the event loop that will use it; `start()` it."""

    def __init__(self, second_pass: WhisperSecondPass, *, threads: int, max_batch: int, version: str):
        self.second_pass = second_pass
        self.max_batch = max_batch
        self.stats = FinalsStats()
        self._threads = threads
        self._pending: deque[_Queued] = deque()
        self._arrived = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"final-{version}")
        self._workers: list[asyncio.Task] = []
        self._idle_workers = 0
        self._closed = False
        self._version = version

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._run(), name=f"finals-{self._version}-{i}")
                         for i in range(self._threads)]

    async def transcribe(self, audio: np.ndarray, start_s: float, max_alternatives: int) -> tuple[Hypothesis, ...]:
        """One endpointed utterance's n-best (best first)."""
        if self._closed or not self._workers:
            raise FinalsStopped("the server is stopping; retry on another replica")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            if max_alternatives > 1 or self.second_pass.settings.beam_size != 1:
                hypotheses = await loop.run_in_executor(self._executor, self.second_pass.transcribe,
                                                        audio, start_s, max_alternatives)
            else:
                utterance = await loop.run_in_executor(self._executor, self.second_pass.encoded, audio, start_s)
                hypotheses = await self._decoded(utterance)
        except RuntimeError as e:
            if self._closed:  # the executor was shut down under it
                raise FinalsStopped("the server is stopping; retry on another replica") from e
            raise
        observe_second_pass(time.perf_counter() - started, len(audio) / MODEL_SAMPLE_RATE_HZ)
        return hypotheses

    async def _decoded(self, utterance: EncodedUtterance) -> tuple[Hypothesis, ...]:
        if self._closed:
            raise FinalsStopped("the server is stopping; retry on another replica")
        future = asyncio.get_running_loop().create_future()
        async with self._arrived:
            self._pending.append(_Queued(utterance, future))
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
            queued = self._pending.popleft()
            if not queued.future.done():
                queued.future.set_exception(FinalsStopped("the server is stopping; retry on another replica"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> list[_Queued]:
        """The oldest queued finals: an even share among the idle workers (this one included), so no
        worker decodes a long batch while another waits with nothing to do."""
        share = min(self.max_batch, math.ceil(len(self._pending) / (self._idle_workers + 1)))
        return [self._pending.popleft() for _ in range(share)]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._arrived:
                self._idle_workers += 1
                try:
                    await self._arrived.wait_for(lambda: bool(self._pending))
                finally:
                    self._idle_workers -= 1
                batch = [queued for queued in self._take() if not queued.future.done()]  # done: stream cancelled
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.second_pass.decode_batch,
                                                     [queued.utterance for queued in batch])
            except Exception as e:  # fail this batch's finals, keep serving the others
                if not self._closed:
                    log.exception("second pass of %s failed on %d utterance(s)", self._version, len(batch))
                for queued in batch:
                    if not queued.future.done():
                        queued.future.set_exception(e)
                continue
            self.stats.calls += 1
            self.stats.finals += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            for queued, hypothesis in zip(batch, results, strict=True):
                if not queued.future.done():
                    queued.future.set_result((hypothesis,))
