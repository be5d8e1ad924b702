"""An utterance's segments on a two-pass version that cuts at pauses: each sent to the second pass as its
pause ends it, so its transcript is ready (or under way) when the utterance ends.

The cuts are the version's own (WhisperSecondPass.segments, core/speech_span.py PauseCutter): found frame
by frame in the utterance's decoded audio, they are those an offline decode of the whole utterance finds,
and each segment goes through the same `transcribe` (so the final is the offline decode's). What is left
after the last cut is decoded when the utterance ends, if it holds a louder frame. A stream that ends with
many others (a burst of finals) thus waits for the speech since its last pause, not since its last
endpoint. Finals asking for an n-best are decoded whole at the end (their alternatives are of the whole).
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np

from ..core.decoder import Hypothesis
from ..core.model import MODEL_SAMPLE_RATE_HZ
from ..core.speech_span import PauseCutter
from ..core.whisper_decoder import joined
from .finals import FinalsQueue


class PauseSegments:
    """One utterance's segments. Create it in the event loop, when the utterance begins."""

    def __init__(self, finals: FinalsQueue, cutter: PauseCutter, start_s: float):
        self._finals = finals
        self._cutter = cutter
        self._start_s = start_s
        self._cut = 0  # sample (from the utterance's start) where the segment being spoken begins
        self._sent: list[asyncio.Future] = []

    def update(self, audio: np.ndarray) -> None:
        """The utterance's decoded audio so far (float32 (S,) from its start): every new cut sends the
        segment before it."""
        for cut in self._cutter.cuts(audio):
            self._send(audio[self._cut : cut])
            self._cut = cut

    async def final(self, audio: np.ndarray) -> Hypothesis:
        """The whole utterance's audio -> its final: its segments' transcripts, in order."""
        self.update(audio)
        if self._cutter.heard or not self._sent:
            self._send(audio[self._cut :])
        try:
            return joined(list(await asyncio.gather(*self._sent)))
        finally:
            self.cancel()

    def cancel(self) -> None:
        """The utterance will not be finalized (its stream closed): drop what is still queued."""
        for sent in self._sent:
            if not sent.done():
                sent.cancel()
            else:  # retrieve a failure no one awaits, so asyncio does not log it as lost
                with contextlib.suppress(BaseException):
                    sent.result()

    def _send(self, segment: np.ndarray) -> None:
        start_s = self._start_s + self._cut / MODEL_SAMPLE_RATE_HZ
        self._sent.append(asyncio.ensure_future(self._first(segment.copy(), start_s)))

    async def _first(self, segment: np.ndarray, start_s: float) -> Hypothesis:
        return (await self._finals.transcribe(segment, start_s, 1))[0]
