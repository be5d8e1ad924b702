"""The finals queue of a two-pass version, on a second pass that records its calls: a burst is split
between the threads and batched (a beam version's backlog too, greedily), n-best finals go alone, a
failure fails only its batch, closing fails what is queued."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from prometheus_client import REGISTRY
from voxloop.core.decoder import Hypothesis, WordTiming
from voxloop.server.finals import FinalsQueue, FinalsStopped


@dataclass(frozen=True)
class _Settings:
    beam_size: int = 1


class RecordingSecondPass:
    """Transcribes an utterance as "utterance <its length>"; records each call's utterances, and holds
    every call until `release` is set (so finals queue up behind it)."""

    def __init__(self, beam_size: int = 1, fail_on: int | None = None):
        self.settings = _Settings(beam_size)
        self.calls: list[tuple[str, list[int]]] = []
        self.hurried: list[bool | None] = []
        """What `hurry()` said when each final decoded alone asked it (None: no hurry given)."""
        self.release = threading.Event()
        self.fail_on = fail_on
        self._lock = threading.Lock()

    def _hypothesis(self, audio: np.ndarray) -> Hypothesis:
        if len(audio) == self.fail_on:
            raise ValueError("a broken utterance")
        return Hypothesis((WordTiming(f"utterance{len(audio)}", 0.0, 0.1, 1.0),), None)

    def transcribe(self, audio, start_s=0.0, max_alternatives=1, hurry=None):
        self.release.wait(10)
        with self._lock:
            self.calls.append(("alone", [len(audio)]))
            self.hurried.append(hurry() if hurry is not None else None)
        return (self._hypothesis(audio),) * max_alternatives

    def transcribe_batch(self, utterances):
        self.release.wait(10)
        with self._lock:
            self.calls.append(("batch", [len(audio) for audio, _ in utterances]))
        return [self._hypothesis(audio) for audio, _ in utterances]


async def _burst(queue: FinalsQueue, second_pass: RecordingSecondPass, lengths: list[int],
                 max_alternatives: int = 1) -> list:
    queue.start()
    try:
        first = asyncio.ensure_future(queue.transcribe(np.zeros(lengths[0]), 0.0, 1))
        await asyncio.sleep(0.05)  # the first final is taken alone; the rest queue behind it
        rest = [asyncio.ensure_future(queue.transcribe(np.zeros(n), 0.0, max_alternatives)) for n in lengths[1:]]
        await asyncio.sleep(0.05)
        second_pass.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)
    finally:
        await queue.close()


def test_a_burst_of_finals_is_split_between_the_threads_and_each_share_decoded_in_one_call():
    second_pass = RecordingSecondPass()
    queue = FinalsQueue(second_pass, threads=2, max_batch=8, version="v")
    results = asyncio.run(_burst(queue, second_pass, [100, 1, 2, 3, 4, 5, 6, 7, 8]))
    assert [r[0].transcript for r in results] == [f"utterance{n}" for n in (100, 1, 2, 3, 4, 5, 6, 7, 8)]
    shares = sorted(len(lengths) for _, lengths in second_pass.calls)
    # The first two each went alone as they came (the other thread was free); of the seven queued behind
    # them, the first thread to come free took half (4), leaving the rest for the other.
    assert sum(shares) == 9 and shares[:2] == [1, 1] and max(shares) == 4 and len(shares) <= 5
    assert queue.stats.finals == 9 and queue.stats.largest == 4 and queue.stats.calls == len(shares)


def test_max_batch_bounds_a_call_and_one_means_every_final_alone():
    second_pass = RecordingSecondPass()
    asyncio.run(_burst(FinalsQueue(second_pass, threads=1, max_batch=3, version="v"), second_pass,
                       [100, 1, 2, 3, 4, 5, 6, 7]))
    assert [len(lengths) for _, lengths in second_pass.calls] == [1, 3, 3, 1]
    second_pass = RecordingSecondPass()
    asyncio.run(_burst(FinalsQueue(second_pass, threads=1, max_batch=1, version="v"), second_pass, [100, 1, 2]))
    assert [kind for kind, _ in second_pass.calls] == ["alone"] * 3 and second_pass.hurried == [None] * 3


def test_finals_asking_for_an_n_best_are_decoded_alone():
    second_pass = RecordingSecondPass()
    results = asyncio.run(_burst(FinalsQueue(second_pass, threads=1, max_batch=8, version="v"), second_pass,
                                 [100, 1, 2], max_alternatives=3))
    assert [kind for kind, _ in second_pass.calls] == ["alone"] * 3 and len(results[1]) == 3


def test_a_beam_search_versions_backlog_is_decoded_greedily_together_and_counted():
    second_pass = RecordingSecondPass(beam_size=4)
    queue = FinalsQueue(second_pass, threads=1, max_batch=8, version="v")
    before = REGISTRY.get_sample_value("voxloop_second_pass_backlog_finals_total") or 0.0
    results = asyncio.run(_burst(queue, second_pass, [100, 1, 2]))
    # 100 came to a free thread: its own search, told to hurry once 1 and 2 queued behind it; those two are a
    # backlog, decoded together. All three count as the backlog's.
    assert second_pass.calls == [("alone", [100]), ("batch", [1, 2])] and second_pass.hurried == [True]
    assert [r[0].transcript for r in results] == ["utterance100", "utterance1", "utterance2"]
    assert queue.stats.backlog_finals == 3
    assert REGISTRY.get_sample_value("voxloop_second_pass_backlog_finals_total") == before + 3


def test_a_final_taken_while_a_backlog_batch_runs_is_part_of_the_backlog_even_alone():
    async def scenario(second_pass: RecordingSecondPass) -> list:
        queue = FinalsQueue(second_pass, threads=2, max_batch=8, version="v")
        queue.start()
        try:
            # Three finals at once on two idle threads: the first thread takes an even share (1 and 2), so
            # a batch of the backlog runs when the second takes 3, the only one left.
            finals = [asyncio.ensure_future(queue.transcribe(np.zeros(n), 0.0, 1)) for n in (1, 2, 3)]
            await asyncio.sleep(0.05)
            second_pass.release.set()
            return await asyncio.gather(*finals)
        finally:
            await queue.close()

    second_pass = RecordingSecondPass(beam_size=4)
    results = asyncio.run(scenario(second_pass))
    assert sorted(second_pass.calls) == [("batch", [1, 2]), ("batch", [3])]
    assert [r[0].transcript for r in results] == ["utterance1", "utterance2", "utterance3"]


def test_a_failing_batch_fails_its_own_finals_and_the_queue_keeps_serving():
    second_pass = RecordingSecondPass(fail_on=2)
    queue = FinalsQueue(second_pass, threads=1, max_batch=2, version="v")
    results = asyncio.run(_burst(queue, second_pass, [100, 1, 2, 3]))
    assert results[0][0].transcript == "utterance100" and results[3][0].transcript == "utterance3"
    assert all(isinstance(r, ValueError) for r in results[1:3])  # 1 and 2 shared the failing call


def test_closing_fails_the_queued_finals_and_refuses_new_ones():
    async def scenario():
        second_pass = RecordingSecondPass()
        queue = FinalsQueue(second_pass, threads=1, max_batch=8, version="v")
        queue.start()
        running = asyncio.ensure_future(queue.transcribe(np.zeros(5), 0.0, 1))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(queue.transcribe(np.zeros(6), 0.0, 1))
        await asyncio.sleep(0.05)
        await queue.close()
        second_pass.release.set()
        with pytest.raises(FinalsStopped):
            await queued
        with pytest.raises(FinalsStopped):
            await queue.transcribe(np.zeros(7), 0.0, 1)
        running.cancel()

    asyncio.run(scenario())
