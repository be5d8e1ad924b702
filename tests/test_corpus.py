import json
import math
from pathlib import Path

import pytest
import soundfile
import torch
from voxloop.core.text import is_normalized
from voxloop.trainer.config import CorpusConfig
from voxloop.trainer.corpus import (
    SAMPLE_RATE_HZ,
    SPLITS,
    add_noise,
    add_reverb,
    build_corpus,
    load_manifest,
    load_sentences,
    manifest_path,
    speed_perturb,
    split_sentences,
    trim_silence,
)

GOOD_SENTENCES = [
    "The cat sat quietly on the warm mat.",
    "Nobody expects a talking teapot at breakfast.",
    "We walked along the river until the sun went down.",
    "My brother owns 3 bicycles and a rusty old car.",
    "Please close the door when you leave the kitchen.",
    "Why do birds sing so loudly in the morning?",
    "Rain is falling softly on the garden roses.",
    "She finished the 2nd chapter before lunch!",
    "Every good story needs a surprising ending.",
    "The library opens early on quiet Sunday mornings.",
    "A small dog barked at the passing train.",
    "He forgot his umbrella at the busy station.",
    "Fresh bread smells wonderful on a cold day.",
]
BAD_FORTUNES = [
    "Visit http://example.com for more wisdom today.",
    "STOP SHOUTING AT THE COMPUTER RIGHT NOW.",
    "Meet Dr. Smith now.",  # splits after "Dr."; both halves are too short
    "The answer is 4242424242 plus 12345 or so.",
    "Use a + b * c to compute the thing.",
    "Too short.",
]


@pytest.fixture(scope="module")
def fortunes_dir(tmp_path_factory) -> Path:
    """A fortunes directory in Debian's layout, with decoys that must be skipped."""
    root = tmp_path_factory.mktemp("fortunes")
    fortunes = [" ".join(GOOD_SENTENCES[:2]), *GOOD_SENTENCES[2:], *BAD_FORTUNES]
    fortunes.append(
        "The cat sat quietly on the warm mat.\n\t\t-- A. Famous Person"
    )  # duplicate + attribution
    (root / "quotes").write_text("\n%\n".join(fortunes) + "\n%\n")
    (root / "quotes.dat").write_bytes(b"\x00\x01binary index")
    (root / "quotes.u8").write_text("This utf8 duplicate must never be read by the builder.\n%\n")
    (root / "off").mkdir()
    (root / "off" / "rude").write_text("This offensive fortune must never be read by the builder.\n%\n")
    return root


def _config(out_dir: Path, fortunes_dir: Path, workers: int) -> CorpusConfig:
    return CorpusConfig(out_dir=out_dir, seed=7, num_sentences=12, workers=workers, fortunes_dir=fortunes_dir)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, fortunes_dir) -> tuple[Path, Path]:
    """The same config built twice: in-process and with a 2-process pool."""
    root = tmp_path_factory.mktemp("corpora")
    first = build_corpus(_config(root / "a", fortunes_dir, workers=1))
    second = build_corpus(_config(root / "b", fortunes_dir, workers=2))
    return first, second


def _all_utterances(corpus_dir: Path):
    return {split: load_manifest(manifest_path(corpus_dir, split)) for split in SPLITS}


def test_sentence_loader_keeps_clean_sentences_and_drops_the_rest(fortunes_dir, tmp_path):
    sentences = load_sentences(CorpusConfig(out_dir=tmp_path, num_sentences=100, fortunes_dir=fortunes_dir))
    raw = {s.raw for s in sentences}
    assert raw == set(GOOD_SENTENCES)
    assert all(is_normalized(s.text) for s in sentences)
    assert "my brother owns three bicycles and a rusty old car" in {s.text for s in sentences}


def test_sentence_order_follows_the_seed(fortunes_dir, tmp_path):
    def order(seed):
        config = CorpusConfig(out_dir=tmp_path, seed=seed, num_sentences=100, fortunes_dir=fortunes_dir)
        return [s.text for s in load_sentences(config)]

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_sentences_split_at_terminal_punctuation_before_a_capital():
    assert split_sentences('He left. "Why?" she asked! and then nothing. Done') == [
        "He left.",
        '"Why?" she asked! and then nothing.',
        "Done",
    ]


