"""The speech span of an utterance: its edges' silence is cut at a margin from the frames loud enough to be
speech, pauses inside are kept, and audio with no frame that loud is kept whole."""

from __future__ import annotations

import numpy as np
import pytest
from voxloop.core.speech_span import PauseCutter, segment_spans, speech_span, valid_pause_cut

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


def two_sentences(pause_s: float) -> np.ndarray:
    """0.5 s of room hiss, speech, a pause of `pause_s` (hiss), speech, 0.8 s of hiss: 20 ms-aligned."""
    return np.concatenate([hiss(0.5, -60), tone(1.0, -20), hiss(pause_s, -60, seed=1), tone(1.2, -20),
                           hiss(0.8, -60, seed=2)])


def test_an_utterance_is_cut_in_the_middle_of_the_first_part_of_each_long_pause_after_speech():
    audio = two_sentences(1.0)
    cutter = PauseCutter(min_pause_s=0.6, quiet_dbfs=-45)
    # The leading hiss is no pause (nothing spoken before it); the 1 s pause is cut 0.3 s in; the trailing
    # 0.8 s of hiss after the second tone is cut 0.3 s in too, and what follows holds nothing louder.
    assert cutter.cuts(audio) == [int(1.8 * RATE), int(4.0 * RATE)]
    assert cutter.sound_s == 0 and segment_spans([int(1.8 * RATE), int(4.0 * RATE)], len(audio), cutter) == [
        (0, int(1.8 * RATE)), (int(1.8 * RATE), int(4.0 * RATE))]  # the quiet rest is not decoded
    short_pause = PauseCutter(min_pause_s=0.6, quiet_dbfs=-45).cuts(two_sentences(0.5))
    assert short_pause == [int(3.5 * RATE)]  # the 0.5 s pause is kept, the trailing hiss is cut
    assert PauseCutter(min_pause_s=0.6, quiet_dbfs=-65).cuts(audio) == []  # the hiss is above that level: no pause


def test_cuts_found_chunk_by_chunk_as_a_stream_grows_are_those_of_the_whole_utterance():
    audio = np.concatenate([two_sentences(0.9), tone(0.7, -25), hiss(0.2, -60)])
    whole = PauseCutter(min_pause_s=0.6).cuts(audio)
    for chunk in (100, 320, 6400, 7777):
        cutter, found = PauseCutter(min_pause_s=0.6), []
        for end in range(chunk, len(audio) + chunk, chunk):
            found += cutter.cuts(audio[: min(end, len(audio))])
        assert found == whole and len(whole) == 2
        assert cutter.tail_is_segment  # the last tone (0.7 s) came after the last cut


def test_a_short_sound_is_not_cut_off_from_its_neighbours():
    """A cough or a click alone makes Whisper write words: a sound shorter than min_speech_s is no segment."""
    click_then_speech = np.concatenate([tone(0.2, -20), hiss(0.9, -60), tone(1.0, -20), hiss(0.2, -60)])
    cutter = PauseCutter(min_pause_s=0.6, min_speech_s=0.5)
    assert cutter.cuts(click_then_speech) == []
    speech_then_click = np.concatenate([tone(1.0, -20), hiss(0.9, -60), tone(0.2, -20), hiss(0.2, -60)])
    cutter = PauseCutter(min_pause_s=0.6, min_speech_s=0.5)
    cuts = cutter.cuts(speech_then_click)
    assert cuts == [int(1.3 * RATE)] and cutter.sound_s == pytest.approx(0.2)
    # The click after the cut goes with the segment before it.
    assert segment_spans(cuts, len(speech_then_click), cutter) == [(0, len(speech_then_click))]


@pytest.mark.parametrize(("min_pause_s", "quiet_dbfs", "valid"),
                         [(None, -45, True), (0.6, -45, True), (0.02, -45, False), (0.6, 3, False)])
def test_pause_cut_settings_are_checked(min_pause_s, quiet_dbfs, valid):
    assert valid_pause_cut(min_pause_s, quiet_dbfs) is valid
