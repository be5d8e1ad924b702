"""Cross-stream batching: one shared worker per loaded model runs many streams' chunks in one call.

Streams submit (audio chunk, state) and await a future. The worker takes the oldest request and the
others of the same length (up to `max_batch_size`); if fewer are queued than there are open streams
it waits up to `max_wait_s` for more, then stacks the rows, runs onnxruntime in its own named
executor thread (the session releases the GIL, so the event loop keeps moving audio meanwhile),
splits the outputs per stream and resolves the futures back on the event loop.

Why: a chunk of one stream is a tiny matrix product whose cost is dominated by per-call overhead;
100 real-time streams send 500 chunks a second, which fit on 2 cores only when they share calls.
Requests queue up while a batch runs, so under load batches form without waiting at all.
(The pattern of sherpa-onnx's streaming_server.py, without its sleep-polling consumer.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from ..core.decoder import CtcGreedyDecoder, DecoderFactory, Hypothesis, UtteranceDecoder
from ..core.metrics import observe_inference
from ..core.model import BLANK_ID, ModelSpec, OnnxModel, State
from ..core.whisper_decoder import WhisperSecondPass
from .finals import FinalsQueue, FinalsStopped
from .segments import PauseSegments

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The batcher was closed (server stopping, model unloaded) before a request ran."""


class InferenceError(RuntimeError):
    """The model failed on a batch (a bug or a broken model; the batcher logged it)."""


@dataclass(eq=False)
class _Request:
    audio: np.ndarray  # (S,)
    state: State  # one row per input
    future: asyncio.Future


@dataclass
class BatchStats:
    """Counters for tests and metrics: how well chunks were batched."""

    calls: int = 0
    rows: int = 0
    largest: int = 0


class Batcher:
    """The batching worker of one model. Create it in the event loop that will use it; `start()` it."""

    def __init__(self, model: OnnxModel, *, max_batch_size: int, max_wait_s: float,
                 open_streams: Callable[[], int] = lambda: 1):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._pending: deque[_Request] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"onnx-{model.version}")
        self._worker: asyncio.Task | None = None
        self._closed = False
        # How many streams may send a chunk soon: a batch waits for them only while fewer are queued.
        self._open_streams = open_streams

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.model.version}")
        self._worker.add_done_callback(self._worker_ended)

    def _worker_ended(self, worker: asyncio.Task) -> None:
        if worker.cancelled():
            return
        # Only a bug gets here (the loop catches model errors): fail the waiting streams rather than hang them.
        log.error("batcher of %s died", self.model.version, exc_info=worker.exception())
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(ModelUnavailable("the model worker failed; the server logged it"))

    async def close(self) -> None:
        """Stop the worker and fail what is still queued (the server is stopping)."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(ModelUnavailable("the server is stopping; retry on another replica"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def infer(self, audio: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """One stream's chunk: audio (S,) and its state (one row) -> log_probs (T, V) and the next state."""
        if self._closed or self._worker is None or self._worker.done():
            raise ModelUnavailable("the model is not running (server not started or stopping)")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(audio, state, future))
        self._arrived.set()
        return await future

    def _take(self, length: int, limit: int) -> list[_Request]:
        """Up to `limit` queued requests of `length` samples, oldest first; the rest stay queued."""
        taken, kept = [], deque()
        while self._pending:
            request = self._pending.popleft()
            if len(taken) < limit and len(request.audio) == length:
                taken.append(request)
            else:
                kept.append(request)
        self._pending = kept
        return taken

    async def _gather(self) -> list[_Request]:
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        length = len(self._pending[0].audio)
        batch = self._take(length, self.max_batch_size)
        target = min(self.max_batch_size, self._open_streams())
        deadline = loop.time() + self.max_wait_s
        while len(batch) < target and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
            batch += self._take(length, self.max_batch_size - len(batch))
        return [r for r in batch if not r.future.done()]  # a cancelled stream's request is dropped

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as e:  # fail this batch's streams, keep serving the others
                log.exception("model %s failed on a batch of %d", self.model.version, len(batch))
                for request in batch:
                    if not request.future.done():
                        # Not the client's fault, whatever the type (numpy raises ValueError): INTERNAL.
                        error = InferenceError(f"model {self.model.version} failed: {type(e).__name__}")
                        request.future.set_exception(error)
                continue
            self.stats.calls += 1
            self.stats.rows += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            for request, result in zip(batch, results, strict=True):
                if not request.future.done():  # done: its stream was cancelled meanwhile
                    request.future.set_result(result)

    def _run_batch(self, batch: list[_Request]) -> list[tuple[np.ndarray, State]]:
        """In the executor thread: stack rows, run the model, split rows (copies, so no stream pins a batch)."""
        audio = np.stack([r.audio for r in batch])  # (B, S)
        state = {name: np.concatenate([r.state[name] for r in batch]) for name in batch[0].state}
        started = time.perf_counter()
        log_probs, next_state = self.model.run(audio, state)  # (B, T, V)
        # Each row is one chunk of new audio (a stream's last, shorter tail counts as a chunk).
        observe_inference(time.perf_counter() - started, len(batch), len(batch) * self.model.spec.chunk_s)
        return [
            (log_probs[i].copy(), {name: value[i : i + 1].copy() for name, value in next_state.items()})
            for i in range(len(batch))
        ]


