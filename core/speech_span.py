"""Where the speech of an endpointed utterance lies, so the second pass need not encode its edges' silence.

An utterance's audio runs from the previous endpoint to this one: it carries the pause before the
speech and the endpoint's trailing silence (`trailing_silence_after_speech_s`, 1.2 s by default), 10-20%
of its length. Whisper's second pass costs in proportion to the audio it encodes and attends, and its
graph appends silence of its own (`pad_s`) after the speech anyway, so the edges are cut at a margin
from the first and last frames loud enough to be speech: within `below_peak_db` of the utterance's
loudest 20 ms frame and above an absolute floor. The cut is by level alone (not the first pass's
blanks) so an offline decode of the same audio cuts exactly where a stream's final did. Noise at
speech level is kept; only the edges are cut, never a pause inside the speech.
"""

from __future__ import annotations

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


def valid_trim(margin_s: float | None, below_peak_db: float) -> bool:
    """Whether a card's or policy's cut settings make sense (margin None: no cut)."""
    return margin_s is None or (margin_s >= 0 and below_peak_db > 0)
