"""CTC greedy decoding across chunks, word timings and confidence, stable/tentative words, endpoint rules."""

from __future__ import annotations

import numpy as np
import pytest
from voxloop.core.decoder import CtcGreedyDecoder, Hypothesis, WordTiming
from voxloop.server.endpoint import EndpointRule, EndpointRules

VOCABULARY = ("<blank>", " ", "a", "b", "c", "")
SHIFT_S = 0.04


def frames(*tokens: str, p: float = 0.9) -> np.ndarray:
    """Log-probs (T, V) whose best token per frame is `tokens[t]` ("_" the blank) with probability p."""
    rows = np.full((len(tokens), len(VOCABULARY)), (1 - p) / (len(VOCABULARY) - 1))
    for t, token in enumerate(tokens):
        rows[t, 0 if token == "_" else VOCABULARY.index(token)] = p
    return np.log(rows)


def decode(*chunks: np.ndarray) -> CtcGreedyDecoder:
    decoder, start_s = CtcGreedyDecoder(VOCABULARY, SHIFT_S), 0.0
    for chunk in chunks:
        decoder.feed(chunk, start_s)
        start_s += len(chunk) * SHIFT_S
    return decoder


def test_repeats_collapse_across_chunk_boundaries_and_blanks_separate_repeats():
    whole = frames("a", "a", "_", "a", "b", "b", "b", " ", "c")
    split = decode(whole[:2], whole[2:5], whole[5:6], whole[6:])
    assert split.hypothesis() == decode(whole).hypothesis()
    assert split.hypothesis().transcript == "aab c"


def test_words_carry_start_end_offsets_from_their_frames_and_mean_token_confidence():
    log_probs = frames("_", "a", "a", "b", " ", "_", "c", "_")
    log_probs[3] = frames("b", p=0.5)[0]
    [ab, c] = decode(log_probs).hypothesis().finalized().words
    assert ab.word == "ab" and ab.start_s == pytest.approx(0.04) and ab.end_s == pytest.approx(0.16)
    assert ab.confidence == pytest.approx((0.9 + 0.5) / 2)
    assert c == WordTiming("c", pytest.approx(0.24), pytest.approx(0.28), pytest.approx(0.9))


def test_only_the_word_still_being_spelled_is_tentative():
    hypothesis = decode(frames("a", " ", "b", "c")).hypothesis()
    assert [w.word for w in hypothesis.stable] == ["a"]
    assert hypothesis.tentative.word == "bc"
    assert (hypothesis.transcript, hypothesis.stable_transcript) == ("a bc", "a")
    assert hypothesis.stability == pytest.approx(1 / 4)
    assert hypothesis.finalized().tentative is None and hypothesis.finalized().transcript == "a bc"


def test_empty_hypothesis_has_no_text_no_confidence_and_no_stability():
    assert (Hypothesis().transcript, Hypothesis().confidence, Hypothesis().stability) == ("", 0.0, 0.0)


def test_trailing_blank_frames_count_the_silence_after_the_last_token():
    decoder = decode(frames("_", "_", "a", "_"), frames("_", "_"))
    assert decoder.has_output and decoder.trailing_blank_frames == 3 and decoder.frames == 6


def test_a_repeat_across_an_utterance_boundary_is_not_emitted_twice():
    decoder = CtcGreedyDecoder(VOCABULARY, SHIFT_S, previous_token=VOCABULARY.index("a"))
    decoder.feed(frames("a", "_", "a"), 0.0)
    assert decoder.hypothesis().transcript == "a"


RULES = EndpointRules(trailing_silence_before_speech_s=2.4, trailing_silence_after_speech_s=1.2, max_utterance_s=20)


@pytest.mark.parametrize(("utterance_s", "silence_s", "speech", "expected"), [
    (1.2, 1.2, False, None),  # silence before speech waits 2.4 s
    (2.4, 2.4, False, EndpointRule.SILENCE_BEFORE_SPEECH),
    (3.0, 1.16, True, None),
    (3.0, 1.2, True, EndpointRule.SILENCE_AFTER_SPEECH),
    (20.0, 0.0, True, EndpointRule.MAX_UTTERANCE),
    (19.96, 0.0, True, None),
])
def test_endpoint_rules_follow_sherpa_onnx_defaults(utterance_s, silence_s, speech, expected):
    assert RULES.detect(utterance_s, silence_s, speech) == expected