@dataclass(frozen=True)
class ServingModel:
    """A registry version loaded for serving, with its batcher: what an utterance is decoded with."""

    version: str
    """The registry version id (what results report as model_version)."""
    model: OnnxModel
    card: dict = field(repr=False)
    batcher: Batcher = field(repr=False)
    decoder_factory: DecoderFactory | None = field(default=None, repr=False)
    """The version's decoder (card["decoder"]: lexicon + LM beam search); None: greedy best path."""
    finals: FinalsQueue | None = field(default=None, repr=False)
    """A Whisper-based version's finals (card["second_pass"]), on their own threads so they never wait
    behind streaming chunks; None: finals are the first pass's."""

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def loaded_at(self) -> datetime:
        return self.model.loaded_at

    def initial_state(self) -> State:
        return self.model.initial_state(1)

    def new_decoder(self, previous_token: int = BLANK_ID) -> UtteranceDecoder:
        """A decoder for one utterance of this version (a hot-swapped model brings its own lexicon and LM)."""
        if self.decoder_factory is not None:
            return self.decoder_factory(previous_token)
        return CtcGreedyDecoder(self.spec.vocabulary, self.spec.frame_shift_s, previous_token=previous_token)

    @property
    def second_pass(self) -> WhisperSecondPass | None:
        return self.finals.second_pass if self.finals is not None else None

    def start(self) -> None:
        """Start the batcher and the second pass's workers (in the event loop that will use them)."""
        self.batcher.start()
        if self.finals is not None:
            self.finals.start()

    async def infer(self, audio: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        return await self.batcher.infer(audio, state)

    def pause_segments(self, start_s: float, max_alternatives: int) -> PauseSegments | None:
        """A new utterance's segments, sent to the second pass as pauses end them (server/segments.py), when
        the version cuts at pauses and one transcript is asked for; else None."""
        cutter = self.second_pass.pause_cutter() if self.second_pass is not None else None
        if cutter is None or max_alternatives != 1:
            return None
        return PauseSegments(self.finals, cutter, start_s)

    async def final_hypotheses(self, decoder: UtteranceDecoder, audio: np.ndarray, start_s: float,
                               max_alternatives: int, segments: PauseSegments | None = None) -> tuple[Hypothesis, ...]:
        """An endpointed utterance's n-best: the second pass's on its audio (float32 (S,) at 16 kHz) when
        the version has one (its `segments`' when the stream sent them as it went), else the first pass
        decoder's."""
        if self.finals is None:
            return decoder.final_hypotheses(max_alternatives)  # closes a beam search
        if not decoder.has_output:
            # The first pass heard no speech: no second pass, whose decoder would make up words for
            # silence (Whisper's "you" on an empty recording), so silence stays without a final.
            if segments is not None:
                segments.cancel()
            return (Hypothesis(),)
        try:
            if segments is not None:
                return (await segments.final(audio),)
            return await self.finals.transcribe(audio, start_s, max_alternatives)
        except FinalsStopped as e:
            raise ModelUnavailable(str(e)) from e
        except Exception as e:  # the queue logged it
            raise InferenceError(f"model {self.version} failed: {type(e).__name__}") from e

    async def close(self) -> None:
        """Stop the batcher and the second pass's thread (the model serves nothing more)."""
        await self.batcher.close()
        if self.finals is not None:
            await self.finals.close()