@pytest.mark.slow  # speech synthesis
def test_same_config_gives_identical_manifests_and_audio_whatever_the_workers(corpora):
    first, second = corpora
    for split in SPLITS:
        assert manifest_path(first, split).read_bytes() == manifest_path(second, split).read_bytes()
    wavs = sorted(p.relative_to(first) for p in first.rglob("*.wav"))
    assert wavs == sorted(p.relative_to(second) for p in second.rglob("*.wav"))
    assert len(wavs) == sum(len(u) for u in _all_utterances(first).values())
    for wav in wavs:
        assert (first / wav).read_bytes() == (second / wav).read_bytes(), wav


@pytest.mark.slow  # speech synthesis
def test_every_split_has_utterances_and_the_summary_counts_them(corpora):
    corpus_dir = corpora[0]
    summary = json.loads((corpus_dir / "corpus.json").read_text())
    for split, utterances in _all_utterances(corpus_dir).items():
        assert utterances, split
        assert summary["utterances"][split] == len(utterances)
        assert summary["hours"][split] == pytest.approx(
            sum(u.duration_s for u in utterances) / 3600, abs=1e-3
        )


@pytest.mark.slow  # speech synthesis
def test_splits_are_disjoint_by_sentence(corpora):
    by_split = {split: {u.text for u in us} for split, us in _all_utterances(corpora[0]).items()}
    assert not by_split["train"] & by_split["dev"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["dev"] & by_split["test"]
    assert not (by_split["test_heldout_espeak"] | by_split["test_heldout_flite"]) & (
        by_split["train"] | by_split["dev"]
    )


@pytest.mark.slow  # speech synthesis
def test_heldout_voices_never_appear_in_training_splits(corpora):
    heldout = json.loads((corpora[0] / "corpus.json").read_text())["heldout_voices"]
    heldout_espeak, heldout_flite = heldout["test_heldout_espeak"], heldout["test_heldout_flite"]
    utterances = _all_utterances(corpora[0])
    assert {u.voice for u in utterances["test_heldout_espeak"]} == {heldout_espeak}
    assert {u.voice for u in utterances["test_heldout_flite"]} == {heldout_flite}
    held_language, _, held_variant = heldout_espeak.removeprefix("espeak-ng:").partition("+")
    for voice in {u.voice for split in ("train", "dev", "test") for u in utterances[split]}:
        assert voice != heldout_flite
        language, _, variant = voice.removeprefix("espeak-ng:").partition("+")
        assert language != held_language and variant != held_variant, voice


@pytest.mark.slow  # speech synthesis
def test_every_wav_is_16khz_mono_int16_matching_its_manifest(corpora):
    for utterances in _all_utterances(corpora[0]).values():
        for utt in utterances:
            info = soundfile.info(utt.path)
            assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE_HZ, 1, "PCM_16")
            assert info.frames / SAMPLE_RATE_HZ == pytest.approx(utt.duration_s, abs=1e-3)
            assert 0.3 < utt.duration_s <= 12.0
            assert is_normalized(utt.text) and utt.text


@pytest.mark.slow  # speech synthesis
def test_manifest_lines_have_the_documented_fields(corpora):
    line = manifest_path(corpora[0], "train").read_text().splitlines()[0]
    record = json.loads(line)
    assert set(record) == {"id", "path", "text", "raw_text", "voice", "duration_s", "split"}
    assert record["split"] == "train"
    assert not Path(record["path"]).is_absolute()


@pytest.mark.slow  # speech synthesis
def test_building_into_a_nonempty_directory_is_refused(corpora, fortunes_dir):
    with pytest.raises(ValueError, match="not empty"):
        build_corpus(_config(corpora[0], fortunes_dir, workers=1))


def test_config_rejects_an_unknown_heldout_voice(tmp_path):
    with pytest.raises(ValueError, match="heldout_espeak_voice"):
        CorpusConfig(out_dir=tmp_path, heldout_espeak_voice="en-xx+m1")


