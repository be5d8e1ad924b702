"""Lexicon + word-LM beam search: the LM estimate, the decoder on spelled-out emissions, adaptation, serving.

Emissions here are synthetic CTC log-probs that spell a text letter by letter (clearly, or with one
letter confusable), so each test knows what the right transcript is without an acoustic model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from voxloop.core.decoder import CtcGreedyDecoder
from voxloop.core.lm_decoder import (
    BeamSettings,
    DecoderFilesError,
    LexiconLmDecoderFactory,
    decoder_factory_from_card,
)
from voxloop.core.registry import CARD_FILE, MODEL_FILE, Registry, sha256_file
from voxloop.trainer.lm import (
    COUNTS_FILE,
    LEXICON_FILE,
    LM_FILE,
    DecoderSettings,
    adapt_decoder_files,
    decoder_card,
    decoder_section,
    estimate_lm,
    read_counts,
    sentence_counts,
    write_decoder_files,
)

VOCABULARY = ("", " ", "'", *"abcdefghijklmnopqrstuvwxyz", "")
FRAME_SHIFT_S = 0.04
TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the cat ran"]
SETTINGS = BeamSettings(lm_weight=1.0, word_score=0.0, beam_size=32, beam_size_token=10, beam_threshold=30.0,
                        stable_check_frames=3)


def spelled(text: str, *, confusion: dict[int, tuple[str, float]] | None = None, peak: float = 0.9) -> np.ndarray:
    """Log-probs (T, V) spelling `text`: per character one peaked frame then a blank frame.

    confusion {character index: (other letter, its share)} splits a frame between two letters.
    """
    frames = [("", 1.0)]
    for char in text:
        frames.append((char, peak))
        frames.append(("", peak))
    frames.append(("", 1.0))
    log_probs = np.full((len(frames), len(VOCABULARY)), 1e-4, dtype=np.float64)
    char_frame = {1 + 2 * i: i for i in range(len(text))}
    for t, (char, p) in enumerate(frames):
        index = VOCABULARY.index(char) if char else 0
        if t in char_frame and confusion and char_frame[t] in confusion:
            other, share = confusion[char_frame[t]]
            log_probs[t, VOCABULARY.index(other)] = share * p
            p = (1 - share) * p
        log_probs[t, index] = p
    log_probs /= log_probs.sum(axis=1, keepdims=True)
    return np.log(log_probs).astype(np.float32)


def decoder_files(tmp_path: Path, texts=TEXTS, order: int = 2) -> dict[str, Path]:
    return write_decoder_files(sentence_counts(texts), tmp_path, order)


def factory(files: dict[str, Path], settings: BeamSettings = SETTINGS) -> LexiconLmDecoderFactory:
    return LexiconLmDecoderFactory(VOCABULARY, FRAME_SHIFT_S, files[LEXICON_FILE], files[LM_FILE], settings)


def beam_decode(make: LexiconLmDecoderFactory, log_probs: np.ndarray, chunk_frames: int | None = None, n: int = 1):
    decoder = make()
    step = chunk_frames or len(log_probs)
    for start in range(0, len(log_probs), step):
        decoder.feed(log_probs[start : start + step], start * FRAME_SHIFT_S)
    return decoder.final_hypotheses(n)


# --- the language model ---------------------------------------------------------------------------


def _conditional(lm, history: tuple[str, ...], word: str) -> float:
    """p(word | history) from the ARPA tables, backing off as a reader does (naive reference)."""
    gram, backoff_log10 = (*history, word), 0.0
    while True:
        table = lm.orders[len(gram) - 1]
        if gram in table:
            return 10 ** (table[gram][0] + backoff_log10)
        context = gram[:-1]
        backoff_log10 += lm.orders[len(context) - 1].get(context, (0.0, 0.0))[1]
        gram = gram[1:]


CONTEXTS = {1: [()], 2: [(), ("the",), ("<s>",), ("cat",), ("ran",)],
            3: [("the",), ("<s>", "the"), ("the", "cat"), ("on", "the"), ("cat", "ran")]}


@pytest.mark.parametrize("order", [1, 2, 3])
def test_every_context_of_the_kneser_ney_lm_is_a_distribution(order):
    lm = estimate_lm(sentence_counts(TEXTS), order)
    predicted = [g[0] for g in lm.orders[0] if g[0] != "<s>"]
    for history in CONTEXTS[order]:
        assert sum(_conditional(lm, history, w) for w in predicted) == pytest.approx(1.0, abs=1e-9), history


def test_seen_continuations_are_likelier_than_unseen_ones():
    lm = estimate_lm(sentence_counts(TEXTS), 2)
    assert _conditional(lm, ("the",), "cat") > _conditional(lm, ("the",), "on") > 0
    assert lm.orders[0][("<s>",)][0] == -99.0  # ARPA: <s> is a context, never predicted


def test_lm_files_are_written_and_read_back(tmp_path):
    files = decoder_files(tmp_path)
    assert set(files) == {LEXICON_FILE, LM_FILE, COUNTS_FILE}
    assert "cat c a t |" in files[LEXICON_FILE].read_text().splitlines()
    assert read_counts(files[COUNTS_FILE]) == Counter({t: 1 for t in TEXTS})
    arpa = files[LM_FILE].read_text()
    assert arpa.startswith("\\data\\\nngram 1=") and arpa.rstrip().endswith("\\end\\")
    # Equal text gives byte-equal files (no gzip timestamp): a card's sha256 is reproducible.
    again = decoder_files(tmp_path / "again")
    assert all(sha256_file(files[name]) == sha256_file(again[name]) for name in files)


def test_estimating_from_no_text_is_a_clear_error():
    with pytest.raises(ValueError, match="no text"):
        estimate_lm(Counter(), 2)


# --- the decoder ----------------------------------------------------------------------------------


def test_beam_search_snaps_a_misspelled_word_to_the_lexicon(tmp_path):
    # "the cat sat" with the 'c' half confused with 'k': greedy spells "kat" or "cat"; make 'k' win.
    log_probs = spelled("the cat sat", confusion={4: ("k", 0.6)})
    greedy = CtcGreedyDecoder(VOCABULARY, FRAME_SHIFT_S)
    greedy.feed(log_probs, 0.0)
    assert greedy.hypothesis().transcript == "the kat sat"

    [best] = beam_decode(factory(decoder_files(tmp_path)), log_probs)

    assert best.transcript == "the cat sat"
    assert [w.word for w in best.words] == ["the", "cat", "sat"]
    assert all(0 < w.confidence <= 1 for w in best.words)
    assert best.words[0].start_s < best.words[1].start_s < best.words[2].start_s


def test_chunked_beam_decode_equals_the_whole_utterance_decode(tmp_path):
    make = factory(decoder_files(tmp_path))
    log_probs = spelled("the dog sat on the mat", confusion={4: ("b", 0.4), 12: ("o", 0.3)})
    whole = beam_decode(make, log_probs, n=3)
    for chunk_frames in (1, 5, 7):
        assert beam_decode(make, log_probs, chunk_frames, n=3) == whole


def test_n_best_alternatives_are_distinct_and_best_first(tmp_path):
    make = factory(decoder_files(tmp_path))
    log_probs = spelled("the cat sat", confusion={4: ("m", 0.45)})  # cat or mat

    alternatives = beam_decode(make, log_probs, n=4)

    transcripts = [a.transcript for a in alternatives]
    assert transcripts[0] == "the cat sat"
    assert "the mat sat" in transcripts
    assert len(set(transcripts)) == len(transcripts) >= 2
    assert len(beam_decode(make, log_probs, n=1)) == 1


def test_interim_stable_words_never_change_and_begin_the_final(tmp_path):
    decoder = factory(decoder_files(tmp_path))()
    log_probs = spelled("the dog sat on the mat", confusion={4: ("b", 0.45), 9: ("m", 0.4), 16: ("c", 0.45)})
    stable_seen: list[list[str]] = []
    for start in range(0, len(log_probs), 3):
        decoder.feed(log_probs[start : start + 3], start * FRAME_SHIFT_S)
        interim = decoder.hypothesis()
        stable = [w.word for w in interim.stable]
        assert interim.transcript.split()[: len(stable)] == stable
        assert not stable_seen or stable[: len(stable_seen[-1])] == stable_seen[-1]  # only ever grows
        stable_seen.append(stable)
    assert stable_seen[-1]  # the beam agreed on some words before the end
    final = decoder.final_hypotheses(1)[0]
    assert final.transcript == "the dog sat on the mat"
    assert final.transcript.split()[: len(stable_seen[-1])] == stable_seen[-1]


def test_the_endpointer_reads_the_greedy_best_path(tmp_path):
    decoder = factory(decoder_files(tmp_path))()
    log_probs = spelled("the kat")
    decoder.feed(log_probs, 0.0)
    assert decoder.has_output and decoder.trailing_blank_frames == 2 and decoder.frames == len(log_probs)
    assert decoder.final_hypotheses(1)[0].transcript == "the cat"


def test_silence_decodes_to_an_empty_final(tmp_path):
    log_probs = np.log(np.full((10, len(VOCABULARY)), 1e-6, dtype=np.float32))
    log_probs[:, 0] = 0.0
    [final] = beam_decode(factory(decoder_files(tmp_path)), log_probs)
    assert final.transcript == "" and final.words == ()


# --- text-side adaptation ---------------------------------------------------------------------------


def _version_with_decoder(tmp_path: Path, texts=TEXTS) -> Path:
    version_dir = tmp_path / "parent"
    files = decoder_files(version_dir, texts)
    card = {"version": "parent-1", "decoder": decoder_section(DecoderSettings(order=2, adapt_count_weight=3),
                                                               source="test texts"),
            "files": {name: sha256_file(path) for name, path in files.items()}}
    (version_dir / CARD_FILE).write_text(json.dumps(card))
    return version_dir


def test_adaptation_teaches_the_decoder_a_word_the_lexicon_lacked(tmp_path):
    parent = _version_with_decoder(tmp_path)
    log_probs = spelled("the zebra sat")
    before = beam_decode(factory({n: parent / n for n in (LEXICON_FILE, LM_FILE)}), log_probs)[0].transcript
    assert "zebra" not in before.split()  # a lexicon decoder can never spell an unknown word

    files = adapt_decoder_files(parent, ["The zebra sat."], tmp_path / "child")

    after = beam_decode(factory(files), log_probs)[0].transcript
    assert after == "the zebra sat"
    counts = read_counts(files[COUNTS_FILE])
    assert counts["the zebra sat"] == 3  # the parent card's adapt_count_weight
    assert all(counts[t] == 1 for t in TEXTS)


def test_a_parent_without_decoder_adapts_to_nothing(tmp_path):
    (tmp_path / CARD_FILE).write_text(json.dumps({"version": "greedy-1", "files": {}}))
    assert adapt_decoder_files(tmp_path, ["new words"], tmp_path / "out") == {}
    assert decoder_card({"version": "greedy-1"}) is None


def test_the_child_card_keeps_the_parents_decoder_settings():
    parent = {"version": "v1", "decoder": decoder_section(DecoderSettings(lm_weight=1.5), source="corpus")}
    child = decoder_card(parent)
    assert child["lm_weight"] == 1.5 and child["lexicon"] == LEXICON_FILE and child["type"] == "lexicon-lm"
    assert child["source"] == "adapted from v1"


# --- serving ------------------------------------------------------------------------------------------


def test_a_card_without_decoder_is_decoded_greedily(tmp_path):
    assert decoder_factory_from_card({"version": "v"}, tmp_path, VOCABULARY, FRAME_SHIFT_S) is None


def test_a_card_naming_a_missing_decoder_file_is_refused(tmp_path):
    card = {"decoder": {"type": "lexicon-lm", "lexicon": "lexicon.txt", "lm": "lm.arpa"}}
    with pytest.raises(DecoderFilesError, match="lexicon"):
        decoder_factory_from_card(card, tmp_path, VOCABULARY, FRAME_SHIFT_S)
    with pytest.raises(DecoderFilesError, match="not supported"):
        decoder_factory_from_card({"decoder": {"type": "neural"}}, tmp_path, VOCABULARY, FRAME_SHIFT_S)


def test_a_malformed_lm_file_is_refused(tmp_path):
    files = decoder_files(tmp_path)
    files[LM_FILE].write_text("not an arpa file\n")
    with pytest.raises(DecoderFilesError, match="KenLM"):
        factory(files)


def test_a_published_version_with_decoder_files_serves_beam_search(tiny_registry, tmp_path):
    """Registry round trip: decoder files listed (sha256) in the card, loaded as the version's decoder."""
    from voxloop.server.app import load_serving_model
    from voxloop.server.config import ServerConfig

    registry = Registry(tiny_registry)
    source = registry.version_dir(registry.current_version())
    files = decoder_files(tmp_path / "decoder")
    registry.publish("tiny-lm", {MODEL_FILE: source / MODEL_FILE, **files},
                     {"decoder": decoder_section(DecoderSettings(order=2), source="test texts")})
    config = ServerConfig(port=0, data_dir=tmp_path / "data", model_dir=tiny_registry)

    serving = load_serving_model(registry, config, open_streams=lambda: 1)

    assert serving.version == "tiny-lm" and serving.decoder_factory is not None
    card = registry.load_card("tiny-lm")
    assert set(files) <= set(card["files"])
    decoder = serving.new_decoder()
    vocabulary_size = len(serving.spec.vocabulary)
    decoder.feed(np.log(np.full((4, vocabulary_size), 1 / vocabulary_size, dtype=np.float32)), 0.0)
    assert all(set(h.transcript.split()) <= {w for t in TEXTS for w in t.split()}
               for h in decoder.final_hypotheses(3))
