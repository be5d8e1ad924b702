"""Greedy CTC decoding: what a graph's log-probs print, streamed with timings or in one go.

- `CtcGreedyDecoder` (the server's streams and warm-up): chunks of per-frame log-probs (T, V) come in
  as the model produces them; repeats are collapsed across chunk boundaries (the last frame's token
  carries over), blanks dropped. The streaming model is causal and chunked, so an emitted frame never
  changes: every word followed by a word separator is final (stable), and only the trailing word, still
  being spelled, is tentative.
- `greedy_ctc_text` / `path_text` (the trainer's parity checks, evaluation, rewards): the text of a
  whole utterance's best path, or of any path. tests/test_core_equivalence.py checks that they print
  what the streaming decoder prints.

Both take the best path from `best_path` and print tokens by the printed vocabulary (`serving_vocabulary`:
the blank at index 0, the word delimiter "|" as " ", <unk> and other <special> tokens as nothing).

Confidence of a token: its highest frame probability; of a word: the mean over its tokens; of an
utterance: the mean over its words (0 with no words).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .model import BLANK_ID

WORD_SEPARATOR = " "
"""How the word delimiter prints."""
BLANK_TOKEN = "<blank>"
WORD_DELIMITER_TOKEN = "|"
UNK_TOKEN = "<unk>"
"""The token names of a policy's vocabulary (the tokenizer's: the CTC blank first, "|" between words)."""


def serving_vocabulary(vocabulary: Sequence[str]) -> list[str]:
    """The vocabulary as the server prints it (the graph's voxloop.vocabulary): the word delimiter is a space,
    <unk> and any other <special> token print nothing; the blank (index 0, never printed) keeps its name.
    A printed vocabulary maps to itself."""
    def printed(token: str) -> str:
        if token == WORD_DELIMITER_TOKEN:
            return WORD_SEPARATOR
        return "" if token == UNK_TOKEN or (len(token) > 2 and token[0] == "<" and token[-1] == ">") else token

    return [vocabulary[0], *(printed(t) for t in vocabulary[1:])]


def best_path(log_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log_probs (T, V) -> the best token of each frame (T,) and its probability (T,)."""
    best = log_probs.argmax(axis=-1)  # (T,)
    return best, np.exp(log_probs[np.arange(len(best)), best])


def collapse_path(path: Sequence[int] | np.ndarray, blank: int = BLANK_ID) -> list[int]:
    """CTC collapse of one path (its real frames only; a list, numpy or torch): merge repeats, then drop blanks."""
    tokens = path.tolist() if hasattr(path, "tolist") else list(path)
    return [t for i, t in enumerate(tokens) if t != blank and (i == 0 or t != tokens[i - 1])]


def path_text(path: Sequence[int] | np.ndarray, vocabulary: Sequence[str]) -> str:
    """A CTC path (T,) -> its text as the server prints it: words joined by single spaces.

    `vocabulary`: a policy's (its token names) or a graph's printed one."""
    printed = serving_vocabulary(vocabulary)
    return " ".join("".join(printed[t] for t in collapse_path(path)).split())


def greedy_ctc_text(log_probs: np.ndarray, vocabulary: Sequence[str]) -> str:
    """Best-path text of a whole utterance's log-probs (T, V): argmax, collapse repeats, drop blanks."""
    return path_text(best_path(log_probs)[0], vocabulary)


@dataclass(frozen=True)
class WordTiming:
    word: str
    start_s: float
    """Offset from the start of the stream's audio."""
    end_s: float
    confidence: float


@dataclass(frozen=True)
class Hypothesis:
    """The best path so far: complete words that never change, complete words a beam search may still
    revise, and the word still being spelled."""

    stable: tuple[WordTiming, ...] = ()
    tentative: WordTiming | None = None
    unstable: tuple[WordTiming, ...] = ()
    """Complete words after the stable ones that may still change (a beam search's; greedy: none)."""

    @property
    def words(self) -> tuple[WordTiming, ...]:
        words = (*self.stable, *self.unstable)
        return words if self.tentative is None else (*words, self.tentative)

    @property
    def transcript(self) -> str:
        return " ".join(w.word for w in self.words)

    @property
    def stable_transcript(self) -> str:
        return " ".join(w.word for w in self.stable)

    @property
    def stability(self) -> float:
        """The share of the transcript's characters that will not change (0 for an empty transcript)."""
        transcript = self.transcript
        return len(self.stable_transcript) / len(transcript) if transcript else 0.0

    @property
    def confidence(self) -> float:
        words = self.words
        return sum(w.confidence for w in words) / len(words) if words else 0.0

    def finalized(self) -> Hypothesis:
        """At an endpoint the trailing word is complete too."""
        return Hypothesis(self.words, None)


@dataclass
class _Token:
    token_id: int
    start_s: float
    end_s: float
    probability: float


class CtcGreedyDecoder:
    """Best-path decoding of one utterance, fed chunk by chunk.

    vocabulary: printed form of each token (index 0 the blank; " " separates words; a token may print
    "" or several characters). frame_shift_s: seconds between encoder frames.
    Complete words are kept as they close, so a hypothesis costs O(words), not a re-decode.
    """

    def __init__(self, vocabulary: tuple[str, ...] | list[str], frame_shift_s: float, *,
                 previous_token: int = BLANK_ID):
        self.vocabulary = tuple(vocabulary)
        self.frame_shift_s = frame_shift_s
        # The token of the frame before this utterance: a repeat across an endpoint is not re-emitted.
        self._previous = previous_token
        self._last: _Token | None = None  # the last emitted token (a repeat extends it)
        self._stable: list[WordTiming] = []
        self._spelling: list[str] = []  # the open word's characters
        self._word_tokens: list[_Token] = []  # and the tokens that spelled them
        self.frames = 0
        self.trailing_blank_frames = 0
        """Frames since the last non-blank frame (all frames while nothing was emitted)."""

    @property
    def last_token(self) -> int:
        return self._previous

    @property
    def has_output(self) -> bool:
        """Whether any non-blank token was emitted: the endpointer's "speech"."""
        return self._last is not None

    def feed(self, log_probs: np.ndarray, first_frame_s: float) -> None:
        """log_probs (T, V) of consecutive frames, the first at `first_frame_s` in the stream."""
        if len(log_probs) == 0:
            return
        self.feed_path(*best_path(log_probs), first_frame_s)

    def feed_path(self, path: np.ndarray, probability: np.ndarray, first_frame_s: float) -> None:
        """A given CTC path: token ids (T,) and each frame's probability of its token (T,).

        `feed` passes the best path; a beam search passes each of its hypotheses' paths, so their
        words get timings and confidences the same way.
        """
        for t, (token_id, p) in enumerate(zip(path.tolist(), probability.tolist(), strict=True)):
            start_s = first_frame_s + t * self.frame_shift_s
            if token_id == BLANK_ID:
                self.trailing_blank_frames += 1
            else:
                self.trailing_blank_frames = 0
                if token_id == self._previous and self._last is not None:
                    self._last.end_s = start_s + self.frame_shift_s  # a repeat: one more frame of the same token
                    self._last.probability = max(self._last.probability, p)
                elif token_id != self._previous:
                    self._emit(_Token(token_id, start_s, start_s + self.frame_shift_s, p))
            self._previous = token_id
        self.frames += len(path)

    def _emit(self, token: _Token) -> None:
        self._last = token
        for char in self.vocabulary[token.token_id]:
            if char == WORD_SEPARATOR:
                if self._spelling:
                    self._stable.append(self._open_word())
                self._spelling, self._word_tokens = [], []
            else:
                self._spelling.append(char)
                if not self._word_tokens or self._word_tokens[-1] is not token:
                    self._word_tokens.append(token)

    def _open_word(self) -> WordTiming:
        tokens = self._word_tokens
        confidence = sum(t.probability for t in tokens) / len(tokens)
        # Microseconds: frame times are sums of float shifts; rounding keeps equal paths equal.
        return WordTiming("".join(self._spelling), round(tokens[0].start_s, 6), round(tokens[-1].end_s, 6),
                          confidence)

    def hypothesis(self) -> Hypothesis:
        return Hypothesis(tuple(self._stable), self._open_word() if self._spelling else None)

    def final_hypotheses(self, max_alternatives: int) -> tuple[Hypothesis, ...]:
        """At the endpoint: the n-best, best first. Greedy decoding knows one path, so one hypothesis."""
        return (self.hypothesis().finalized(),)


class UtteranceDecoder(Protocol):
    """What a stream needs of the decoder of one utterance (greedy, or a beam search beside a greedy one)."""

    frames: int
    trailing_blank_frames: int
    """Frames since the last non-blank best-path frame: what the endpointer reads."""

    @property
    def last_token(self) -> int: ...

    @property
    def has_output(self) -> bool: ...

    def feed(self, log_probs: np.ndarray, first_frame_s: float) -> None: ...

    def hypothesis(self) -> Hypothesis:
        """The interim hypothesis (cheap: called every chunk)."""
        ...

    def final_hypotheses(self, max_alternatives: int) -> tuple[Hypothesis, ...]:
        """The final n-best (at most max_alternatives, distinct transcripts, best first; at least one)."""
        ...


DecoderFactory = Callable[[int], UtteranceDecoder]
"""previous_token -> a fresh decoder for one utterance (see CtcGreedyDecoder's previous_token)."""


def greedy_decoder_factory(vocabulary: tuple[str, ...] | list[str], frame_shift_s: float) -> DecoderFactory:
    """Best-path decoding: what a version without card["decoder"] is decoded with."""
    vocabulary = tuple(vocabulary)
    return lambda previous_token: CtcGreedyDecoder(vocabulary, frame_shift_s, previous_token=previous_token)
