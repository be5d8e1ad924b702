"""Contextual biasing (core/context_bias.py): which next tokens a context word's spellings boost."""

import numpy as np
from voxloop.core.context_bias import ContextBias, word_spellings


def test_a_spelling_is_boosted_at_its_start_and_along_its_continuation_only():
    bias = ContextBias([(10, 11, 12), (10, 20)], start_bonus=2.0, continue_bonus=6.0)
    assert bias.bonuses([]) == {10: 2.0}  # any word may begin a context word
    assert bias.bonuses([5, 10]) == {11: 6.0, 20: 6.0, 10: 2.0}  # continuations of " 10 ..." and a new start
    assert bias.bonuses([10, 11]) == {12: 6.0, 10: 2.0}
    assert bias.bonuses([10, 11, 12]) == {10: 2.0}  # the word is complete: only starts again
    assert bias.bonuses([7, 11]) == {10: 2.0}  # 11 alone is no prefix


def test_biased_scores_add_the_bonus_and_leave_the_input_alone():
    scores = np.log(np.full(30, 1 / 30, dtype=np.float32))
    bias = ContextBias([(3, 4)], start_bonus=1.0, continue_bonus=5.0)
    out = bias.biased(scores, [3])
    assert out[4] - scores[4] == 5.0 and out[3] - scores[3] == 1.0 and np.array_equal(np.delete(out, [3, 4]),
                                                                                    np.delete(scores, [3, 4]))
    assert np.all(scores == scores[0])  # a copy: the model's log-probs stay what they were
    assert not ContextBias([]) and ContextBias([]).biased(scores, [1]) is scores


def test_a_word_is_spelled_mid_sentence_in_lower_and_title_case():
    codes = {" zebulon": [1, 2], " Zebulon": [3, 2], " ann": [4], " Ann": [4]}
    assert word_spellings(["zebulon", "ann"], codes.__getitem__) == [(1, 2), (3, 2), (4,)]
