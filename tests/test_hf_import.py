"""Starting from a local Hugging Face CTC checkpoint instead of the shipped base model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
from voxloop.core.model import WINDOWED_CTC_FORMAT
from voxloop.trainer.hf_import import WindowedCTCWrapper, export_hf_ctc, is_hf_ctc_checkpoint

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
    assert meta["voxloop.format"] == WINDOWED_CTC_FORMAT
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


# --- the same train path: publish the checkpoint as a version, then fine-tune it online ---------------


@pytest.fixture(scope="module")
def hf_version_dir(tiny_hf_checkpoint, tmp_path_factory) -> Path:
    from voxloop.clients.cli import main

    out = tmp_path_factory.mktemp("hf-version") / "hf-0001"
    assert main(["export", "--checkpoint", str(tiny_hf_checkpoint), "--out", str(out), "--version", "hf-0001"]) == 0
    return out


def test_voxloop_export_publishes_an_hf_checkpoint_as_a_complete_version(hf_version_dir, tmp_path):
    from voxloop.core.registry import Registry

    registry = Registry(tmp_path / "registry")
    registry.seed_from(hf_version_dir)
    card = registry.verify("hf-0001")  # every file's sha256 matches the card
    assert card["format"] == WINDOWED_CTC_FORMAT and card["model"]["architecture"] == "Wav2Vec2ForCTC"
    assert card["parity"]["max_abs_logprob_diff"] <= 1e-4 and card["parity"]["greedy_transcripts_equal"]
    assert len(card["parity"]["lengths_s"]) == 2
    assert is_hf_ctc_checkpoint(hf_version_dir / "policy")  # what the trainer starts from
    assert "policy/vocab.json" in card["files"]


@pytest.mark.slow  # a training cycle
def test_the_online_trainer_fine_tunes_an_hf_checkpoint_and_publishes_a_windowed_version(hf_version_dir, tmp_path):
    from trainer_support import add_feedback, tone, write_corpus
    from voxloop.core.model import OnnxModel
    from voxloop.core.registry import Registry
    from voxloop.core.store import FeedbackStore
    from voxloop.trainer.config import PPOConfig, TrainerConfig
    from voxloop.trainer.cycle import run_cycle
    from voxloop.trainer.hf_import import HfCtcPolicy
    from voxloop.trainer.state import TrainerState

    torch.set_num_threads(1)
    registry = Registry(tmp_path / "registry")
    registry.seed_from(hf_version_dir)
    rows = [(w, tone(w, seconds=1.5, seed=i)) for i, w in enumerate("abcabc")]
    corpus = write_corpus(tmp_path / "corpus", {"train": rows, "dev": rows[:3]})
    ppo = PPOConfig(epochs=8, minibatch_size=8, learning_rate=3e-3, replay_per_minibatch=2, samples_per_utterance=4)
    config = TrainerConfig(data_dir=tmp_path / "data", corpus_dir=corpus, heldout_share=0.0,
                           min_heldout_utterances=0, anchor_size=3,
                           replay_pool_size=6, max_anchor_regression=1.0, max_total_anchor_regression=1.0, ppo=ppo)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        ids = [add_feedback(store, tone(w, seconds=1.5, seed=10 + i), text=w) for i, w in enumerate("abcabcab")]
        report = run_cycle(store, registry, config)
        assert report.outcome == "published", report.gate
        assert sorted(store.get_cycle(report.cycle_id).feedback_ids) == sorted(ids)
    assert report.reward_after["sampled"] > report.reward_before["sampled"]
    child = report.version_out
    assert registry.current_version() == child == "hf-0001-c0001"
    card = registry.verify(child)
    assert card["format"] == WINDOWED_CTC_FORMAT and card["parent_version"] == "hf-0001"
    assert card["parity"]["max_abs_logprob_diff"] <= 1e-4
    before = Wav2Vec2ForCTC.from_pretrained(hf_version_dir / "policy").state_dict()
    after = Wav2Vec2ForCTC.from_pretrained(registry.version_dir(child) / "policy").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    resumed = TrainerState.load(config.trainer_dir, registry, config.ppo)  # the trainer's checkpoint
    assert isinstance(resumed.policy, HfCtcPolicy) and resumed.version == child
    assert all(torch.equal(after[k], v) for k, v in resumed.policy.model.state_dict().items())
    served = OnnxModel(registry.version_dir(child) / "model.onnx")  # what the server's watcher loads
    assert served.version == child and served.spec.vocabulary[6] == "a"
