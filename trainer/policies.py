"""The two kinds of policy the trainer fine-tunes, and what it does with either.

- `VoxloopForCTC` (trainer/model.py): voxloop's own chunked streaming Conformer, exported as
  `streaming-ctc/1` (exact streaming);
- `HfCtcPolicy` (trainer/hf_import.py): a local Hugging Face CTC checkpoint (e.g. Wav2Vec2ForCTC),
  exported as `windowed-ctc/1` (approximate streaming over an audio history);
- `WhisperPolicy` (trainer/whisper_model.py): Whisper + a CTC head, exported as `whisper-two-pass/1`;
  its cycle goes through trainer/kinds.py's WhisperKind (token-level PPO, three graphs), which loads here.

Both give per-frame logits from `policy(audio, input_lengths=...)`, count frames with
`policy.frames_for`, and save with `save_pretrained`; exporting, checking parity, saving a version's
policy/ and describing it in a card differ, and are chosen here by kind.
"""

from __future__ import annotations

from pathlib import Path

from ..core.model import STREAMING_CTC_FORMAT, WINDOWED_CTC_FORMAT
from .export import ParityReport, check_parity, export_onnx
from .hf_import import HfCtcPolicy, is_hf_ctc_checkpoint
from .model import VoxloopForCTC
from .tokenizer import make_tokenizer
from .whisper_model import WhisperPolicy, is_whisper_checkpoint

Policy = VoxloopForCTC | HfCtcPolicy | WhisperPolicy


def load_policy_dir(path: Path) -> Policy:
    """The policy saved in `path` (a version's policy/, a trainer checkpoint or an HF checkpoint)."""
    if is_whisper_checkpoint(path):
        return WhisperPolicy.from_pretrained(path)
    if is_hf_ctc_checkpoint(path):
        return HfCtcPolicy.from_pretrained(path)
    return VoxloopForCTC.from_pretrained(path)


def ctc_vocabulary(policy: Policy) -> list[str]:
    """The trainer's CTC vocabulary of a policy (of its first-pass head, for a Whisper policy)."""
    if isinstance(policy, WhisperPolicy):
        return list(policy.settings.ctc_vocabulary)
    return list(policy.config.vocabulary)


def save_policy(policy: Policy, out_dir: Path) -> None:
    """A version's policy/: the weights, and the tokenizer the trainer reads targets with."""
    policy.save_pretrained(out_dir)
    if isinstance(policy, VoxloopForCTC):
        make_tokenizer(policy.config.vocabulary).save_pretrained(out_dir)


def export_policy(policy: Policy, path: Path, version: str) -> Path:
    """Write the policy's serving graph (a single self-contained ONNX file) to `path`."""
    if isinstance(policy, HfCtcPolicy):
        return policy.export_onnx(path, version)
    return export_onnx(policy, path, version)


def check_policy_parity(policy: Policy, onnx_path: Path) -> ParityReport:
    """torch vs the exported graph; raises export.ParityError when they differ."""
    if isinstance(policy, HfCtcPolicy):
        return policy.check_parity(onnx_path)
    return check_parity(policy, onnx_path)


def policy_format(policy: Policy) -> str:
    """The graph contract the export follows (docs/model-format.md)."""
    return WINDOWED_CTC_FORMAT if isinstance(policy, HfCtcPolicy) else STREAMING_CTC_FORMAT


def policy_card(policy: Policy) -> dict:
    """The model card's "model" section."""
    parameters = sum(p.numel() for p in policy.parameters())
    if isinstance(policy, HfCtcPolicy):
        return {"architecture": ", ".join(policy.model.config.architectures or [type(policy.model).__name__]),
                "parameters": parameters, "history_samples": policy.config.history_samples}
    c = policy.config
    return {"architecture": "log-mel (in graph) + 4x frame stacking + chunked causal Conformer + CTC",
            "parameters": parameters, "config": c.to_diff_dict(),
            "streaming_chunk_ms": c.chunk_frames * c.frame_shift_s * 1000}


__all__ = ["Policy", "check_policy_parity", "ctc_vocabulary", "export_policy", "load_policy_dir", "policy_card",
           "policy_format", "save_policy"]
