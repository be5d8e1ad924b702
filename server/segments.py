"""An utterance's segments on a two-pass version that cuts at pauses: each sent to the second pass as its
pause ends it, so its transcript is ready (or under way) when the utterance ends.

The cuts are the version's own (WhisperSecondPass.segments, core/speech_span.py PauseCutter): found frame
by frame in the utterance's decoded audio, they are those an offline decode of the whole utterance finds,
and each segment goes through the same `transcribe` (so the final is the offline decode's). What is left
after the last cut is decoded when the utterance ends: on its own if it holds enough sound, with the
segment before it if it holds some (that segment is decoded again), not at all if it is quiet. A stream that ends with
many others (a burst of finals) thus waits for the speech since its last pause, not since its last
endpoint. Finals asking for an n-best are decoded whole at the end (their alternatives are of the whole).
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np

from ..core.decoder import Hypothesis
from ..core.model import MODEL_SAMPLE_RATE_HZ
from ..core.speech_span import PauseCutter, segment_spans
from ..core.whisper_decoder import joined
from .finals import FinalsQueue


class PauseSegments:
    """One utterance's segments. Create it in the event loop, when the utterance begins."""

    def __init__(self, finals: FinalsQueue, cutter: PauseCutter, start_s: float):
        self._finals = finals
        self._cutter = cutter
        self._start_s = start_s
        self._cuts: list[int] = []  # samples from the utterance's start
        self._sent: dict[tuple[int, int], asyncio.Future] = {}  # span -> its transcript

    def update(self, audio: np.ndarray) -> None:
        """The utterance's decoded audio so far (float32 (S,) from its start): every new cut sends the
        segment before it."""
        for cut in self._cutter.cuts(audio):
            self._send(audio, self._cuts[-1] if self._cuts else 0, cut)
            self._cuts.append(cut)

    async def final(self, audio: np.ndarray) -> Hypothesis:
        """The whole utterance's audio -> its final: its segments' transcripts, in order (the spans an
        offline decode takes: a segment already sent is used unless the end changed it)."""
        self.update(audio)
        spans = segment_spans(self._cuts, len(audio), self._cutter)
        for span in spans:
            if span not in self._sent:
                self._send(audio, *span)
        try:
            return joined(list(await asyncio.gather(*(self._sent[span] for span in spans))))
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Drop what is still queued (the stream closed, or the final is made): nothing else waits for it."""
        for sent in self._sent.values():
            if not sent.done():
                sent.cancel()
            else:  # retrieve a failure no one awaits, so asyncio does not log it as lost
                with contextlib.suppress(BaseException):
                    sent.result()

    def _send(self, audio: np.ndarray, begin: int, end: int) -> None:
        start_s = self._start_s + begin / MODEL_SAMPLE_RATE_HZ
        self._sent[begin, end] = asyncio.ensure_future(self._first(audio[begin:end].copy(), start_s))

    async def _first(self, segment: np.ndarray, start_s: float) -> Hypothesis:
        return (await self._finals.transcribe(segment, start_s, 1))[0]
