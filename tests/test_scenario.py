"""The adaptation scenario: a domain the base corpus never used, held-out voices, splits, target-word accuracy."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
from voxloop.trainer.config import CorpusConfig
from voxloop.trainer.corpus import load_sentences
from voxloop.trainer.scenario import (
    DEPLOYMENT_VOICES,
    TARGET_WORDS,
    ScenarioConfig,
    build_scenario,
    domain_sentences,
    is_built,
    load_scenario,
    plan_scenario,
    target_word_accuracy,
)


@pytest.fixture(scope="module")
def base_sentences(tmp_path_factory):
    """The sentences `voxloop pretrain corpus` reads (defaults), without synthesizing them."""
    return load_sentences(CorpusConfig(out_dir=tmp_path_factory.mktemp("unused")))


@pytest.fixture(scope="module")
def default_plan(tmp_path_factory):
    return plan_scenario(ScenarioConfig(out_dir=tmp_path_factory.mktemp("plan")))


@pytest.mark.slow  # reads every Debian fortune
def test_target_words_never_occur_in_base_transcripts_and_carrier_words_all_do(base_sentences, default_plan):
    base_words = {word for sentence in base_sentences for word in sentence.text.split()}
    domain = [job for job in default_plan if job.split in ("feedback", "test")]
    domain_words = {word for job in domain for word in job.sentence.text.split()}

    assert not TARGET_WORDS & base_words
    assert domain_words - TARGET_WORDS <= base_words  # the only novelty is the target words
    assert domain_words >= TARGET_WORDS


def test_feedback_and_test_are_disjoint_sentences_sharing_every_target_word():
    splits = domain_sentences(0, {"feedback": 144, "test": 80})

    feedback = {s.text for s in splits["feedback"]}
    test = {s.text for s in splits["test"]}
    assert (len(feedback), len(test)) == (144, 80)  # distinct within each split
    assert not feedback & test
    for texts in (feedback, test):
        assert {w for t in texts for w in t.split()} >= TARGET_WORDS
    assert domain_sentences(0, {"feedback": 144, "test": 80}) == splits
    assert domain_sentences(1, {"feedback": 144, "test": 80}) != splits


@pytest.mark.slow  # reads every Debian fortune
def test_domain_voices_are_held_out_of_base_training(default_plan):
    corpus = CorpusConfig(out_dir="unused")
    for engine, voice in DEPLOYMENT_VOICES:
        if engine == "flite":
            assert voice not in corpus.training_flite_voices
        else:
            language, _, variant = voice.partition("+")
            assert language not in corpus.training_espeak_languages or variant not in corpus.training_espeak_variants
    used = {(job.engine, job.voice) for job in default_plan if job.split != "anchor"}
    assert used == set(DEPLOYMENT_VOICES)


@pytest.mark.slow  # reads every Debian fortune
def test_anchor_is_the_base_corpus_test_split_as_its_builder_plans_it(default_plan, base_sentences):
    anchor = [job for job in default_plan if job.split == "anchor"]
    from voxloop.trainer.corpus import _plan_jobs

    base_test = [job for job in _plan_jobs(CorpusConfig(out_dir="unused"), base_sentences) if job.split == "test"]
    assert len(anchor) == 60
    for ours, theirs in zip(anchor, base_test, strict=False):
        assert (ours.sentence, ours.engine, ours.voice, ours.rate, ours.pitch) == \
               (theirs.sentence, theirs.engine, theirs.voice, theirs.rate, theirs.pitch)


def test_target_word_accuracy_counts_aligned_hits_only():
    references = ["send two crates of brixa to ulmoor", "check the stock", "cancel the plaxo order"]
    hypotheses = ["send two crates of brixa to olmore", "check the stock", "plaxo cancel the order"]

    score = target_word_accuracy(references, hypotheses)
    # crates, brixa right; ulmoor wrong; cancel and plaxo present but not where the reference has them
    # (the alignment matches "cancel the" and misses plaxo's position).
    assert score.total == 5
    assert score.hits == 3  # crates, brixa, cancel
    assert score.accuracy == pytest.approx(0.6)
    assert target_word_accuracy(["send crates"], [""]).hits == 0
    with pytest.raises(ValueError, match="references but"):
        target_word_accuracy(["a"], [])


def test_bad_sizes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="feedback_utterances must be at least 12"):
        ScenarioConfig(out_dir="x", feedback_utterances=5)
    with pytest.raises(ValueError, match="anchor_utterances"):
        ScenarioConfig(out_dir="x", anchor_utterances=0)


@pytest.mark.slow
def test_build_writes_16khz_wavs_and_manifests_and_reuses_a_built_scenario(tmp_path):
    config = ScenarioConfig(out_dir=tmp_path / "scenario", feedback_utterances=12, test_utterances=12,
                            anchor_utterances=2, workers=1)
    assert not is_built(config)
    build_scenario(config)
    scenario = load_scenario(config.out_dir)

    assert (len(scenario.feedback), len(scenario.test), len(scenario.anchor)) == (12, 12, 2)
    assert scenario.target_words == TARGET_WORDS
    for utterance in scenario.feedback + scenario.test + scenario.anchor:
        info = sf.info(str(utterance.path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 0.5 < info.duration == pytest.approx(utterance.duration_s, abs=1e-3)
    summary = json.loads((config.out_dir / "scenario.json").read_text())
    assert summary["utterances"] == {"feedback": 12, "test": 12, "anchor": 2}

    mtime = scenario.test[0].path.stat().st_mtime_ns
    assert is_built(config)
    build_scenario(config)  # the same scenario: reused, nothing re-synthesized
    assert scenario.test[0].path.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="holds something other than this scenario"):
        build_scenario(ScenarioConfig(out_dir=config.out_dir, seed=1, feedback_utterances=12,
                                      test_utterances=12, anchor_utterances=2, workers=1))
