"""Lexicon + word n-gram LM beam search (flashlight-text's LexiconDecoder), fed chunk by chunk.

A version whose card has a "decoder" section of type "lexicon-lm" ships a lexicon and an ARPA LM
(docs/model-format.md, "Decoder files"; trainer/lm.py writes them). `LexiconLmDecoderFactory` loads
them once per served version (KenLM model, word dictionary, lexicon trie: shared, read-only) and
makes one `LexiconLmDecoder` per utterance (the beam state: a few KB).

Streaming trade-off (measured in docs/benchmarks.md): the beam search advances with every chunk
(`decode_step` on the chunk's frames), so its cost is spread over the utterance and the final only
pays for closing the beam. Interim results and the endpointer read a greedy decoder that runs beside
the beam (cheap: O(1) per frame); of its complete words, those the beam's hypotheses all agree on
are stable (they cannot change), the others unstable: the final may re-spell them into lexicon
words. Which words the beam agrees on is re-read at most once per `stable_check_frames`, because
reading the beam costs O(beam x frames so far) per call (measured: reading it every chunk made
interims cost 2.5x the beam search itself on 11 s utterances). The final comes
from the beam: n-best, each with word timings and confidences taken along its own CTC path, exactly
as the greedy decoder computes them.

The model's word separator (" ") is the lexicon's word-boundary token "|"; every spelling ends with
it, so a word is complete only when a separator follows it. At the endpoint one forced separator
frame closes the last word (the speaker stopped: the word is over).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flashlight.lib.text.decoder import (
    CriterionType,
    LexiconDecoder,
    LexiconDecoderOptions,
    SmearingMode,
    Trie,
)
from flashlight.lib.text.decoder.kenlm import KenLM
from flashlight.lib.text.dictionary import Dictionary

from .decoder import WORD_SEPARATOR, CtcGreedyDecoder, DecoderFactory, Hypothesis
from .model import BLANK_ID, ModelFormatError
from .registry import VerificationError, version_file

log = logging.getLogger(__name__)

DECODER_TYPE = "lexicon-lm"
WORD_END_TOKEN = "|"
UNKNOWN_WORD = "<unk>"
FORCED_FRAME_LOG_PROB = -1e4
"""Log-prob of every token but the separator in the frame that closes the last word (not -inf: sums stay finite)."""
NBEST_OVERSAMPLE = 4
"""Final beam hypotheses read per alternative asked: several paths can spell the same words."""


class DecoderFilesError(ModelFormatError):
    """card["decoder"] or its files do not make a usable decoder (the version is not servable)."""


@dataclass(frozen=True)
class BeamSettings:
    """card["decoder"]'s search knobs, defaults tuned on corpus/dev (trainer/lm.py DecoderSettings adds the LM's)."""

    lm_weight: float = 1.2
    """Weight of the LM's log-probability against the acoustic log-probs."""
    word_score: float = -1.0
    """Score added per word (insertion bonus)."""
    beam_size: int = 32
    """Hypotheses kept after each frame."""
    beam_size_token: int = 12
    """Tokens tried per frame (the most likely ones)."""
    beam_threshold: float = 20.0
    """Hypotheses this far below the best are pruned."""
    sil_score: float = 0.0
    """Score added per word-boundary token."""
    stable_check_frames: int = 25
    """Interims re-read which words every beam hypothesis agrees on at most once per this many frames
    (25 = 1 s at 40 ms frames): reading the beam costs O(beam x frames so far), the greedy interim O(1)."""

    @classmethod
    def from_card(cls, section: dict) -> BeamSettings:
        known = {name: section[name] for name in cls.__dataclass_fields__ if name in section}
        try:
            settings = cls(**{k: (int(v) if k.startswith("beam_size") or k.endswith("_frames") else float(v))
                              for k, v in known.items()})
        except (TypeError, ValueError) as e:
            raise DecoderFilesError(f"card decoder settings are not numbers: {e}") from None
        if settings.beam_size < 1 or settings.beam_size_token < 1 or settings.stable_check_frames < 1:
            raise DecoderFilesError("card decoder beam_size, beam_size_token and stable_check_frames must be >= 1")
        return settings


def token_names(vocabulary: tuple[str, ...]) -> list[str]:
    """The flashlight token dictionary's entries, index = model output index.

    Single characters spell lexicon words; the separator is "|"; the blank and tokens that print
    nothing or several characters get names no spelling uses.
    """
    names = []
    for i, token in enumerate(vocabulary):
        if i == BLANK_ID:
            names.append("<blank>")
        elif token == WORD_SEPARATOR:
            names.append(WORD_END_TOKEN)
        elif len(token) == 1 and token != WORD_END_TOKEN:
            names.append(token)
        else:
            names.append(f"<token-{i}>")
    if WORD_END_TOKEN not in names:
        raise DecoderFilesError("the model's vocabulary has no word separator (\" \"): a lexicon cannot apply")
    if len(set(names)) != len(names):
        raise DecoderFilesError("the model's vocabulary prints the same character for two tokens")
    return names


