"""Helpers of the Whisper tests: a tiny random-weight Whisper policy (real transformers modules, the
project's export), and the real shipped version built once per test session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data" / "whisper"
TINY_WHISPER_VERSION = "tiny-whisper-0001"


def tiny_whisper_policy(seed: int = 0):
    """A 2+2-layer, d_model 64 Whisper with the real vocabulary size and generation settings, random weights,
    and a fresh CTC head (streaming windows of 0.4 s history + 0.4 s chunks)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    from voxloop.trainer.whisper_ct2 import END_OF_TEXT, START_OF_TRANSCRIPT, generation_config
    from voxloop.trainer.whisper_model import WhisperPolicy, WhisperPolicyConfig

    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
                           bos_token_id=END_OF_TEXT, eos_token_id=END_OF_TEXT, pad_token_id=END_OF_TEXT,
                           decoder_start_token_id=START_OF_TRANSCRIPT, suppress_tokens=[], begin_suppress_tokens=[220],
                           tie_word_embeddings=True)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = generation_config(config, {"suppress_ids": [], "suppress_ids_begin": [220, END_OF_TEXT],
                                                         "alignment_heads": [[1, 0], [1, 1]]})
    # fp32 graphs: a random tiny model's flat distributions say nothing about int8 (the real import checks that).
    # Every padding position attended (silence_pool 1): a random model's padding states differ from position to
    # position, so its graphs decode exactly as transformers does; pooling has tests of its own.
    settings = WhisperPolicyConfig(history_s=0.4, chunk_s=0.4, pad_s=0.4, ctc_hidden=32, int8=False, silence_pool=1)
    return WhisperPolicy.with_new_head(model, settings, seed=seed).eval()


def tokenizer_json() -> Path:
    """Whisper's tokenizer.json from the pinned package (a dev dependency)."""
    from voxloop.trainer.whisper_import import pinned_ct2_files

    return pinned_ct2_files().tokenizer_json


def publish_whisper_version(policy, registry_root: Path, version: str, parent: str | None = None) -> dict:
    """Export `policy` as a complete whisper-two-pass/1 version and publish it (not activated); returns its card."""
    from voxloop.core.registry import Registry
    from voxloop.trainer.whisper_import import write_whisper_version

    build = registry_root.parent / f".build-{version}"
    card = write_whisper_version(policy, build, version, tokenizer_json=tokenizer_json(),
                                 probe_wav=DATA_DIR / "one.wav", card={"parent_version": parent})
    registry = Registry(registry_root)
    registry.publish(version, {name: build / name for name in card["files"]},
                     {k: v for k, v in card.items() if k != "files"}, activate=False)
    shutil.rmtree(build)
    return json.loads((registry.version_dir(version) / "card.json").read_text())
