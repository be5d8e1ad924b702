"""Start from a local Hugging Face CTC checkpoint (e.g. `Wav2Vec2ForCTC`) instead of the shipped base.

Such models attend over the whole utterance, so they cannot stream exactly. They are exported behind
the same graph contract (docs/model-format.md, format `windowed-ctc/1`): the streaming state is the
last `history_samples` of audio, each call re-encodes history + new chunk and returns the frames of
the new chunk only. The server treats every non-`audio` input as opaque state, so it serves these
graphs unchanged; the cost per chunk grows with the history window.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCTC

log = logging.getLogger(__name__)

WINDOWED_FORMAT = "windowed-ctc/1"
DEFAULT_HISTORY_SECONDS = 2.0
CHUNK_FRAMES = 10  # frames of new audio per streaming call


def is_hf_ctc_checkpoint(path: Path) -> bool:
    """A directory with a transformers config whose architecture ends in ForCTC (and is not ours)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    return config.get("model_type") != "voxloop-ctc" and any(a.endswith("ForCTC") for a in architectures)


def hf_vocabulary(checkpoint_dir: Path, vocab_size: int) -> list[str]:
    """Serving vocabulary from the checkpoint's vocab.json: lower-case, word delimiter as a space.

    The CTC blank must be index 0 (the pad token of Wav2Vec2CTCTokenizer checkpoints)."""
    vocab_file = Path(checkpoint_dir) / "vocab.json"
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no vocab.json; save the tokenizer with the model")
    token_to_id = json.loads(vocab_file.read_text())
    tokens = [""] * vocab_size
    for token, index in token_to_id.items():
        if index < vocab_size:
            tokens[index] = token
    if tokens[0] not in ("<pad>", "<blank>", "[PAD]"):
        raise ValueError(f"{vocab_file}: index 0 is {tokens[0]!r}; voxloop needs the CTC blank (pad) at index 0")
    special = {"<pad>", "<blank>", "[PAD]", "<s>", "</s>", "<unk>", "[UNK]"}
    vocabulary = ["<blank>"]
    for token in tokens[1:]:
        vocabulary.append(" " if token == "|" else "" if token in special else token.lower())
    return vocabulary


class WindowedCTCWrapper(nn.Module):
    """(audio (B, S), audio_history (B, H)) -> (log_probs (B, S / hop, V), next_audio_history (B, H))."""

    def __init__(self, model: nn.Module, hop_samples: int):
        super().__init__()
        self.model = model
        self.hop_samples = hop_samples

    def forward(self, audio: torch.Tensor, audio_history: torch.Tensor):
        window = torch.cat([audio_history, audio], dim=1)
        # Wav2Vec2's feature extractor normalizes each input to zero mean and unit variance.
        window = (window - window.mean(dim=1, keepdim=True)) / torch.sqrt(window.var(dim=1, keepdim=True) + 1e-7)
        log_probs = torch.log_softmax(self.model(window).logits, dim=-1)
        new_frames = torch.div(audio.shape[1], self.hop_samples, rounding_mode="floor")
        next_history = torch.cat([audio_history, audio], dim=1)[:, audio.shape[1] :]
        return log_probs[:, log_probs.shape[1] - new_frames :], next_history


def export_hf_ctc(
    checkpoint_dir: Path, path: Path, version: str, history_seconds: float = DEFAULT_HISTORY_SECONDS
) -> Path:
    """Export a local HF CTC checkpoint as a `windowed-ctc/1` graph with voxloop metadata."""
    config = AutoConfig.from_pretrained(checkpoint_dir)
    model = AutoModelForCTC.from_pretrained(checkpoint_dir).eval()
    sample_rate = 16000
    hop = int(getattr(config, "inputs_to_logits_ratio", 320))
    history = int(history_seconds * sample_rate) // hop * hop
    chunk = CHUNK_FRAMES * hop
    vocabulary = hf_vocabulary(checkpoint_dir, config.vocab_size)
    wrapper = WindowedCTCWrapper(model, hop).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (torch.zeros(1, chunk), torch.zeros(1, history)),
            str(path),
            input_names=["audio", "audio_history"],
            output_names=["log_probs", "next_audio_history"],
            dynamic_axes={"audio": {0: "batch", 1: "samples"}, "audio_history": {0: "batch"},
                          "log_probs": {0: "batch", 1: "frames"}, "next_audio_history": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    metadata = {
        "voxloop.format": WINDOWED_FORMAT,
        "voxloop.version": version,
        "voxloop.vocabulary": json.dumps(vocabulary),
        "voxloop.sample_rate_hz": str(sample_rate),
        "voxloop.hop_samples": str(hop),
        "voxloop.subsampling": "1",
        "voxloop.chunk_frames": str(CHUNK_FRAMES),
        "voxloop.chunk_samples": str(chunk),
        "voxloop.lookback_samples": "0",
        "voxloop.history_samples": str(history),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    log.info("exported HF checkpoint %s as %s (%s)", checkpoint_dir, path, WINDOWED_FORMAT)
    return path