def read_lexicon(path: Path, tokens: Dictionary) -> dict[str, list[list[int]]]:
    """word -> spellings as token ids; words spelled with characters the model cannot print are skipped."""
    lexicon: dict[str, list[list[int]]] = {}
    skipped = 0
    with path.open() as f:
        for line_number, line in enumerate(f, start=1):
            word, *spelling = line.split()
            if not spelling or spelling[-1] != WORD_END_TOKEN:
                raise DecoderFilesError(f"{path}:{line_number}: a spelling must end with {WORD_END_TOKEN!r}")
            if not all(tokens.contains(t) for t in spelling):
                skipped += 1
                continue
            lexicon.setdefault(word, []).append([tokens.get_index(t) for t in spelling])
    if skipped:
        log.warning("%s: %d words use characters the model cannot print; they are left out", path, skipped)
    if not lexicon:
        raise DecoderFilesError(f"{path}: no usable word")
    return lexicon


class LexiconLmDecoderFactory:
    """The shared, read-only part of one version's beam search; call it for each utterance's decoder."""

    def __init__(self, vocabulary: tuple[str, ...], frame_shift_s: float, lexicon_path: Path, lm_path: Path,
                 settings: BeamSettings):
        self.vocabulary = tuple(vocabulary)
        self.frame_shift_s = frame_shift_s
        self.settings = settings
        self._tokens = Dictionary()
        for name in token_names(self.vocabulary):
            self._tokens.add_entry(name)
        self.separator_id = self._tokens.get_index(WORD_END_TOKEN)
        lexicon = read_lexicon(lexicon_path, self._tokens)
        self._words = Dictionary()
        for word in lexicon:
            self._words.add_entry(word)
        self._words.add_entry(UNKNOWN_WORD)
        try:
            self._lm = KenLM(str(lm_path), self._words)
        except Exception as e:  # KenLM raises its own error types for a malformed ARPA file
            raise DecoderFilesError(f"{lm_path}: KenLM cannot load it: {e}") from e
        # A word's trie leaf carries its unigram LM score; smearing gives each prefix the best score
        # below it, so the search can prune partial words by what they may become.
        self._trie = Trie(self._tokens.index_size(), self.separator_id)
        start = self._lm.start(False)
        for word, spellings in lexicon.items():
            word_id = self._words.get_index(word)
            _, score = self._lm.score(start, word_id)
            for spelling in spellings:
                self._trie.insert(spelling, word_id, score)
        self._trie.smear(SmearingMode.MAX)
        self._unknown_id = self._words.get_index(UNKNOWN_WORD)
        self._options = LexiconDecoderOptions(
            beam_size=settings.beam_size, beam_size_token=min(settings.beam_size_token, len(self.vocabulary)),
            beam_threshold=settings.beam_threshold, lm_weight=settings.lm_weight, word_score=settings.word_score,
            unk_score=-math.inf, sil_score=settings.sil_score, log_add=False, criterion_type=CriterionType.CTC,
        )
        self.words = len(lexicon)
        log.info("lexicon-lm decoder: %d words from %s, LM %s", self.words, lexicon_path, lm_path)

    def word(self, word_id: int) -> str:
        return self._words.get_entry(word_id)

    def __call__(self, previous_token: int = BLANK_ID) -> LexiconLmDecoder:
        search = LexiconDecoder(self._options, self._trie, self._lm, self.separator_id, BLANK_ID,
                                self._unknown_id, [], False)
        return LexiconLmDecoder(self, search, previous_token)


