"""Rewards from feedback and the poisoning guard: pure functions on (normalized) transcripts.

The reward of a hypothesis against a reference is r = -(edit distance) / max(1, len(reference)),
counted in words or in characters (docs: design.md, "The learning signal"). 0 is a perfect
hypothesis; -1 means as many edits as the reference is long; it can go below -1 when the
hypothesis is much longer than the reference.

Callers pass transcripts already normalized with `core.text.normalize_text`, the same
normalization training uses, so that "Don't" and "don't" are not an edit. The edit distance is
rapidfuzz's (C++, bit-parallel): a pure-Python one cost 1.8 s of server CPU for one 10,000-character
correction against a long hypothesis (issue 14); the tests check it against a naive reference.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from rapidfuzz.distance import Levenshtein

REJECTION_REWARD = -1.0
"""Reward of a transcript a user rejected (no text given): as bad as an edit-distance reward of an equal-length
text gets. The default of ServerConfig.rejection_reward (what the server stores and returns) and the reward the
trainer gives the rejected text (trainer/rewards.py)."""


def edit_distance(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1) between two sequences.

    Words when given lists of words, characters when given strings.
    """
    return Levenshtein.distance(reference, hypothesis)


def word_edit_reward(hypothesis: str, reference: str) -> float:
    """-(word edit distance) / max(1, number of reference words); words are whitespace-separated."""
    reference_words = reference.split()
    return -edit_distance(reference_words, hypothesis.split()) / max(1, len(reference_words))


def char_edit_reward(hypothesis: str, reference: str) -> float:
    """-(character edit distance) / max(1, number of reference characters), spaces included."""
    return -edit_distance(reference, hypothesis) / max(1, len(reference))


def char_similarity(a: str, b: str) -> float:
    """1 - (character edit distance) / (length of the longer text): 1.0 identical, 0.0 nothing shared."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - edit_distance(a, b) / longest


def is_suspicious(hypothesis: str, correction: str, threshold: float) -> bool:
    """Whether a correction shares so little with the hypothesis it corrects that it may be poisoning.

    True when the character similarity of the two texts is below `threshold` (0..1). An empty
    hypothesis is never suspicious: the model heard nothing, and the user typing what was said is
    the ordinary case. A flag is a hint to the trainer (down-weight or skip), not a rejection.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"threshold must be a similarity in 0..1 (got {threshold}); e.g. 0.2 flags near-total rewrites"
        )
    if not hypothesis.strip():
        return False
    return char_similarity(hypothesis, correction) < threshold
