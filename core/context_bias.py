"""Contextual biasing of a Whisper decoder toward a version's context words (shallow fusion on a token trie).

A version's context words are the rare words its users corrected into transcripts (the trainer adds
them, trainer/kinds.py): words Whisper spells with several tokens and cannot be expected to know. While
decoding, a token that starts one of their spellings gets `start_bonus` nats added to its log-prob, and
a token that continues a spelling the decoded tokens end in gets `continue_bonus`, so a name the user
taught is completed once the audio has started it, before the weights learn it (WeNet's context biasing
is the same idea). The bonus only steers the search: the hypothesis keeps the model's own log-probs.

Measured (docs/benchmarks.md, "The shipped model"): a continue bonus of 6 nats raised the warehouse
scenario's target-word accuracy and left general WER where it was; a start bonus (1-2 nats) raised it
further but cost 2.5-3.2 points of anchor WER (the first tokens of names are common word starts), so the
default is 0; a "previous text" prompt of the same words instead raised dev WER by 12-25 points.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

START_BONUS = 0.0
"""Nats added to a token that begins a context word's spelling (2 cost 3.2 anchor points, 3 cost 10 on dev)."""
CONTINUE_BONUS = 6.0
"""Nats added to a token that continues a spelling the decoded tokens end in."""
MAX_CONTEXT_WORDS = 256
"""Most context words a version may carry (a card's list is refused past this)."""
MAX_CONTEXT_WORD_CHARS = 64


class ContextBias:
    """The token trie of the context words' spellings and the bonuses it gives the next token."""

    def __init__(self, spellings: Iterable[Sequence[int]], *, start_bonus: float = START_BONUS,
                 continue_bonus: float = CONTINUE_BONUS):
        self.start_bonus = start_bonus
        self.continue_bonus = continue_bonus
        self._next: dict[tuple[int, ...], set[int]] = {}  # a spelling's prefix -> the tokens that extend it
        self._longest = 0
        for spelling in spellings:
            spelling = tuple(spelling)
            self._longest = max(self._longest, len(spelling))
            for i, token in enumerate(spelling):
                self._next.setdefault(spelling[:i], set()).add(token)

    def __bool__(self) -> bool:
        return bool(self._next)

    def bonuses(self, decoded: Sequence[int]) -> dict[int, float]:
        """token -> the nats it gets after `decoded`: the largest bonus of any spelling it starts or continues."""
        out: dict[int, float] = {}
        for k in range(min(len(decoded), self._longest - 1) + 1):  # every suffix of `decoded`, the empty one too
            prefix = tuple(decoded[len(decoded) - k :])
            bonus = self.continue_bonus if k else self.start_bonus
            for token in self._next.get(prefix, ()):
                out[token] = max(out.get(token, 0.0), bonus)
        return out

    def biased(self, scores: np.ndarray, decoded: Sequence[int]) -> np.ndarray:
        """`scores` (V,) of the next token after `decoded`, with the bonuses added (a copy when any apply)."""
        if not self._next:  # no context words: every decoder step of most versions
            return scores
        bonuses = self.bonuses(decoded)
        if not bonuses:
            return scores
        scores = scores.copy()
        tokens = np.fromiter(bonuses, dtype=np.int64, count=len(bonuses))
        scores[tokens] += np.fromiter(bonuses.values(), dtype=scores.dtype, count=len(bonuses))
        return scores


def word_spellings(words: Iterable[str], encode) -> list[tuple[int, ...]]:
    """The token sequences Whisper writes `words` with mid-sentence: " word" and " Word" (names are often
    capitalized), each with its leading space, as `encode(text) -> token ids` spells them."""
    spellings: dict[tuple[int, ...], None] = {}
    for word in words:
        for form in (f" {word}", f" {word[:1].upper()}{word[1:]}"):
            spellings[tuple(encode(form))] = None
    return [s for s in spellings if s]


__all__ = ["CONTINUE_BONUS", "MAX_CONTEXT_WORDS", "MAX_CONTEXT_WORD_CHARS", "START_BONUS", "ContextBias",
           "word_spellings"]
