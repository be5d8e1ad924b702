"""The CTC character tokenizer: transformers' Wav2Vec2CTCTokenizer over the policy's vocabulary."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import Wav2Vec2CTCTokenizer

from ..core.decoder import BLANK_TOKEN, UNK_TOKEN, WORD_DELIMITER_TOKEN


def make_tokenizer(vocabulary: list[str] | tuple[str, ...]) -> Wav2Vec2CTCTokenizer:
    """A tokenizer whose ids are the policy's output indices (blank = pad = 0, "|" between words)."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocabulary)}))
        return Wav2Vec2CTCTokenizer(
            str(vocab_file),
            pad_token=BLANK_TOKEN,
            unk_token=UNK_TOKEN,
            word_delimiter_token=WORD_DELIMITER_TOKEN,
            bos_token=None,
            eos_token=None,
        )


def encode_targets(tokenizer: Wav2Vec2CTCTokenizer, text: str) -> list[int]:
    """Normalized text -> target ids. Raises ValueError on characters outside the vocabulary."""
    ids = tokenizer(text).input_ids
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"text has characters outside the vocabulary: {text!r}; normalize it first")
    return ids
