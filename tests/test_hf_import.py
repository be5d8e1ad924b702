"""Starting from a local Hugging Face CTC checkpoint instead of the shipped base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
from voxloop.trainer.hf_import import WINDOWED_FORMAT, WindowedCTCWrapper, export_hf_ctc, is_hf_ctc_checkpoint

HF_VOCABULARY = ["<pad>", "<s>", "</s>", "<unk>", "|", "'", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]


def make_tiny_wav2vec2(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        vocab_size=len(HF_VOCABULARY), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )
    Wav2Vec2ForCTC(config).save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(HF_VOCABULARY)}))
    return path


@pytest.fixture(scope="module")
def tiny_hf_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_wav2vec2(tmp_path_factory.mktemp("wav2vec2"))


def test_a_wav2vec2_directory_is_recognized_as_an_hf_ctc_checkpoint(tiny_hf_checkpoint, tmp_path):
    assert is_hf_ctc_checkpoint(tiny_hf_checkpoint)
    assert not is_hf_ctc_checkpoint(tmp_path)


def test_hf_checkpoint_exports_with_the_voxloop_contract(tiny_hf_checkpoint, tmp_path):
    path = export_hf_ctc(tiny_hf_checkpoint, tmp_path / "model.onnx", "hf-0001")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["voxloop.format"] == WINDOWED_FORMAT
    vocabulary = json.loads(meta["voxloop.vocabulary"])
    assert vocabulary[0] == "<blank>" and vocabulary[4] == " " and vocabulary[6] == "a"
    history = int(meta["voxloop.history_samples"])
    rng = np.random.default_rng(0)
    for samples in (int(meta["voxloop.chunk_samples"]), 1000):  # two lengths: nothing baked in
        audio = (0.1 * rng.standard_normal((2, samples))).astype(np.float32)
        log_probs, next_history = session.run(
            None, {"audio": audio, "audio_history": np.zeros((2, history), np.float32)}
        )
        assert log_probs.shape == (2, samples // int(meta["voxloop.hop_samples"]), len(vocabulary))
        np.testing.assert_array_equal(next_history[:, -samples:], audio)


def test_hf_export_matches_torch(tiny_hf_checkpoint, tmp_path):
    path = export_hf_ctc(tiny_hf_checkpoint, tmp_path / "model.onnx", "hf-0001")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = WindowedCTCWrapper(Wav2Vec2ForCTC.from_pretrained(tiny_hf_checkpoint).eval(), 320)
    audio, history = 0.1 * torch.randn(1, 4800), 0.1 * torch.randn(1, 32000)
    with torch.no_grad():
        expected, _ = wrapper(audio, history)
    actual, _ = session.run(None, {"audio": audio.numpy(), "audio_history": history.numpy()})
    np.testing.assert_allclose(actual, expected.numpy(), atol=1e-4)
