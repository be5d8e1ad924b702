"""The safety gate: publish a candidate only if it is no worse where it matters (design.md, "The gate").

Both models are scored with onnxruntime on their exported graphs (what the server would run),
decoded as the server decodes their finals (`evaluate.version_transcriber`): a Whisper version's
second pass, a CTC version's lexicon + LM beam search when its card has a "decoder" section (the
candidate with its own, possibly adapted, decoder files or context words), greedily otherwise:

- held-out feedback: items of this cycle's batch and up to `heldout_pool` earlier ones that were never
  trained on (cycle.py picks them by a hash of the feedback id); the candidate's WER must not be higher
  than the serving model's, and at least `min_heldout_utterances` of them must have scored it
  (rejections have no reference text, so a batch of rejections alone is gated by default);
- anchor: a fixed slice of the base corpus (base_data.py); the candidate's WER may rise by at most
  `max_anchor_regression` (absolute, 0.01 = 1 point) over the serving model's, and by at most
  `max_total_anchor_regression` over the lineage's base version (the last one the online trainer did
  not make), so that per-cycle margins cannot add up to unbounded forgetting;
- parity: the candidate's ONNX export matched its torch weights (export.check_parity raised nothing).

`decide` is pure: figures in, decision with its reasons out; `evaluate_candidate` scores, then decides.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.whisper_decoder import SECOND_PASS_KEY
from .evaluate import EvalSummary, error_rates, lm_transcriber, onnx_transcriber, version_transcriber

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    """The gate's rules (TrainerConfig holds their documented knobs: `GateConfig.of(config)`)."""

    max_anchor_regression: float = 0.01
    """Largest anchor WER rise over the serving version (absolute; 0.01 = 1 point)."""
    max_total_anchor_regression: float = float("inf")
    """Largest anchor WER rise over the lineage's base version."""
    min_heldout_utterances: int = 0
    """Fewest held-out items with a reference that must score the candidate."""

    @classmethod
    def of(cls, config) -> GateConfig:
        return cls(config.max_anchor_regression, config.max_total_anchor_regression, config.min_heldout_utterances)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]
    """Why it failed (empty when it passed)."""
    heldout_utterances: int
    heldout_wer_candidate: float | None
    heldout_wer_serving: float | None
    anchor_utterances: int
    anchor_wer_candidate: float | None
    anchor_wer_serving: float | None
    anchor_wer_base: float | None
    """WER of the lineage's base version on the anchor set (None when it could not be scored)."""
    max_anchor_regression: float
    max_total_anchor_regression: float
    parity_max_abs_diff: float | None
    decoding: str = "greedy"
    """How the WERs were decoded: "lexicon-lm" (the version's beam search) or "greedy"."""
    anchor_only: bool = False
    """Refused by the anchor rules alone (parity held, the held-out items no worse): the update went too far
    rather than the wrong way, so a smaller step of it may pass (cycle.py's backoff)."""

    def as_dict(self) -> dict:
        return {**asdict(self), "reasons": list(self.reasons)}


def score_onnx(onnx_path: Path, utterances: Sequence[tuple[np.ndarray, str]],
               decoder_dir: Path | None = None) -> EvalSummary:
    """Corpus WER/CER of an exported model on (float32 16 kHz samples, reference text) pairs.

    With `decoder_dir` (a directory whose card.json has a "decoder" section, beside its files), the
    server's lexicon + LM beam search decodes; without, greedy CTC.
    """
    transcribe = lm_transcriber(onnx_path, decoder_dir) if decoder_dir is not None else onnx_transcriber(onnx_path)
    hypotheses = [transcribe(np.asarray(samples, dtype=np.float32)) for samples, _ in utterances]
    return error_rates([reference for _, reference in utterances], hypotheses)


def decide(
    *,
    heldout_candidate: EvalSummary | None,
    heldout_serving: EvalSummary | None,
    anchor_candidate: EvalSummary | None,
    anchor_serving: EvalSummary | None,
    parity_max_abs_diff: float | None,
    parity_ok: bool,
    anchor_base: EvalSummary | None = None,
    config: GateConfig = GateConfig(),
    decoding: str = "greedy",
) -> GateDecision:
    """Apply the rules; a missing anchor is reported, not failed; fewer than `min_heldout_utterances`
    held-out items fail."""
    reasons, anchor_reasons = [], []
    has_heldout = heldout_candidate is not None and heldout_serving is not None and heldout_candidate.utterances > 0
    has_anchor = anchor_candidate is not None and anchor_serving is not None and anchor_candidate.utterances > 0
    if not parity_ok:
        reasons.append(f"ONNX parity failed (max |dlogp| {parity_max_abs_diff})")
    heldout_count = heldout_candidate.utterances if has_heldout else 0
    max_anchor_regression = config.max_anchor_regression
    max_total_anchor_regression = config.max_total_anchor_regression
    if heldout_count < config.min_heldout_utterances:
        reasons.append(f"{heldout_count} held-out items with a reference scored the candidate, fewer than "
                       f"min_heldout_utterances = {config.min_heldout_utterances} (rejections alone have no "
                       "reference)")
    if has_heldout and heldout_candidate.wer > heldout_serving.wer + 1e-12:
        reasons.append(f"held-out WER rose from {heldout_serving.wer:.4f} to {heldout_candidate.wer:.4f}")
    if has_anchor and anchor_candidate.wer - anchor_serving.wer > max_anchor_regression + 1e-12:
        anchor_reasons.append(
            f"anchor WER rose from {anchor_serving.wer:.4f} to {anchor_candidate.wer:.4f} "
            f"(more than the allowed {max_anchor_regression:.4f})"
        )
    if has_anchor and anchor_base is not None and \
            anchor_candidate.wer - anchor_base.wer > max_total_anchor_regression + 1e-12:
        anchor_reasons.append(
            f"anchor WER {anchor_candidate.wer:.4f} is more than {max_total_anchor_regression:.4f} above the base "
            f"version's {anchor_base.wer:.4f}"
        )
    return GateDecision(
        passed=not (reasons or anchor_reasons),
        reasons=tuple(reasons + anchor_reasons),
        anchor_only=bool(anchor_reasons) and not reasons,
        heldout_utterances=heldout_count,
        heldout_wer_candidate=heldout_candidate.wer if has_heldout else None,
        heldout_wer_serving=heldout_serving.wer if has_heldout else None,
        anchor_utterances=anchor_candidate.utterances if has_anchor else 0,
        anchor_wer_candidate=anchor_candidate.wer if has_anchor else None,
        anchor_wer_serving=anchor_serving.wer if has_anchor else None,
        anchor_wer_base=anchor_base.wer if has_anchor and anchor_base is not None else None,
        max_anchor_regression=max_anchor_regression,
        max_total_anchor_regression=max_total_anchor_regression,
        parity_max_abs_diff=parity_max_abs_diff,
        decoding=decoding,
    )


