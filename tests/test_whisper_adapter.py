"""The decoder adapter that teaches Whisper the synthetic voices: it learns its corpus, and what the import merges
is exactly what was trained (a plain transformers model, encoder untouched)."""

from __future__ import annotations

import pytest
import torch
from transformers import WhisperForConditionalGeneration
from voxloop.trainer.whisper_adapter import (
    ADAPTER_DIR,
    AdapterTrainingConfig,
    mean_cross_entropy,
    merge_adapter,
    read_manifest,
    train_adapter,
)
from voxloop.trainer.whisper_update import Tokenizer
from whisper_support import tiny_whisper_policy, tokenizer_json


def test_the_adapter_learns_its_corpus_and_merges_into_the_plain_model(toy_corpus, tmp_path):
    tokenizer = Tokenizer(tokenizer_json())
    rows = read_manifest(toy_corpus / "train.jsonl")
    policy = tiny_whisper_policy()
    encoder_before = {k: v.clone() for k, v in policy.model.model.encoder.state_dict().items()}
    before = mean_cross_entropy(policy, tokenizer, rows, toy_corpus)
    config = AdapterTrainingConfig(train_utterances=len(rows), dev_utterances=0, epochs=20, batch_size=3,
                                   learning_rate=5e-2, rank=4, alpha=8, dropout=0.0, noise_fraction=0.0,
                                   max_edge_silence_s=0.1)
    peft_model, report = train_adapter(policy, tokenizer, toy_corpus, config, evaluations={})
    trained = mean_cross_entropy(policy, tokenizer, rows, toy_corpus)
    assert trained < before - 0.2, (before, trained)  # a random tiny model's floor is near 9.5 nats
    assert report["steps"] == 40 and report["trainable_parameters"] > 0

    peft_model.save_pretrained(str(tmp_path / ADAPTER_DIR))
    fresh = tiny_whisper_policy()  # the same seed: the same base weights
    assert mean_cross_entropy(fresh, tokenizer, rows, toy_corpus) == pytest.approx(before, abs=1e-5)
    fresh.model = merge_adapter(fresh.model, tmp_path / ADAPTER_DIR)
    assert type(fresh.model) is WhisperForConditionalGeneration
    assert mean_cross_entropy(fresh, tokenizer, rows, toy_corpus) == pytest.approx(trained, abs=1e-4)
    for name, value in fresh.model.model.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name


@pytest.mark.slow
def test_the_shipped_version_says_what_its_adapter_was_trained_on_and_changed(whisper_version_dir):
    import json

    card = json.loads((whisper_version_dir / "card.json").read_text())
    adapter = card["decoder_adapter"]
    assert adapter["trained_by"] == "python -m voxloop.trainer.whisper_adapter"
    assert adapter["train_utterances"] > 0 and adapter["rank"] > 0
    assert adapter["greedy_wer_after"]["test_heldout_espeak"] < adapter["greedy_wer_before"]["test_heldout_espeak"]