class LexiconLmDecoder:
    """One utterance: the beam search advanced per chunk, and a greedy decoder for interims and endpoints."""

    def __init__(self, factory: LexiconLmDecoderFactory, search: LexiconDecoder, previous_token: int):
        self._factory = factory
        self._search = search
        self._greedy = CtcGreedyDecoder(factory.vocabulary, factory.frame_shift_s, previous_token=previous_token)
        self._chunks: list[np.ndarray] = []  # (T_i, V) log-probs fed: the paths' word confidences read them
        self._first_frame_s: float | None = None
        self._agreed: tuple[str, ...] = ()  # words all beam hypotheses share, as of frame _agreed_at
        self._agreed_at = 0
        self._search.decode_begin()

    @property
    def frames(self) -> int:
        return self._greedy.frames

    @property
    def trailing_blank_frames(self) -> int:
        return self._greedy.trailing_blank_frames

    @property
    def last_token(self) -> int:
        return self._greedy.last_token

    @property
    def has_output(self) -> bool:
        return self._greedy.has_output

    def feed(self, log_probs: np.ndarray, first_frame_s: float) -> None:
        """log_probs (T, V) of consecutive frames, the first at `first_frame_s` in the stream."""
        if len(log_probs) == 0:
            return
        if self._first_frame_s is None:
            self._first_frame_s = first_frame_s
        emissions = np.ascontiguousarray(log_probs, dtype=np.float32)  # flashlight reads the raw buffer
        self._chunks.append(emissions)
        self._search.decode_step(emissions.ctypes.data, *emissions.shape)
        self._greedy.feed(emissions, first_frame_s)

    def hypothesis(self) -> Hypothesis:
        """The interim: the greedy best path's words, of which those the beam agrees on are stable.

        A complete greedy word is stable when it matches, position by position, the words that every
        live beam hypothesis shares: all later hypotheses descend from live ones, so the final starts
        with those words too. The other complete words are unstable (the final may re-spell them into
        lexicon words), the word being spelled is tentative.
        """
        greedy = self._greedy.hypothesis()
        if self._greedy.frames - self._agreed_at >= self._factory.settings.stable_check_frames:
            self._agreed_at = self._greedy.frames
            self._agreed = self._agreed_words()
        complete, stable = greedy.stable, 0
        while stable < min(len(complete), len(self._agreed)) and complete[stable].word == self._agreed[stable]:
            stable += 1
        return Hypothesis(complete[:stable], greedy.tentative, complete[stable:])

    def _agreed_words(self) -> tuple[str, ...]:
        """The words every live hypothesis has completed, in order, as far as they all agree."""
        results = self._search.get_all_final_hypothesis()
        if not results:
            return ()
        word_ids = [[w for w in r.words if w >= 0] for r in results]
        agreed = []
        for position, word_id in enumerate(word_ids[0]):
            if not all(len(w) > position and w[position] == word_id for w in word_ids[1:]):
                break
            agreed.append(self._factory.word(word_id))
        return tuple(agreed)

    def final_hypotheses(self, max_alternatives: int) -> tuple[Hypothesis, ...]:
        """Close the beam (one forced separator frame ends the last word) and read up to max_alternatives."""
        vocabulary_size = len(self._factory.vocabulary)
        closing = np.full((1, vocabulary_size), FORCED_FRAME_LOG_PROB, dtype=np.float32)
        closing[0, self._factory.separator_id] = 0.0
        self._search.decode_step(closing.ctypes.data, 1, vocabulary_size)
        self._search.decode_end()
        frames = self._greedy.frames
        if frames == 0:
            return (self._greedy.hypothesis().finalized(),)
        log_probs = np.concatenate(self._chunks)  # (T, V)
        results = self._search.get_all_final_hypothesis()[: max_alternatives * NBEST_OVERSAMPLE]
        hypotheses, seen = [], set()
        for result in results:
            path = np.asarray(result.tokens[1 : frames + 1])  # [0] is the search's start node, [-1] the forced frame
            hypothesis = self._path_hypothesis(path, log_probs)
            if hypothesis.transcript in seen:
                continue
            seen.add(hypothesis.transcript)
            hypotheses.append(hypothesis)
            if len(hypotheses) == max_alternatives:
                break
        return tuple(hypotheses) or (self._greedy.hypothesis().finalized(),)

    def _path_hypothesis(self, path: np.ndarray, log_probs: np.ndarray) -> Hypothesis:
        """Words, timings and confidences along one CTC path (T,), as the greedy decoder gives them."""
        collapse = CtcGreedyDecoder(self._factory.vocabulary, self._factory.frame_shift_s)
        path = np.where(path < 0, BLANK_ID, path)
        collapse.feed_path(path, np.exp(log_probs[np.arange(len(path)), path]), self._first_frame_s or 0.0)
        return collapse.hypothesis().finalized()


def lm_decoder_paths(card: dict, version_dir: Path, overrides: dict | None = None) -> tuple[Path, Path, BeamSettings]:
    """The lexicon and LM files and the search settings of a "lexicon-lm" card["decoder"].

    Raises DecoderFilesError for another decoder type, or a file that is missing, not listed in the card's
    files (it would be read unverified) or outside the version directory.
    """
    section = card.get("decoder") or {}
    if section.get("type") != DECODER_TYPE:
        raise DecoderFilesError(f"card decoder type {section.get('type')!r} is not supported; this server "
                                f"decodes {DECODER_TYPE!r} (or greedily without a decoder section)")
    paths = []
    for key in ("lexicon", "lm"):
        name = section.get(key)
        try:  # listed in the card's files (sha256-verified) and inside the version directory
            path = version_file(version_dir, card, name)
        except VerificationError as e:
            raise DecoderFilesError(f"card decoder {key} file: {e}") from e
        if not path.is_file():
            raise DecoderFilesError(f"card decoder {key} file {name!r} is not in {version_dir}")
        paths.append(path)
    return paths[0], paths[1], BeamSettings.from_card({**section, **(overrides or {})})


def decoder_factory_from_card(card: dict, version_dir: Path, vocabulary: tuple[str, ...],
                              frame_shift_s: float) -> DecoderFactory | None:
    """The version's beam-search factory, or None when its card has no "decoder" (greedy decoding).

    Raises DecoderFilesError for an unknown decoder type or unusable files.
    """
    if not card.get("decoder"):
        return None
    lexicon, lm, settings = lm_decoder_paths(card, version_dir)
    return LexiconLmDecoderFactory(vocabulary, frame_shift_s, lexicon, lm, settings)
