"""An utterance's segments on a version that cuts at pauses: each goes to the second pass as its pause ends
it, the final joins their transcripts in order, and a stream that closes drops what is still queued."""

from __future__ import annotations

import asyncio

import numpy as np
from voxloop.core.decoder import Hypothesis, WordTiming
from voxloop.core.speech_span import PauseCutter
from voxloop.server.segments import PauseSegments

RATE = 16000


def voiced(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def quiet(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


class HeldFinals:
    """A finals queue that answers when released: one word per segment, named by its length in samples."""

    def __init__(self):
        self.sent: list[tuple[int, float]] = []
        self.release = asyncio.Event()

    async def transcribe(self, audio, start_s, max_alternatives):
        self.sent.append((len(audio), start_s))
        await self.release.wait()
        return (Hypothesis((WordTiming(f"w{len(audio)}", start_s, start_s + 0.1, 0.9),)),)


def test_each_segment_is_sent_as_its_pause_ends_and_the_final_joins_them_in_order():
    async def run():
        finals = HeldFinals()
        segments = PauseSegments(finals, PauseCutter(min_pause_s=0.6), start_s=10.0)
        audio = np.concatenate([voiced(1.0), quiet(1.0), voiced(0.8), quiet(0.4)])
        segments.update(audio[: int(1.5 * RATE)])  # 0.5 s into the pause: not yet long enough
        assert finals.sent == []
        segments.update(audio[: int(1.7 * RATE)])  # 0.6 s: cut 0.3 s in, the first segment goes now
        await asyncio.sleep(0)
        assert finals.sent == [(int(1.3 * RATE), 10.0)]
        final = asyncio.ensure_future(segments.final(audio))  # the rest holds the second voiced part: sent too
        for _ in range(2):
            await asyncio.sleep(0)
        assert finals.sent[1] == (len(audio) - int(1.3 * RATE), 11.3)
        finals.release.set()
        return await final

    hypothesis = asyncio.run(run())
    assert [(w.word, w.start_s) for w in hypothesis.words] == [(f"w{int(1.3 * RATE)}", 10.0),
                                                                (f"w{int(3.2 * RATE) - int(1.3 * RATE)}", 11.3)]


def test_quiet_audio_after_the_last_cut_is_not_sent():
    async def run():
        finals = HeldFinals()
        finals.release.set()
        segments = PauseSegments(finals, PauseCutter(min_pause_s=0.6), start_s=0.0)
        hypothesis = await segments.final(np.concatenate([voiced(1.0), quiet(1.5)]))
        return finals.sent, hypothesis

    sent, hypothesis = asyncio.run(run())
    assert sent == [(int(1.3 * RATE), 0.0)] and len(hypothesis.words) == 1


def test_a_short_sound_after_the_last_cut_is_decoded_with_the_segment_before_it():
    async def run():
        finals = HeldFinals()
        finals.release.set()
        segments = PauseSegments(finals, PauseCutter(min_pause_s=0.6), start_s=0.0)
        audio = np.concatenate([voiced(1.0), quiet(1.0), voiced(0.2), quiet(0.2)])
        segments.update(audio)
        await asyncio.sleep(0)
        hypothesis = await segments.final(audio)
        return finals.sent, hypothesis

    sent, hypothesis = asyncio.run(run())
    assert sent == [(int(1.3 * RATE), 0.0), (int(2.4 * RATE), 0.0)]  # the first segment again, with the rest
    assert [w.word for w in hypothesis.words] == [f"w{int(2.4 * RATE)}"]


def test_a_closed_stream_drops_its_queued_segments():
    async def run():
        finals = HeldFinals()
        segments = PauseSegments(finals, PauseCutter(min_pause_s=0.6), start_s=0.0)
        segments.update(np.concatenate([voiced(1.0), quiet(0.7), voiced(1.0), quiet(0.7)]))
        await asyncio.sleep(0)
        queued = list(segments._sent.values())
        segments.cancel()
        await asyncio.sleep(0)
        return finals.sent, queued

    sent, queued = asyncio.run(run())
    assert len(sent) == 2 and all(future.cancelled() for future in queued)