def test_trim_silence_keeps_at_most_the_allowed_edge_silence():
    tone = torch.sin(torch.arange(SAMPLE_RATE_HZ) * 0.1)  # 1 s
    wave = torch.cat([torch.zeros(SAMPLE_RATE_HZ), tone, torch.zeros(SAMPLE_RATE_HZ)])
    trimmed = trim_silence(wave, max_edge_silence_s=0.15)
    assert trimmed.shape[-1] == pytest.approx(1.3 * SAMPLE_RATE_HZ, abs=0.01 * SAMPLE_RATE_HZ)


@pytest.mark.parametrize("factor", [0.9, 1.1, 1.25])
def test_speed_perturb_changes_length_by_the_factor(factor):
    wave = torch.randn(2, SAMPLE_RATE_HZ)
    out = speed_perturb(wave, factor)
    assert out.dtype == wave.dtype and out.shape[0] == 2
    assert out.shape[-1] == pytest.approx(SAMPLE_RATE_HZ / factor, abs=2)


def test_speed_perturb_rejects_int16_audio():
    with pytest.raises(ValueError, match="float"):
        speed_perturb(torch.zeros(100, dtype=torch.int16), 1.1)


@pytest.mark.parametrize("color", ["white", "pink"])
@pytest.mark.parametrize("snr_db", [0.0, 10.0, 25.0])
def test_add_noise_hits_the_requested_snr(color, snr_db):
    wave = 0.3 * torch.sin(torch.arange(SAMPLE_RATE_HZ) * 0.05)
    noisy = add_noise(wave, snr_db, torch.Generator().manual_seed(0), color=color)
    measured_db = 10 * math.log10(wave.pow(2).mean() / (noisy - wave).pow(2).mean())
    assert noisy.shape == wave.shape and noisy.dtype == wave.dtype
    assert measured_db == pytest.approx(snr_db, abs=0.5)


def test_augmentations_are_reproducible_from_the_generator_seed():
    wave = torch.randn(SAMPLE_RATE_HZ)
    for augment in (lambda g: add_noise(wave, 10.0, g, "pink"), lambda g: add_reverb(wave, 0.4, g)):
        assert torch.equal(
            augment(torch.Generator().manual_seed(3)), augment(torch.Generator().manual_seed(3))
        )
        assert not torch.equal(
            augment(torch.Generator().manual_seed(3)), augment(torch.Generator().manual_seed(4))
        )


def test_add_reverb_keeps_shape_dtype_and_loudness_but_smears_the_signal():
    wave = torch.zeros(1, SAMPLE_RATE_HZ)
    wave[0, 1000] = 1.0  # an impulse: the output is the room response itself
    out = add_reverb(wave, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == wave.shape and out.dtype == wave.dtype
    assert float(out.pow(2).mean()) == pytest.approx(float(wave.pow(2).mean()), rel=1e-4)
    assert (out[0, 1000:].abs() > 1e-4).sum() > 0.1 * SAMPLE_RATE_HZ  # energy spread over > 100 ms
    assert out[0, :1000].abs().max() < 1e-5  # causal: nothing before the impulse


@pytest.mark.slow  # speech synthesis
def test_a_subset_plan_keeps_the_full_corpus_sentence_separation(tmp_path):
    from voxloop.trainer.config import CorpusConfig
    from voxloop.trainer.corpus import plan_subset

    config = CorpusConfig(out_dir=tmp_path / "c", num_sentences=400, dev_fraction=0.1, test_fraction=0.05)
    subset = plan_subset(config, {"train": 30, "dev": 12})
    full_train = {job.sentence.text for job in plan_subset(config, {"train": 10**6})}
    assert [job.split for job in subset] == ["train"] * 30 + ["dev"] * 12
    assert all(job.sentence.text in full_train for job in subset if job.split == "train")
    assert not any(job.sentence.text in full_train for job in subset if job.split == "dev")
    assert all(job.wav_path.is_relative_to(tmp_path / "c") for job in subset)