def score_version(version_dir: Path, utterances: Sequence[tuple[np.ndarray, str]]) -> EvalSummary:
    """Corpus WER/CER of a version directory (graphs + card.json) decoded as the server decodes its finals."""
    transcribe = version_transcriber(version_dir)
    hypotheses = [transcribe(np.asarray(samples, dtype=np.float32)) for samples, _ in utterances]
    return error_rates([reference for _, reference in utterances], hypotheses)


def decoding_of(card: dict) -> str:
    """How a version's finals are decoded (reported with the gate's figures)."""
    if card.get(SECOND_PASS_KEY):
        return "whisper-second-pass"
    return "lexicon-lm" if card.get("decoder") else "greedy"


class VersionScores:
    """Versions' figures on one fixed set, cached per version: the anchor across cycles (the anchor set and a
    published version never change), a cycle's held-out set across its backoffs."""

    def __init__(self) -> None:
        self._by_version: dict[str, EvalSummary] = {}

    def get(self, version: str, version_dir: Path, utterances: Sequence[tuple[np.ndarray, str]]) -> EvalSummary:
        if version not in self._by_version:
            self._by_version[version] = score_version(version_dir, utterances)
        return self._by_version[version]

    def put(self, version: str, summary: EvalSummary) -> None:
        self._by_version[version] = summary


@dataclass(frozen=True)
class GateInputs:
    """What the gate compares: the candidate's directory, the serving and lineage-base versions', the sets."""

    candidate_dir: Path
    serving: tuple[str, Path]
    """(version, directory) of the serving version."""
    base: tuple[str, Path]
    """(version, directory) of the lineage's base version."""
    heldout: Sequence[tuple[np.ndarray, str]]
    anchor: Sequence[tuple[np.ndarray, str]]


def evaluate_candidate(inputs: GateInputs, config: GateConfig, *, parity_ok: bool,
                       parity_max_abs_diff: float | None,
                       anchor_scores: VersionScores,
                       heldout_scores: VersionScores | None = None) -> tuple[GateDecision, EvalSummary | None]:
    """Score the candidate and the serving version on the held-out items, the candidate, the serving and the
    base version on the anchor (the published versions' anchor figures cached; the serving version's held-out
    figure too when `heldout_scores` is given for this held-out set), and decide.

    Returns the decision and the candidate's anchor summary (to cache once it is published)."""
    if not parity_ok:  # graphs that do not compute what the weights do are not worth scoring
        return decide(heldout_candidate=None, heldout_serving=None, anchor_candidate=None, anchor_serving=None,
                      parity_max_abs_diff=parity_max_abs_diff, parity_ok=False, config=config), None
    heldout, anchor = list(inputs.heldout), list(inputs.anchor)
    heldout_candidate = score_version(inputs.candidate_dir, heldout) if heldout else None
    heldout_serving = (heldout_scores or VersionScores()).get(*inputs.serving, heldout) if heldout else None
    anchor_candidate = score_version(inputs.candidate_dir, anchor) if anchor else None
    anchor_serving = anchor_scores.get(*inputs.serving, anchor) if anchor else None
    anchor_base = anchor_scores.get(*inputs.base, anchor) if anchor else None
    card = json.loads((inputs.candidate_dir / "card.json").read_text())
    decision = decide(heldout_candidate=heldout_candidate, heldout_serving=heldout_serving,
                      anchor_candidate=anchor_candidate, anchor_serving=anchor_serving, anchor_base=anchor_base,
                      parity_max_abs_diff=parity_max_abs_diff, parity_ok=parity_ok, config=config,
                      decoding=decoding_of(card))
    return decision, anchor_candidate


__all__ = ["VersionScores", "GateConfig", "GateDecision", "GateInputs", "decide", "evaluate_candidate", "score_onnx",
           "score_version"]
