"""Start from a local Hugging Face CTC checkpoint (e.g. `Wav2Vec2ForCTC`) instead of the shipped base.

Such models attend over the whole utterance, so they cannot stream exactly. They are exported behind
the same graph contract (docs/model-format.md, format `windowed-ctc/1`, core/model.py): the streaming state is the
last `history_samples` of audio, each call re-encodes history + new chunk and returns the frames of
the new chunk only. The server treats every non-`audio` input as opaque state, so it serves these
graphs unchanged; the cost per chunk grows with the history window.

The online trainer fine-tunes such a checkpoint too (HfCtcPolicy below): `voxloop export
--checkpoint HF_DIR` publishes it as a version whose policy/ is the checkpoint itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCTC
from transformers.modeling_outputs import CausalLMOutput

from ..core.decoder import BLANK_TOKEN, UNK_TOKEN, greedy_ctc_text, serving_vocabulary
from ..core.model import WINDOWED_CTC_FORMAT, OnnxModel, metadata_props
from .export import ParityConfig, ParityError, ParityReport, write_onnx_metadata

log = logging.getLogger(__name__)

DEFAULT_HISTORY_SECONDS = 2.0
CHUNK_FRAMES = 10  # frames of new audio per streaming call
SAMPLE_RATE_HZ = 16000
VOCAB_FILE = "vocab.json"
WINDOWED_SETTINGS_FILE = "voxloop_windowed.json"


def is_hf_ctc_checkpoint(path: Path) -> bool:
    """A directory with a transformers config whose architecture ends in ForCTC (and is not ours)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    return config.get("model_type") != "voxloop-ctc" and any(a.endswith("ForCTC") for a in architectures)


HF_BLANK_TOKENS = ("<pad>", "<blank>", "[PAD]")
HF_UNK_TOKENS = ("<unk>", "[UNK]")
HF_SPECIAL_TOKENS = frozenset({*HF_BLANK_TOKENS, *HF_UNK_TOKENS, "<s>", "</s>"})


def hf_tokens(checkpoint_dir: Path, vocab_size: int) -> list[str]:
    """The checkpoint's tokens by output index, from its vocab.json (the CTC blank must be index 0)."""
    vocab_file = Path(checkpoint_dir) / VOCAB_FILE
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no vocab.json; save the tokenizer with the model")
    token_to_id = json.loads(vocab_file.read_text())
    tokens = [""] * vocab_size
    for token, index in token_to_id.items():
        if index < vocab_size:
            tokens[index] = token
    if tokens[0] not in HF_BLANK_TOKENS:
        raise ValueError(f"{vocab_file}: index 0 is {tokens[0]!r}; voxloop needs the CTC blank (pad) at index 0")
    return tokens


def policy_vocabulary_of(tokens: list[str]) -> list[str]:
    """The vocabulary the trainer tokenizes targets with (trainer/tokenizer.py's conventions): blank first,
    "|" between words, lower-case characters, unknown as <unk>, other specials under their own names."""
    vocabulary = [BLANK_TOKEN] + [UNK_TOKEN if t in HF_UNK_TOKENS else t if t in HF_SPECIAL_TOKENS else t.lower()
                                  for t in tokens[1:]]
    if len(set(vocabulary)) != len(vocabulary):
        raise ValueError("the checkpoint's vocabulary has tokens that differ only in case; voxloop's text is "
                         "lower-case, so it cannot tell them apart")
    return vocabulary


def serving_vocabulary_of(tokens: list[str]) -> list[str]:
    """What the server prints per output index: lower-case, the word delimiter as a space, specials as nothing."""
    return serving_vocabulary(policy_vocabulary_of(tokens))


def hf_vocabulary(checkpoint_dir: Path, vocab_size: int) -> list[str]:
    """Serving vocabulary of a checkpoint directory (see serving_vocabulary_of)."""
    return serving_vocabulary_of(hf_tokens(checkpoint_dir, vocab_size))


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


