"""The second pass of a Whisper-based version: its finals, decoded by Whisper's own decoder.

The first pass (model.onnx, a `windowed-ctc/1` graph with a CTC head on Whisper's encoder) streams
interim results and finds endpoints like any CTC model. At an endpoint the utterance's audio (the
silence at its edges cut, when the card sets `trim_margin_s`: core/speech_span.py) goes through
`encoder.onnx` once (its cross-attention keys and values; the padding states' after them, as in Whisper's
30 s window, are constants of the decoder graph) and `decoder.onnx` step by step with a key/value cache:
greedy for one transcript, a beam search for an n-best. When the card sets `segment_pause_s` an utterance
is cut at its long pauses and each segment decoded so (`segments`; a stream sends each as its pause ends,
server/segments.py), their transcripts joined.
Card section (docs/model-format.md, "whisper-two-pass/1"):

    card["second_pass"] = {"type": "whisper", "encoder": "encoder.onnx", "decoder": "decoder.onnx",
                           "tokenizer": "tokenizer.json", "prompt": [start-of-transcript, no-timestamps],
                           "end_of_text": 50256, "suppress_tokens": [...], "begin_suppress_tokens": [...],
                           "timestamp_begin": 50363, "start_of_previous": 50360,
                           "context_words": [], "max_tokens_per_s": 12}

Whisper writes cased, punctuated text with digits ("Mr. Dashwood, 10 of clubs."); voxloop's
transcripts, corrections and rewards are normalized text (core/text.py), so each Whisper word is
normalized into zero or more voxloop words that share its timing and confidence. Word timings come
from the cross-attention of Whisper's alignment heads (the frame each token attends most, made
monotonic); confidence is the mean probability of a word's tokens. The version's context words (rare
words its users corrected) bias the search toward their spellings (core/context_bias.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .context_bias import (
    CONTINUE_BONUS,
    MAX_CONTEXT_WORD_CHARS,
    MAX_CONTEXT_WORDS,
    START_BONUS,
    ContextBias,
    word_spellings,
)
from .decoder import Hypothesis, WordTiming
from .limits import MAX_BEAM_SIZE
from .model import MODEL_SAMPLE_RATE_HZ, ModelFormatError, onnx_session
from .registry import version_file
from .speech_span import (
    BELOW_PEAK_DB,
    MIN_PAUSE_S,
    MIN_SPEECH_S,
    QUIET_DBFS,
    PauseCutter,
    segment_spans,
    speech_span,
    valid_pause_cut,
    valid_trim,
)
from .text import normalize_text

log = logging.getLogger(__name__)

SECOND_PASS_KEY = "second_pass"
NO_SPEECH_TOKENS = ("<|nocaptions|>", "<|nospeech|>")
"""Whisper's no-speech token: English-only vocabularies call it nocaptions, multilingual ones nospeech."""
WHISPER_TYPE = "whisper"
ENCODER_FRAME_S = 0.02
"""Seconds per encoder frame (and cross-attention position)."""
SAMPLES_PER_ENCODER_FRAME = 320
MIN_TOKENS = 8
"""Decoding may always run this many tokens, however short the utterance."""
MAX_TOTAL_TOKENS = 224
"""Whisper's own sample_len: half its 448 positions."""


