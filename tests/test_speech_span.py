"""The speech span of an utterance: its edges' silence is cut at a margin from the frames loud enough to be
speech, pauses inside are kept, and audio with no frame that loud is kept whole."""

from __future__ import annotations

import numpy as np
import pytest
from voxloop.core.speech_span import speech_span

RATE = 16000


def tone(seconds: float, dbfs: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (10 ** (dbfs / 20) * np.sqrt(2) * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def hiss(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    return (10 ** (dbfs / 20) * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)


def test_the_silence_at_the_edges_is_cut_at_the_margin_and_a_pause_inside_is_kept():
    speech = np.concatenate([tone(1.0, -20), np.zeros(RATE, np.float32), tone(0.5, -20)])  # 2.5 s, a 1 s pause
    audio = np.concatenate([hiss(1.2, -75), speech, hiss(1.5, -75, seed=1)])
    start, end = speech_span(audio, margin_s=0.3, below_peak_db=35)
    assert (start, end) == (int(0.9 * RATE), int((1.2 + 2.5 + 0.3) * RATE))


def test_a_quiet_onset_within_the_threshold_is_speech_and_one_below_it_is_not():
    audio = np.concatenate([np.zeros(RATE, np.float32), tone(0.4, -50), tone(1.0, -10), np.zeros(RATE, np.float32)])
    assert speech_span(audio, margin_s=0.0, below_peak_db=35)[0] == int(1.4 * RATE)  # 40 dB below the peak: cut
    assert speech_span(audio, margin_s=0.0, below_peak_db=45)[0] == RATE  # within 45 dB: speech


@pytest.mark.parametrize("audio", [np.zeros(2 * RATE, np.float32), hiss(2.0, -70), np.zeros(100, np.float32)])
def test_audio_with_no_frame_loud_enough_is_kept_whole(audio):
    assert speech_span(audio, margin_s=0.3, below_peak_db=35) == (0, len(audio))


def test_the_margin_stops_at_the_audio_edges():
    audio = np.concatenate([tone(1.0, -20), np.zeros(100, np.float32)])
    assert speech_span(audio, margin_s=0.5, below_peak_db=35) == (0, len(audio))
