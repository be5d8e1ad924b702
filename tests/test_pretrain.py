"""Pretraining: checkpoints, resume, and the release (ONNX + card) built from the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from voxloop.core.pcm import float_to_int16
from voxloop.core.registry import Registry
from voxloop.trainer.config import PretrainConfig
from voxloop.trainer.evaluate import error_rates
from voxloop.trainer.pretrain import BEST_DIR, CHECKPOINT_DIR, HISTORY_FILE, TRAINER_STATE, pretrain
from voxloop.trainer.release import POLICY_DIR, build_release

TEXTS = ["a bee", "see a dee", "bee see", "a dee a"]


def write_toy_corpus(root: Path) -> Path:
    """Tones standing in for speech: enough for the loop's mechanics, not for accuracy."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("dev", 2), ("test", 2)):
        (root / split).mkdir(parents=True)
        with (root / f"{split}.jsonl").open("w") as manifest:
            for i in range(count):
                samples = (0.3 * np.sin(np.arange(16000 + 800 * i) * 0.05 * (i + 1))
                           + 0.01 * rng.standard_normal(16000 + 800 * i))
                path = root / split / f"{split}-{i}.wav"
                sf.write(path, float_to_int16(samples), 16000, subtype="PCM_16")
                manifest.write(json.dumps({"id": f"{split}-{i}", "path": f"{split}/{path.name}",
                                           "text": TEXTS[i % len(TEXTS)], "voice": "tone", "split": split}) + "\n")
    return root


def toy_config(corpus: Path, out: Path, epochs: int) -> PretrainConfig:
    return PretrainConfig(corpus_dir=corpus, out_dir=out, epochs=epochs, max_batch_seconds=4.0, warmup_steps=2,
                          dev_utterances=2, d_model=32, num_layers=1, num_heads=2, num_threads=1)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pretrain")
    corpus = write_toy_corpus(root / "corpus")
    pretrain(toy_config(corpus, root / "run", epochs=1))
    return corpus, root / "run"


@pytest.mark.slow
def test_pretraining_writes_a_checkpoint_best_weights_and_history(trained_run):
    _, run = trained_run
    state = torch.load(run / CHECKPOINT_DIR / TRAINER_STATE, weights_only=False)
    assert state["epoch"] == 1 and state["step"] > 0
    assert (run / BEST_DIR / "config.json").exists() and (run / BEST_DIR / "vocab.json").exists()
    epochs = [json.loads(line) for line in (run / HISTORY_FILE).read_text().splitlines() if '"epoch"' in line]
    assert epochs[-1]["epoch"] == 1 and epochs[-1]["dev_cer"] >= 0


@pytest.mark.slow
def test_pretraining_resumes_from_its_checkpoint(trained_run, tmp_path):
    corpus, run = trained_run
    first = torch.load(run / CHECKPOINT_DIR / TRAINER_STATE, weights_only=False)
    pretrain(toy_config(corpus, run, epochs=2))
    second = torch.load(run / CHECKPOINT_DIR / TRAINER_STATE, weights_only=False)
    assert second["epoch"] == 2 and second["step"] > first["step"]
    history = [json.loads(line) for line in (run / HISTORY_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in history if "epoch" in r] == [1, 2]  # the first epoch was not run again


@pytest.mark.slow
def test_release_has_a_complete_model_card_and_publishes(trained_run, tmp_path):
    corpus, run = trained_run
    out = tmp_path / "registry" / "versions" / "toy-0001"
    card = build_release(run / BEST_DIR, out, "toy-0001", corpus_dir=corpus)
    for key in ("version", "parent_version", "model", "parity", "evaluation", "files", "rebuild", "training"):
        assert key in card, key
    assert card["parity"]["max_abs_logprob_diff"] <= 1e-4 and card["parity"]["greedy_transcripts_equal"]
    assert set(card["evaluation"]["test"]) >= {"wer", "cer", "utterances", "per_voice"}
    assert card["training"]["dev_curve"][0]["epoch"] == 1
    assert {"model.onnx", f"{POLICY_DIR}/config.json", f"{POLICY_DIR}/model.safetensors"} <= set(card["files"])
    registry = Registry(tmp_path / "registry")
    registry.activate("toy-0001")  # verifies every sha256 in the card
    assert registry.current_version() == "toy-0001"


def test_error_rates_match_a_hand_computed_wer_and_cer():
    # "the cat sat" vs "the bat sat down": 1 substitution + 1 insertion over 3 words -> WER 2/3.
    # Characters: "the cat sat" (11) -> "the bat sat down": 1 substitution + 5 insertions -> CER 6/11.
    summary = error_rates(["the cat sat", "hello world"], ["the bat sat down", "hello world"])
    assert summary.wer == pytest.approx(2 / 5)
    assert summary.cer == pytest.approx(6 / 22)


@pytest.mark.slow
def test_eval_cli_gives_the_same_figures_on_the_onnx_model_and_the_torch_checkpoint(trained_run, tmp_path, capsys):
    from voxloop.clients.cli import main

    corpus, run = trained_run
    out = tmp_path / "toy-0002"
    build_release(run / BEST_DIR, out, "toy-0002")
    manifest = corpus / "test.jsonl"
    assert main(["eval", "--manifest", str(manifest), "--model", str(out), "--json",
                 "--out", str(tmp_path / "results.jsonl")]) == 0
    onnx_figures = json.loads(capsys.readouterr().out)
    assert main(["eval", "--manifest", str(manifest), "--checkpoint", str(run / BEST_DIR), "--json"]) == 0
    torch_figures = json.loads(capsys.readouterr().out)
    assert onnx_figures["overall"]["utterances"] == 2
    assert onnx_figures["overall"]["cer"] == pytest.approx(torch_figures["overall"]["cer"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == {"test-0", "test-1"} and all("hypothesis" in r for r in rows)