@dataclass(frozen=True)
class SecondPassSettings:
    """The card's second_pass section, validated."""

    encoder: str
    decoder: str
    tokenizer: str
    prompt: tuple[int, ...]
    end_of_text: int
    suppress_tokens: tuple[int, ...]
    begin_suppress_tokens: tuple[int, ...]
    timestamp_begin: int
    start_of_previous: int
    context_words: tuple[str, ...] = ()
    """Rare words the version's users corrected into its transcripts (text-side adaptation): the search
    is biased toward their spellings (core/context_bias.py)."""
    context_start_bonus: float = START_BONUS
    """Nats a token starting a context word's spelling gets."""
    context_continue_bonus: float = CONTINUE_BONUS
    """Nats a token continuing a context word's spelling gets."""
    max_tokens_per_s: float = 12.0
    """Tokens a final may have per second of audio (a loop breaker; speech is ~3-5 tokens a second)."""
    beam_size: int = 1
    """Beams of the finals' search (1: greedy). More beams cost more decoder rows per step."""
    trim_margin_s: float | None = None
    """Seconds kept either side of the utterance's speech when its edges' silence is cut before the second
    pass (core/speech_span.py); None decodes the whole utterance (versions before whisper-tiny.en-v5)."""
    trim_below_peak_db: float = BELOW_PEAK_DB
    """A frame is speech within this many dB of the utterance's loudest frame (when trim_margin_s is set)."""
    segment_pause_s: float | None = None
    """An utterance is cut at every pause this long (core/speech_span.py PauseCutter) and its segments decoded
    on their own (a stream sends each as its pause ends); None decodes it whole (versions before
    whisper-tiny.en-v6)."""
    segment_quiet_dbfs: float = QUIET_DBFS
    """A 20 ms frame below this level is pause (when segment_pause_s is set)."""
    segment_min_speech_s: float = MIN_SPEECH_S
    """Least sound (frames above that level) a segment must hold to be decoded on its own."""
    no_speech_threshold: float | None = None
    """An utterance or segment whose no-speech probability (Whisper's <|nocaptions|> right after
    start-of-transcript) passes this and whose transcript's mean token log-prob is below -1 decodes to
    nothing (Whisper's own rule, 0.6 and -1 there): a segment of noise cut off at a pause would otherwise
    come out as words ("there you go"). None: no such check."""

    @classmethod
    def from_card(cls, card: dict) -> SecondPassSettings:
        section = card.get(SECOND_PASS_KEY)
        if not isinstance(section, dict) or section.get("type") != WHISPER_TYPE:
            raise ModelFormatError(f"card[{SECOND_PASS_KEY!r}] must be a dict with type {WHISPER_TYPE!r}")
        if not 1 <= int(section.get("beam_size", 1)) <= MAX_BEAM_SIZE:
            raise ModelFormatError(f"card[{SECOND_PASS_KEY!r}]['beam_size'] must be 1..{MAX_BEAM_SIZE}")
        try:
            settings = cls(
                encoder=str(section["encoder"]), decoder=str(section["decoder"]), tokenizer=str(section["tokenizer"]),
                prompt=tuple(int(t) for t in section["prompt"]), end_of_text=int(section["end_of_text"]),
                suppress_tokens=tuple(int(t) for t in section.get("suppress_tokens", ())),
                begin_suppress_tokens=tuple(int(t) for t in section.get("begin_suppress_tokens", ())),
                timestamp_begin=int(section["timestamp_begin"]), start_of_previous=int(section["start_of_previous"]),
                context_words=tuple(str(w) for w in section.get("context_words", ())),
                context_start_bonus=float(section.get("context_start_bonus", START_BONUS)),
                context_continue_bonus=float(section.get("context_continue_bonus", CONTINUE_BONUS)),
                max_tokens_per_s=float(section.get("max_tokens_per_s", 12.0)),
                beam_size=int(section.get("beam_size", 1)),
                trim_margin_s=_optional_float(section, "trim_margin_s"),
                trim_below_peak_db=float(section.get("trim_below_peak_db", BELOW_PEAK_DB)),
                segment_pause_s=_optional_float(section, "segment_pause_s"),
                segment_quiet_dbfs=float(section.get("segment_quiet_dbfs", QUIET_DBFS)),
                segment_min_speech_s=float(section.get("segment_min_speech_s", MIN_SPEECH_S)),
                no_speech_threshold=_optional_float(section, "no_speech_threshold"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"card[{SECOND_PASS_KEY!r}] is incomplete or malformed: {e!r}") from None
        if len(settings.context_words) > MAX_CONTEXT_WORDS or any(
                not 0 < len(w) <= MAX_CONTEXT_WORD_CHARS for w in settings.context_words):
            raise ModelFormatError(f"card[{SECOND_PASS_KEY!r}]['context_words'] must be at most {MAX_CONTEXT_WORDS} "
                                   f"words of 1..{MAX_CONTEXT_WORD_CHARS} characters")
        if not valid_trim(settings.trim_margin_s, settings.trim_below_peak_db):
            raise ModelFormatError(f"card[{SECOND_PASS_KEY!r}]: trim_margin_s must be >= 0 and trim_below_peak_db > 0")
        if not valid_pause_cut(settings.segment_pause_s, settings.segment_quiet_dbfs, settings.segment_min_speech_s):
            raise ModelFormatError(f"card[{SECOND_PASS_KEY!r}]: segment_pause_s must be >= {MIN_PAUSE_S:g}, "
                                   "segment_quiet_dbfs < 0 and segment_min_speech_s > 0")
        if not valid_no_speech_threshold(settings.no_speech_threshold):
            raise ModelFormatError(f"card[{SECOND_PASS_KEY!r}]: no_speech_threshold must be in (0, 1)")
        return settings


Cross = dict[str, np.ndarray]
"""The decoder's inputs describing B utterances: cross_k_<l>, cross_v_<l> (B, heads, F, hd) per layer, and
`frames` (B,), each row's own positions among the F (the rest are padding to the batch's longest). Graphs exported
before 2026-12-03 take 1500 spliced positions per row and no `frames`."""
FRAMES = "frames"


def encoded_cross(encoder: ort.InferenceSession, audio: np.ndarray) -> Cross:
    """encoder.onnx on audio (1, S) -> the decoder's inputs for it."""
    names = [o.name for o in encoder.get_outputs()]
    cross = dict(zip(names, encoder.run(names, {"audio": audio}), strict=True))
    cross[FRAMES] = np.array([cross[names[0]].shape[2]], dtype=np.int64)
    return cross


def stack_cross(crosses: list[Cross]) -> Cross:
    """Several utterances' decoder inputs as one batch, keys and values zero-padded to the longest."""
    if len(crosses) == 1:
        return crosses[0]
    longest = max(c[FRAMES][0] for c in crosses)
    stacked = {FRAMES: np.concatenate([c[FRAMES] for c in crosses])}
    for name in crosses[0].keys() - {FRAMES}:
        rows = [c[name] for c in crosses]
        batch = np.zeros((len(rows), rows[0].shape[1], longest, rows[0].shape[3]), dtype=rows[0].dtype)
        for index, row in enumerate(rows):
            batch[index, :, : row.shape[2]] = row[0]
        stacked[name] = batch
    return stacked


@dataclass
class _Beam:
    tokens: list[int]
    log_prob: float
    token_log_probs: list[float]
    row: int
    """Its row in the decoder's batched cache."""

    def decoded(self) -> DecodedTokens:
        return DecodedTokens(tuple(self.tokens), tuple(self.token_log_probs), self.log_prob)


@dataclass(frozen=True)
class DecodedTokens:
    """One transcript of the second pass, before normalization."""

    tokens: tuple[int, ...]
    token_log_probs: tuple[float, ...]
    log_prob: float
    alignment: np.ndarray | None = field(default=None, compare=False)
    """(N, positions): the alignment heads' cross-attention of the step that chose each token, when the search kept
    it; the first positions are the utterance's frames (then padding, pooled or not, as the graph attends it)."""

    @property
    def mean_log_prob(self) -> float:
        """Per token: how beams are ranked (Whisper's length penalty off) and how sure a transcript is."""
        return self.log_prob / max(1, len(self.tokens))


class WhisperSecondPass:
    """encoder.onnx + decoder.onnx + the tokenizer of one version. `transcribe` is thread-safe (ONNX
    sessions are) and blocking: the server runs it in the version's own executor thread."""

    def __init__(self, encoder: Path, decoder: Path, tokenizer: Path, settings: SecondPassSettings, *,
                 intra_op_threads: int = 1):
        self.settings = settings
        self._encoder = onnx_session(encoder, intra_op_threads=intra_op_threads)
        self._decoder = onnx_session(decoder, intra_op_threads=intra_op_threads)
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer))
        except Exception as e:  # tokenizers raises its own Exception type
            raise ModelFormatError(f"{settings.tokenizer} is not a tokenizers JSON file: {e}") from e
        cache = next(i for i in self._decoder.get_inputs() if i.name == "self_k").shape  # (L, B, heads, P, hd)
        self._cache_shape = (cache[0], cache[2], cache[4])
        self._takes_frames = FRAMES in {i.name for i in self._decoder.get_inputs()}
        self._no_speech = next((i for i in map(self._tokenizer.token_to_id, NO_SPEECH_TOKENS) if i is not None), None)
        if settings.no_speech_threshold is not None and self._no_speech is None:
            raise ModelFormatError(f"{settings.tokenizer} has no no-speech token ({' or '.join(NO_SPEECH_TOKENS)})")
        self._suppress = np.array(sorted({*settings.suppress_tokens}), dtype=np.int64)
        self._begin_suppress = np.array(sorted({*settings.begin_suppress_tokens}), dtype=np.int64)
        spellings = word_spellings(settings.context_words,
                                   lambda text: self._tokenizer.encode(text, add_special_tokens=False).ids)
        self._bias = ContextBias(spellings, start_bonus=settings.context_start_bonus,
                                 continue_bonus=settings.context_continue_bonus)

    @classmethod
    def from_card(cls, card: dict, version_dir: Path, *, intra_op_threads: int = 1) -> WhisperSecondPass | None:
        """The version's second pass, or None when its card has none (a CTC version)."""
        if SECOND_PASS_KEY not in card:
            return None
        settings = SecondPassSettings.from_card(card)
        # Only files the card lists (their sha256 verified) and inside the version directory are opened.
        encoder, decoder, tokenizer = (version_file(version_dir, card, name)
                                       for name in (settings.encoder, settings.decoder, settings.tokenizer))
        return cls(encoder, decoder, tokenizer, settings, intra_op_threads=intra_op_threads)

    def encode(self, audio: np.ndarray) -> tuple[Cross, int]:
        """float32 (S,) 16 kHz -> the decoder's inputs for it (Cross), and its speech frames."""
        padded = -(-len(audio) // SAMPLES_PER_ENCODER_FRAME) * SAMPLES_PER_ENCODER_FRAME
        audio = np.pad(np.asarray(audio, dtype=np.float32), (0, padded - len(audio)))
        return encoded_cross(self._encoder, audio[None]), padded // SAMPLES_PER_ENCODER_FRAME

    def _step(self, tokens: np.ndarray, self_k: np.ndarray, self_v: np.ndarray,
              cross: Cross) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self._takes_frames:  # a graph exported before 2026-12-03: 1500 spliced positions per row
            cross = {name: x for name, x in cross.items() if name != FRAMES}
        return self._decoder.run(None, {"tokens": tokens, "self_k": self_k, "self_v": self_v, **cross})

    def _mask(self, log_probs: np.ndarray, first: bool) -> np.ndarray:
        """Whisper's logit filters: suppressed tokens, timestamps (off), blank/end-of-text at the start."""
        log_probs = log_probs.copy()
        log_probs[:, self._suppress] = -np.inf
        log_probs[:, self.settings.timestamp_begin :] = -np.inf
        if first:
            log_probs[:, self._begin_suppress] = -np.inf
        return log_probs

    def _first_call(self, cross: Cross, tokens: tuple[int, ...] | None = None):
        """One utterance's first decoder call (empty cache) on `tokens` (default: the prompt)."""
        layers, heads, head_dim = self._cache_shape
        empty = np.zeros((layers, 1, heads, 0, head_dim), dtype=np.float32)
        return self._step(np.array([tokens or self.settings.prompt], dtype=np.int64), empty, empty, cross)

    def greedy(self, cross: Cross, max_tokens: int) -> DecodedTokens:
        """The best token at every step, until end-of-text or `max_tokens`."""
        return self.greedy_batch([cross], [max_tokens])[0]

    def greedy_batch(self, crosses: list[Cross], budgets: list[int]) -> list[DecodedTokens]:
        """`greedy` for several utterances in lockstep: one decoder call per step for all of them, so the
        output projection (20 M weights, read once per call) and the padding states' keys and values are
        shared; ended utterances leave the batch (`_greedy_from`). The same tokens as `greedy` on each, up
        to the int8 graph's per-call activation scale. Each keeps its steps' alignment rows."""
        # Longest budget first: the utterances that end first are the batch's last rows, so it shrinks by
        # dropping its tail (a view) instead of copying the rows left.
        order = sorted(range(len(crosses)), key=lambda index: -budgets[index])
        cross = stack_cross([crosses[index] for index in order])
        layers, heads, head_dim = self._cache_shape
        empty = np.zeros((layers, len(crosses), heads, 0, head_dim), dtype=np.float32)
        prompt = np.repeat(np.array([self.settings.prompt], dtype=np.int64), len(crosses), axis=0)
        log_probs, self_k, self_v, alignment = self._step(prompt, empty, empty, cross)
        decoded = self._greedy_from(log_probs, self_k, self_v, alignment, cross,
                                    [_Beam([], 0.0, [], row) for row in range(len(crosses))],
                                    [budgets[index] for index in order])
        return [decoded[order.index(index)] for index in range(len(crosses))]

    def _greedy_from(self, log_probs: np.ndarray, self_k: np.ndarray, self_v: np.ndarray, alignment: np.ndarray | None,
                     cross: Cross, starts: list[_Beam], budgets: list[int]) -> list[DecodedTokens]:
        """Greedy steps for each decoder row from where `starts` (one per row, its tokens so far) left it, given
        that step's outputs, until end-of-text or its budget. A row that starts with tokens keeps no alignment
        (the steps before were not this search's); one that starts at the prompt keeps every step's."""
        tokens = [list(start.tokens) for start in starts]
        token_log_probs = [list(start.token_log_probs) for start in starts]
        alignments: list[list[np.ndarray]] = [[] for _ in starts]
        live: list[int | None] = list(range(len(starts)))  # each decoder row's utterance (None: ended)
        first = not any(tokens)  # rows step together: all at their first token or none
        while True:
            scores = self._mask(log_probs, first=first)
            first = False
            for row, index in enumerate(live):
                if index is None:
                    continue
                token = int(self._bias.biased(scores[row], tokens[index]).argmax())
                if token != self.settings.end_of_text:
                    tokens[index].append(token)
                    token_log_probs[index].append(float(scores[row, token]))
                    alignments[index].append(alignment[row, -1])
                if token == self.settings.end_of_text or len(tokens[index]) >= budgets[index]:
                    if token != self.settings.end_of_text:
                        log.warning("second pass hit its token budget (%d); the final is cut there", budgets[index])
                    live[row] = None  # its row keeps stepping, unread, until the batch is compacted
            alive = [row for row, index in enumerate(live) if index is not None]
            if not alive:
                break
            rows = alive[-1] + 1  # the batch up to its last live row: ended rows after it leave
            if rows <= len(live) // 2:  # views of the cross-attention inputs (large); ended rows before it step on
                live = live[:rows]
                self_k, self_v = self_k[:, :rows], self_v[:, :rows]
                cross = {name: x[:rows] for name, x in cross.items()}
            step = np.array([[tokens[index][-1] if index is not None else self.settings.end_of_text]
                             for index in live], dtype=np.int64)
            log_probs, self_k, self_v, alignment = self._step(step, self_k, self_v, cross)
        return [DecodedTokens(tuple(t), tuple(p), float(sum(p)), np.stack(a) if not start.tokens and a else None)
                for t, p, a, start in zip(tokens, token_log_probs, alignments, starts, strict=True)]

    def beam_search(self, cross: Cross, max_tokens: int, beam_size: int,
                    hurry: Callable[[], bool] | None = None) -> list[DecodedTokens]:
        """Whisper's beam search (patience 1): the beam_size best unfinished continuations are kept each
        step; it ends when beam_size transcripts have ended. Best first by mean token log-prob. When `hurry()`
        turns true (checked each step: other finals are waiting), the best unfinished beam is finished
        greedily on one row and ranked with those already finished."""
        log_probs, self_k, self_v, alignment = self._first_call(cross)
        live = [_Beam([], 0.0, [], 0)]
        finished: list[_Beam] = []
        beams = {n: np.repeat(x, beam_size, axis=0) for n, x in cross.items()}  # (beam_size, heads, F, hd)
        for step in range(max_tokens + 1):
            if 0 < step < max_tokens and hurry is not None and hurry():
                best = live[0]  # the live beams are kept best first
                rest, = self._greedy_from(log_probs[[best.row]], self_k[:, [best.row]], self_v[:, [best.row]],
                                          alignment[[best.row]], {n: x[:1] for n, x in beams.items()}, [best],
                                          [max_tokens])
                return _best_first([*(b.decoded() for b in finished), rest])
            scores = self._mask(log_probs, first=step == 0)  # (rows, V)
            candidates = []
            for beam in live:
                row = scores[beam.row]
                ranked = self._bias.biased(row, beam.tokens)  # the bonus steers the search, not the log-probs
                for token in np.argpartition(-ranked, beam_size)[: beam_size + 1]:
                    if np.isfinite(ranked[token]):
                        candidates.append((beam.log_prob + float(ranked[token]), beam, int(token), float(row[token])))
            candidates.sort(key=lambda c: -c[0])
            next_live: list[_Beam] = []
            # Best first: an ending counts only if it ranks above the beam_size-th continuation kept
            # (openai/whisper decoding.py BeamSearchDecoder.update), so a weak early end-of-text is not kept.
            for total, beam, token, token_log_prob in candidates:
                if len(next_live) == beam_size:
                    break
                if token == self.settings.end_of_text:
                    finished.append(_Beam(beam.tokens, total, beam.token_log_probs, beam.row))
                elif step < max_tokens:
                    next_live.append(_Beam([*beam.tokens, token], total, [*beam.token_log_probs, token_log_prob],
                                           beam.row))
            if len(finished) >= beam_size or not next_live:
                break
            rows = np.array([beam.row for beam in next_live])
            for index, beam in enumerate(next_live):
                beam.row = index
            tokens = np.array([[beam.tokens[-1]] for beam in next_live], dtype=np.int64)
            log_probs, self_k, self_v, alignment = self._step(tokens, self_k[:, rows], self_v[:, rows],
                                                      beams if len(next_live) == beam_size else
                                                      {n: x[: len(next_live)] for n, x in beams.items()})
            live = next_live
        finished = finished or live  # the token budget ran out: keep what was decoded
        return _best_first([b.decoded() for b in finished])

    def align(self, cross: Cross, tokens: tuple[int, ...]) -> np.ndarray:
        """(N + 1, positions) cross-attention of the steps that chose each of `tokens`, then end-of-text: one
        teacher-forced decoder call (as openai/whisper timing.py reads the alignment heads)."""
        _, _, _, alignment = self._first_call(cross, (*self.settings.prompt, *tokens))  # (1, P + N, positions)
        return alignment[0, len(self.settings.prompt) - 1 :]

    def transcribe(self, audio: np.ndarray, start_s: float = 0.0, max_alternatives: int = 1,
                   hurry: Callable[[], bool] | None = None) -> tuple[Hypothesis, ...]:
        """One endpointed utterance, float32 (S,) at 16 kHz starting `start_s` into its stream -> the n-best
        (at least one hypothesis; distinct transcripts, best first). The first comes from the version's own
        search (greedy, or `beam_size` beams) whatever the client asks, so an offline decode equals a
        stream's final: on each of its segments when the card cuts utterances at pauses (`segments`), their
        transcripts joined; the others from that beam on the whole utterance, or a wider one when more
        alternatives are asked for. `hurry` (the server's finals queue: other finals are waiting) cuts a
        one-best beam search short (beam_search); a final asking for an n-best is never hurried."""
        spans = self.segments(audio)
        if spans == [(0, len(audio))]:
            return self._transcribe_whole(audio, start_s, max_alternatives, hurry)
        best = joined([self._transcribe_whole(audio[begin:end], start_s + begin / MODEL_SAMPLE_RATE_HZ, 1, hurry)[0]
                       for begin, end in spans])
        if max_alternatives == 1:
            return (best,)
        return _distinct([best, *self._transcribe_whole(audio, start_s, max_alternatives)], max_alternatives)

    def segments(self, audio: np.ndarray) -> list[tuple[int, int]]:
        """The spans of an utterance decoded on their own: between its pause cuts (PauseCutter, when the card
        sets `segment_pause_s`; core/speech_span.py segment_spans); the whole utterance when there is no cut."""
        cutter = self.pause_cutter()
        if cutter is None:
            return [(0, len(audio))]
        return segment_spans(cutter.cuts(audio), len(audio), cutter)

    def pause_cutter(self) -> PauseCutter | None:
        """A new utterance's cutter at pauses, or None when the version decodes utterances whole."""
        if self.settings.segment_pause_s is None:
            return None
        return PauseCutter(min_pause_s=self.settings.segment_pause_s, quiet_dbfs=self.settings.segment_quiet_dbfs,
                           min_speech_s=self.settings.segment_min_speech_s)

    def _transcribe_whole(self, audio: np.ndarray, start_s: float, max_alternatives: int,
                          hurry: Callable[[], bool] | None = None) -> tuple[Hypothesis, ...]:
        audio, start_s = self.speech(audio, start_s)
        cross, speech_frames = self.encode(audio)
        budget = self._budget(audio)
        beam = self.settings.beam_size
        results = [self.greedy(cross, budget)] if beam == 1 else \
            self.beam_search(cross, budget, beam, hurry if max_alternatives == 1 else None)
        best = results[0]
        if _unsure(best) and self.no_speech(cross):
            return (Hypothesis(),)
        hypotheses = [self._hypothesis(best, self._alignment(cross, best), speech_frames, start_s)]
        if max_alternatives > 1:
            others = results[1:] if beam >= max_alternatives else \
                self.beam_search(cross, budget, max_alternatives)
            hypotheses += [self._hypothesis(decoded, None, speech_frames, start_s) for decoded in others]
        return _distinct(hypotheses, max_alternatives)

    def transcribe_batch(self, utterances: list[tuple[np.ndarray, float]]) -> list[Hypothesis]:
        """Several endpointed utterances ((audio, start_s) each) -> each one's greedy transcript (what
        `transcribe` gives on a greedy version; a beam version's backlog fallback): their segments each
        encoded on its own (their lengths differ), the decoder steps shared, each utterance's joined."""
        pieces = [(owner, *self.speech(audio[begin:end], start_s + begin / MODEL_SAMPLE_RATE_HZ))
                  for owner, (audio, start_s) in enumerate(utterances) for begin, end in self.segments(audio)]
        encoded = [self.encode(audio) for _, audio, _ in pieces]
        decoded = self.greedy_batch([cross for cross, _ in encoded], [self._budget(audio) for _, audio, _ in pieces])
        words: list[list[Hypothesis]] = [[] for _ in utterances]
        for best, (cross, frames), (owner, _, start_s) in zip(decoded, encoded, pieces, strict=True):
            if not (_unsure(best) and self.no_speech(cross)):
                words[owner].append(self._hypothesis(best, self._alignment(cross, best), frames, start_s))
        return [joined(hypotheses) for hypotheses in words]

    def no_speech(self, cross: Cross) -> bool:
        """Whether the encoded audio is, by Whisper's reckoning, likely no speech (the card's no_speech_threshold;
        one decoder call on start-of-transcript). A transcript of it is dropped when also unsure (`_unsure`)."""
        if self.settings.no_speech_threshold is None:
            return False
        log_probs, _, _, _ = self._first_call(cross, self.settings.prompt[:1])
        return float(np.exp(log_probs[0, self._no_speech])) > self.settings.no_speech_threshold

    def speech(self, audio: np.ndarray, start_s: float) -> tuple[np.ndarray, float]:
        """The utterance with its edges' silence cut (when the card says so), and where it now starts."""
        if self.settings.trim_margin_s is None:
            return audio, start_s
        start, end = speech_span(audio, margin_s=self.settings.trim_margin_s,
                                 below_peak_db=self.settings.trim_below_peak_db)
        return audio[start:end], start_s + start / MODEL_SAMPLE_RATE_HZ

    def _alignment(self, cross: Cross, decoded: DecodedTokens) -> np.ndarray:
        """The alignment rows the search kept (greedy), or a teacher-forced call for them (a beam's best)."""
        return decoded.alignment if decoded.alignment is not None else self.align(cross, decoded.tokens)

    def _budget(self, audio: np.ndarray) -> int:
        """The most tokens an utterance of this length may decode to (a loop breaker)."""
        return min(MAX_TOTAL_TOKENS, max(MIN_TOKENS, int(len(audio) / MODEL_SAMPLE_RATE_HZ
                                                         * self.settings.max_tokens_per_s)))

    def text(self, tokens: tuple[int, ...]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _hypothesis(self, decoded: DecodedTokens, alignment: np.ndarray | None, speech_frames: int,
                    start_s: float) -> Hypothesis:
        pieces = [self._tokenizer.decode([t], skip_special_tokens=True) for t in decoded.tokens]
        # A word starts at a token that begins with a space (Whisper's byte-level BPE convention).
        groups: list[list[int]] = []
        for i, piece in enumerate(pieces):
            if not groups or piece.startswith(" "):
                groups.append([i])
            else:
                groups[-1].append(i)
        frames = _token_frames(alignment, len(pieces), speech_frames)
        words: list[WordTiming] = []
        for g, group in enumerate(groups):
            raw = self.text(tuple(decoded.tokens[i] for i in group))
            normalized = normalize_text(raw).split()
            if not normalized:
                continue
            confidence = float(np.mean(np.exp([decoded.token_log_probs[i] for i in group])))
            begin = frames[group[0]]
            end = frames[groups[g + 1][0]] if g + 1 < len(groups) else max(frames[group[-1]] + 1, begin + 1)
            end = max(end, begin + 1)
            span = (end - begin) / len(normalized)
            for k, word in enumerate(normalized):
                words.append(WordTiming(word, round(start_s + (begin + k * span) * ENCODER_FRAME_S, 6),
                                        round(start_s + (begin + (k + 1) * span) * ENCODER_FRAME_S, 6), confidence))
        return Hypothesis(tuple(words), None)


NO_SPEECH_MEAN_LOG_PROB = -1.0
"""Whisper's logprob_threshold: audio likely no speech is dropped only if its transcript's mean token
log-prob is below this too (openai/whisper transcribe.py)."""


def _optional_float(section: dict, key: str) -> float | None:
    """A card setting that may be absent or null (off)."""
    value = section.get(key)
    return None if value is None else float(value)


def valid_no_speech_threshold(threshold: float | None) -> bool:
    """Whether a card's or policy's no-speech threshold makes sense (None: no check)."""
    return threshold is None or 0 < threshold < 1


def _unsure(decoded: DecodedTokens) -> bool:
    return decoded.mean_log_prob < NO_SPEECH_MEAN_LOG_PROB


def joined(hypotheses: list[Hypothesis]) -> Hypothesis:
    """An utterance's transcript from its segments' (in order)."""
    if len(hypotheses) == 1:
        return hypotheses[0]
    if not hypotheses:
        return Hypothesis()
    return Hypothesis(tuple(word for hypothesis in hypotheses for word in hypothesis.words), None)


def _distinct(hypotheses: list[Hypothesis], limit: int) -> tuple[Hypothesis, ...]:
    """The first `limit` hypotheses with distinct transcripts, in order."""
    kept: dict[str, Hypothesis] = {}
    for hypothesis in hypotheses:
        if len(kept) < limit:
            kept.setdefault(hypothesis.transcript, hypothesis)
    return tuple(kept.values())


def _best_first(transcripts: list[DecodedTokens]) -> list[DecodedTokens]:
    """A beam search's transcripts, best first by mean token log-prob (Whisper's length penalty off)."""
    return sorted(transcripts, key=lambda d: -d.mean_log_prob)


def _token_frames(alignment: np.ndarray | None, tokens: int, speech_frames: int) -> list[int]:
    """The encoder frame each token is said at: its alignment row's peak, made non-decreasing and kept
    inside the speech; without an alignment (an n-best alternative) the tokens are spread evenly."""
    if alignment is None or len(alignment) < tokens or tokens == 0:
        return [int(i * speech_frames / max(tokens, 1)) for i in range(tokens)]
    peaks = alignment[:tokens, :speech_frames].argmax(axis=-1)  # (N,)
    return [int(f) for f in np.maximum.accumulate(peaks)]