def export_windowed(model: nn.Module, vocabulary: list[str], path: Path, version: str,
                    history_samples: int) -> Path:
    """Export a transformers CTC model (eval mode) as a `windowed-ctc/1` graph with voxloop metadata.

    `vocabulary` is what the server prints per output index (serving_vocabulary_of)."""
    hop = hop_samples_of(model.config)
    chunk = CHUNK_FRAMES * hop
    wrapper = WindowedCTCWrapper(model, hop).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (torch.zeros(1, chunk), torch.zeros(1, history_samples)),
            str(path),
            input_names=["audio", "audio_history"],
            output_names=["log_probs", "next_audio_history"],
            dynamic_axes={"audio": {0: "batch", 1: "samples"}, "audio_history": {0: "batch"},
                          "log_probs": {0: "batch", 1: "frames"}, "next_audio_history": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    write_onnx_metadata(path, metadata_props({
        "format": WINDOWED_CTC_FORMAT, "version": version, "vocabulary": vocabulary, "sample_rate_hz": SAMPLE_RATE_HZ,
        "hop_samples": hop, "subsampling": 1, "chunk_frames": CHUNK_FRAMES, "chunk_samples": chunk,
        "lookback_samples": 0, "history_samples": history_samples,
    }))
    return path


def export_hf_ctc(
    checkpoint_dir: Path, path: Path, version: str, history_seconds: float = DEFAULT_HISTORY_SECONDS
) -> Path:
    """Export a local HF CTC checkpoint as a `windowed-ctc/1` graph with voxloop metadata."""
    policy = HfCtcPolicy.from_pretrained(checkpoint_dir, history_seconds=history_seconds)
    policy.export_onnx(path, version)
    log.info("exported HF checkpoint %s as %s (%s)", checkpoint_dir, path, WINDOWED_CTC_FORMAT)
    return path


def hop_samples_of(config) -> int:
    """Audio samples per output frame of a transformers CTC config (320 for wav2vec2-style encoders)."""
    return int(getattr(config, "inputs_to_logits_ratio", 320))


@dataclass(frozen=True)
class HfPolicyConfig:
    """What the trainer reads of a policy's config (VoxloopCTCConfig has the same fields)."""

    vocabulary: list[str]
    """The trainer's vocabulary (policy_vocabulary_of): what targets are tokenized with."""
    serving_vocabulary: list[str]
    """What the server prints per output index (the exported graph's voxloop.vocabulary)."""
    hop_samples: int
    """Audio samples per output frame (320 for wav2vec2-style encoders)."""
    history_samples: int
    """Audio history the exported graph re-encodes with each chunk (its streaming state)."""
    sample_rate_hz: int = SAMPLE_RATE_HZ
    """The rate of the audio it takes (the only one voxloop serves)."""


class HfCtcPolicy(nn.Module):
    """A local HF CTC checkpoint as the online trainer's policy, with the interface of VoxloopForCTC
    that the trainer uses: forward(input_values, input_lengths) -> .logits, frames_for,
    save_pretrained / from_pretrained, and its own export and parity check (windowed-ctc/1).

    Training sees whole utterances, each normalized to zero mean and unit variance as Wav2Vec2's
    feature extractor does; the served graph normalizes each window it encodes, so training and
    serving agree only approximately, like the windowed streaming itself."""

    def __init__(self, model: nn.Module, tokens: list[str], history_samples: int):
        super().__init__()
        self.model = model
        self.tokens = tokens
        hop = hop_samples_of(model.config)
        self.config = HfPolicyConfig(policy_vocabulary_of(tokens), serving_vocabulary_of(tokens), hop,
                                     history_samples // hop * hop)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: Path, history_seconds: float | None = None) -> HfCtcPolicy:
        checkpoint_dir = Path(checkpoint_dir)
        model = AutoModelForCTC.from_pretrained(checkpoint_dir).eval()
        tokens = hf_tokens(checkpoint_dir, model.config.vocab_size)
        saved = checkpoint_dir / WINDOWED_SETTINGS_FILE
        if history_seconds is not None:
            history = int(history_seconds * SAMPLE_RATE_HZ)
        elif saved.is_file():
            history = int(json.loads(saved.read_text())["history_samples"])
        else:
            history = int(DEFAULT_HISTORY_SECONDS * SAMPLE_RATE_HZ)
        return cls(model, tokens, history)

    def save_pretrained(self, out_dir: Path) -> None:
        """The checkpoint as transformers saves it, its vocab.json and the graph's history length."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir)
        (out_dir / VOCAB_FILE).write_text(json.dumps({t: i for i, t in enumerate(self.tokens) if t}))
        (out_dir / WINDOWED_SETTINGS_FILE).write_text(json.dumps({"history_samples": self.config.history_samples}))

    def frames_for(self, num_samples: torch.Tensor | int) -> torch.Tensor | int:
        """Output frames of `num_samples` samples of audio (the encoder's conv stack)."""
        frames = self.model._get_feat_extract_output_lengths(num_samples)
        return int(frames) if isinstance(num_samples, int) else frames.long()

    def forward(self, input_values: torch.Tensor, input_lengths: torch.Tensor | None = None) -> CausalLMOutput:
        """input_values (B, S) zero-padded, input_lengths (B,) in samples -> logits (B, T, V)."""
        batch, samples = input_values.shape
        if input_lengths is None:
            input_lengths = torch.full((batch,), samples)
        valid = torch.arange(samples)[None, :] < input_lengths[:, None]  # (B, S)
        n = input_lengths[:, None].clamp(min=2).to(input_values.dtype)
        mean = (input_values * valid).sum(1, keepdim=True) / n
        var = (((input_values - mean) * valid) ** 2).sum(1, keepdim=True) / (n - 1)  # unbiased, as the graph
        normalized = (input_values - mean) / torch.sqrt(var + 1e-7) * valid
        # wav2vec2 "group"-norm encoders are trained without an attention mask (zero padding instead).
        mask = valid.long() if getattr(self.model.config, "feat_extract_norm", "group") == "layer" else None
        return CausalLMOutput(logits=self.model(normalized, attention_mask=mask).logits)

    def export_onnx(self, path: Path, version: str) -> Path:
        return export_windowed(self.model.eval(), self.config.serving_vocabulary, path, version,
                               self.config.history_samples)

    def check_parity(self, onnx_path: Path, config: ParityConfig | None = None) -> ParityReport:
        """torch vs onnxruntime on random audio and history, at two chunk lengths; raises ParityError."""
        config = config or ParityConfig()
        graph = OnnxModel(onnx_path, intra_op_threads=0)  # as the server runs it; 0: onnxruntime's default threads
        wrapper = WindowedCTCWrapper(self.model.eval(), self.config.hop_samples).eval()
        generator = torch.Generator().manual_seed(config.seed)
        worst, equal, lengths = 0.0, True, []
        for chunks in (1, 3):  # two lengths, so a traced length baked into the graph is caught
            audio = 0.1 * torch.randn(2, chunks * CHUNK_FRAMES * self.config.hop_samples, generator=generator)
            history = 0.1 * torch.randn(2, self.config.history_samples, generator=generator)
            with torch.no_grad():
                expected, _ = wrapper(audio, history)
            actual, _ = graph.run(audio.numpy(), {"audio_history": history.numpy()})
            if expected.shape != actual.shape:
                raise ParityError(f"{chunks} chunk(s): torch gives {tuple(expected.shape)}, ONNX {actual.shape}")
            worst = max(worst, float(np.abs(expected.numpy() - actual).max()))
            equal &= all(greedy_ctc_text(t, self.config.vocabulary) == greedy_ctc_text(o, self.config.vocabulary)
                         for t, o in zip(expected.numpy(), actual, strict=True))
            lengths.append(audio.shape[1] / SAMPLE_RATE_HZ)
        if worst > config.max_abs_logprob_diff or not equal:
            raise ParityError(f"windowed export differs from torch: max |dlogp| {worst:.2e} "
                              f"(limit {config.max_abs_logprob_diff:g}), greedy transcripts equal: {equal}")
        return ParityReport(worst, equal, tuple(lengths))
