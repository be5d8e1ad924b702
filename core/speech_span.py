"""Where the speech of an endpointed utterance lies, so the second pass need not encode its edges' silence.

An utterance's audio runs from the previous endpoint to this one: it carries the pause before the
speech and the endpoint's trailing silence (`trailing_silence_after_speech_s`, 1.2 s by default), 10-20%
of its length. Whisper's second pass costs in proportion to the audio it encodes and attends, and its
graph appends silence of its own (`pad_s`) after the speech anyway, so the edges are cut at a margin
from the first and last frames loud enough to be speech: within `below_peak_db` of the utterance's
loudest 20 ms frame and above an absolute floor. The cut is by level alone (not the first pass's
blanks) so an offline decode of the same audio cuts exactly where a stream's final did. Noise at
speech level is kept; only the edges are cut, never a pause inside the speech.

An utterance may also be cut at its long pauses (`PauseCutter`) into segments the second pass decodes on
their own, so a stream's speech before a pause is transcribed while the speaker goes on. That rule looks
at each frame alone against an absolute level, so the cuts found in the first seconds of an utterance are
the cuts of the whole of it: a stream finds them chunk by chunk, an offline decode all at once, the same.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

FRAME_SAMPLES = 320
"""20 ms at 16 kHz: one Whisper encoder frame."""
SAMPLE_RATE_HZ = 16000
BELOW_PEAK_DB = 35.0
"""The default threshold: a frame within this many dB of the utterance's loudest is speech."""
FLOOR_DBFS = -55.0
"""A frame quieter than this is never speech (a near-silent utterance is kept whole)."""


def speech_span(audio: np.ndarray, *, margin_s: float, below_peak_db: float = BELOW_PEAK_DB) -> tuple[int, int]:
    """float32 (S,) audio -> (start, end) samples: the speech frames and `margin_s` either side, or the whole
    audio when no frame is loud enough. Frame-aligned, inside [0, S]."""
    frames = len(audio) // FRAME_SAMPLES
    if frames == 0:
        return 0, len(audio)
    power = np.mean(np.square(audio[: frames * FRAME_SAMPLES].reshape(frames, FRAME_SAMPLES), dtype=np.float64),
                    axis=1)
    level_db = 10 * np.log10(power + 1e-12)  # dBFS of each frame
    loud = np.flatnonzero(level_db > max(level_db.max() - below_peak_db, FLOOR_DBFS))
    if len(loud) == 0:
        return 0, len(audio)
    margin = round(margin_s * SAMPLE_RATE_HZ / FRAME_SAMPLES)
    start = max(0, loud[0] - margin) * FRAME_SAMPLES
    end = min(len(audio), (loud[-1] + 1 + margin) * FRAME_SAMPLES)
    return int(start), int(end)


MIN_PAUSE_S = 2 * FRAME_SAMPLES / SAMPLE_RATE_HZ
"""The shortest pause a cut may need: two frames, so the cut falls between them."""
QUIET_DBFS = -45.0
"""The default level below which a 20 ms frame is pause when cutting at pauses."""
MIN_SPEECH_S = 0.5
"""The default least sound (frames above the pause level) a segment must hold to be decoded on its own: a
cough or a click alone makes Whisper write words ("you"), so shorter sounds stay with their neighbours."""


class PauseCutter:
    """Finds where an utterance may be cut into segments decoded on their own: in the middle of the first
    `min_pause_s` of every run of quiet frames (below `quiet_dbfs`) that follows at least `min_speech_s` of
    louder frames since the last cut. Feed it the utterance's audio from its start as it grows (`cuts`); a
    whole utterance gives the same cuts at once. `sound_s` tells what the audio after the last cut holds."""

    def __init__(self, *, min_pause_s: float, quiet_dbfs: float = QUIET_DBFS, min_speech_s: float = MIN_SPEECH_S):
        self._min_frames = max(2, round(min_pause_s * SAMPLE_RATE_HZ / FRAME_SAMPLES))
        self._min_loud = max(1, round(min_speech_s * SAMPLE_RATE_HZ / FRAME_SAMPLES))
        self._quiet_power = 10 ** (quiet_dbfs / 10)
        self._scanned = 0  # frames classified so far
        self._quiet_run = 0  # quiet frames just before frame _scanned
        self._loud = 0  # louder frames since the last cut

    @property
    def sound_s(self) -> float:
        """Seconds of louder frames since the last cut."""
        return self._loud * FRAME_SAMPLES / SAMPLE_RATE_HZ

    @property
    def tail_is_segment(self) -> bool:
        """The audio after the last cut holds enough sound to be decoded on its own."""
        return self._loud >= self._min_loud

    def cuts(self, audio: np.ndarray) -> list[int]:
        """The utterance's audio so far (float32 (S,), from its start) -> the sample offsets of the cuts in
        the frames not scanned before, in order."""
        frames = len(audio) // FRAME_SAMPLES
        if frames <= self._scanned:
            return []
        new = audio[self._scanned * FRAME_SAMPLES : frames * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
        quiet = np.mean(np.square(new, dtype=np.float64), axis=1) < self._quiet_power
        found = []
        for index, is_quiet in enumerate(quiet, start=self._scanned):
            if not is_quiet:
                self._quiet_run, self._loud = 0, self._loud + 1
                continue
            self._quiet_run += 1
            if self._quiet_run == self._min_frames and self._loud >= self._min_loud:
                found.append((index + 1 - self._min_frames + self._min_frames // 2) * FRAME_SAMPLES)
                self._loud = 0
        self._scanned = frames
        return found


def segment_spans(cuts: list[int], length: int, cutter: PauseCutter) -> list[tuple[int, int]]:
    """An utterance of `length` samples cut at `cuts` (all of them, found by `cutter`) -> the spans decoded
    on their own: the whole when there is no cut; after the last cut, a span of its own if it holds enough
    sound, the last span extended over it if it holds some (a short word or a noise keeps its context),
    nothing if it is quiet."""
    if not cuts:
        return [(0, length)]
    spans = list(pairwise([0, *cuts]))
    if cutter.tail_is_segment:
        spans.append((cuts[-1], length))
    elif cutter.sound_s > 0:
        spans[-1] = (spans[-1][0], length)
    return spans


def valid_pause_cut(min_pause_s: float | None, quiet_dbfs: float, min_speech_s: float = MIN_SPEECH_S) -> bool:
    """Whether a card's or policy's pause-cut settings make sense (min_pause_s None: no cuts)."""
    return min_pause_s is None or (min_pause_s >= MIN_PAUSE_S and quiet_dbfs < 0
                                   and min_speech_s > 0)


def valid_trim(margin_s: float | None, below_peak_db: float) -> bool:
    """Whether a card's or policy's cut settings make sense (margin None: no cut)."""
    return margin_s is None or (margin_s >= 0 and below_peak_db > 0)
