"""What a training cycle does differently per policy kind, behind one interface (cycle.py calls it).

- CTC (`streaming-ctc/1`, `windowed-ctc/1`; VoxloopForCTC, HfCtcPolicy): update.py's per-frame
  CTC paths; the candidate is model.onnx (+ decoder files); text-side adaptation re-estimates the
  lexicon + word LM with the corrections;
- Whisper (`whisper-two-pass/1`; WhisperPolicy): whisper_update.py's per-token transcripts; the
  candidate is model.onnx, encoder.onnx, decoder.onnx and the tokenizer; text-side adaptation adds
  the corrections' rare words to its context words (the second pass biases its search toward them).

A kind is made per cycle from the trainer's policy (`policy_kind`): it holds what the cycle's
rollout, update steps and before/after rewards share (the Whisper kind's frozen reference and cached
encoder passes). `build_candidate` writes a complete version directory (graphs checked for parity,
policy/, probe, card with every file's sha256) that the gate scores as the server would decode it
and the registry publishes unchanged.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import soundfile as sf
import torch

from ..core.model import MODEL_SAMPLE_RATE_HZ, STREAMING_CTC_FORMAT
from ..core.registry import MODEL_FILE, write_card
from ..core.store import FeedbackKind
from ..core.warmup import PROBE_CARD_KEY, PROBE_FILE, probe_card_entry
from ..core.whisper_decoder import SECOND_PASS_KEY
from .base_data import BaseData, Utterance
from .config import PPOConfig
from .export import ParityError
from .policies import Policy, check_policy_parity, export_policy, save_policy
from .release import POLICY_DIR
from .rewards import FeedbackItem
from .update import MinibatchGradients, ReplaySampler, Rollout, collect_rollout, ctc_minibatch_gradients, mean_rewards
from .whisper_model import WhisperPolicy

log = logging.getLogger(__name__)

CONTEXT_WORDS = 128
"""Most context words a Whisper version keeps (the newest corrections' words win; core/context_bias.py):
each spelling is one more way for the search to start a wrong word."""


@dataclass(frozen=True)
class Candidate:
    """A cycle's candidate: a complete version directory and how its export compared with torch."""

    directory: Path
    card: dict
    parity_ok: bool
    parity_max_abs_diff: float | None


def adaptation_texts(items: Sequence[FeedbackItem]) -> list[str]:
    """The texts users gave (corrections, chosen alternatives): what text-side adaptation learns words from."""
    return [i.target for i in items if i.kind in (FeedbackKind.CORRECTION, FeedbackKind.CHOICE) and i.target]


def corrected_words(items: Sequence[FeedbackItem]) -> list[str]:
    """Words users gave that the transcript they saw lacked (in feedback order): the vocabulary to teach."""
    words = []
    for item in items:
        if item.kind in (FeedbackKind.CORRECTION, FeedbackKind.CHOICE) and item.target:
            shown = set(item.shown.split())
            words += [w for w in item.target.split() if w not in shown]
    return words


def _write_probe(directory: Path, anchor: Sequence[Utterance]) -> Path | None:
    """The anchor's first utterance as the version's probe (the server's warm-up must decode it as recorded)."""
    if not anchor:
        return None
    path = directory / PROBE_FILE
    sf.write(path, anchor[0].samples, MODEL_SAMPLE_RATE_HZ, subtype="PCM_16")  # int16 16 kHz
    return path


class CtcKind:
    """voxloop's streaming Conformer and Hugging Face CTC checkpoints (update.py, export.py, lm.py)."""

    name = "ctc"

    def __init__(self, policy: Policy):
        self.policy = policy

    def ppo_config(self, config: PPOConfig) -> PPOConfig:
        return config

    def collect_rollout(self, items: Sequence[FeedbackItem], config: PPOConfig, generator: torch.Generator) -> Rollout:
        return collect_rollout(self.policy, items, config, generator)

    @property
    def minibatch_gradients(self) -> MinibatchGradients:
        return ctc_minibatch_gradients

    def replay(self, base_data: BaseData) -> ReplaySampler:
        return base_data.replay

    def mean_rewards(self, items: Sequence[FeedbackItem], config: PPOConfig,
                     generator: torch.Generator) -> tuple[float, float]:
        return mean_rewards(self.policy, items, config, generator)

    def rehearse(self, *_args) -> None:
        """CTC policies do not rehearse earlier corrections: their text side (lexicon, LM) learns a corrected
        word outright (PPOConfig.rehearsal_steps)."""
        return None

    def build_candidate(self, directory: Path, version: str, parent_dir: Path, parent_card: dict,
                        items: Sequence[FeedbackItem], anchor: Sequence[Utterance], card: dict,
                        adapt: bool) -> Candidate:
        texts = adaptation_texts(items)
        directory.mkdir(parents=True)
        onnx_path = export_policy(self.policy, directory / MODEL_FILE, version)
        parity_ok, parity_diff = True, None
        try:
            parity = check_policy_parity(self.policy, onnx_path)
            parity_diff, card = parity.max_abs_logprob_diff, {**card, "parity": parity.as_dict()}
        except ParityError as e:
            log.error("candidate %s: %s", version, e)
            parity_ok = False
        save_policy(self.policy, directory / POLICY_DIR)
        decoder_files, decoder_section = _decoder_files(parent_dir, parent_card, texts, directory / ".adapted", adapt)
        for name, path in decoder_files.items():
            if not (directory / name).exists():
                (directory / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, directory / name)
        shutil.rmtree(directory / ".adapted", ignore_errors=True)
        card = {**card, "format": parent_card.get("format", STREAMING_CTC_FORMAT),
                "model": {**parent_card.get("model", {}),
                          "parameters": sum(p.numel() for p in self.policy.parameters())}}
        if decoder_section is not None:
            card["decoder"] = decoder_section
        if (probe := _write_probe(directory, anchor)) is not None:
            card[PROBE_CARD_KEY] = probe_card_entry(onnx_path, probe)
        return Candidate(directory, write_card(directory, card), parity_ok, parity_diff)


def _decoder_files(parent_dir: Path, parent_card: dict, texts: list[str], out_dir: Path,
                   adapt: bool) -> tuple[dict[str, Path], dict | None]:
    """A CTC child's decoder files and card section: adapted with `texts`, or the parent's carried forward."""
    section = parent_card.get("decoder")
    if not section:
        return {}, None
    carried = {name: parent_dir / name for name in parent_card.get("files", {})
               if name not in (MODEL_FILE, PROBE_FILE) and not name.startswith(POLICY_DIR + "/")}
    if adapt and texts:
        from .lm import adapt_decoder_files, decoder_card

        adapted = adapt_decoder_files(parent_dir, texts, out_dir)
        if adapted:
            card = decoder_card(parent_card) or {}
            card["adapted_sentences"] = len(texts)
            return {**carried, **adapted}, card
    return carried, section


class WhisperKind:
    """The Whisper-based two-pass policy (whisper_update.py, whisper_export.py)."""

    name = "whisper"

    def __init__(self, policy: WhisperPolicy, tokenizer_json: Path):
        from .whisper_update import WhisperRolloutContext

        self.policy = policy
        self.tokenizer_json = tokenizer_json
        self.context = WhisperRolloutContext(policy, tokenizer_json)

    def ppo_config(self, config: PPOConfig) -> PPOConfig:
        return config.for_two_pass()

    def collect_rollout(self, items: Sequence[FeedbackItem], config: PPOConfig, generator: torch.Generator) -> Rollout:
        from .whisper_update import collect_whisper_rollout

        return collect_whisper_rollout(self.policy, items, config, generator, self.context)

    @property
    def minibatch_gradients(self) -> MinibatchGradients:
        from .whisper_update import whisper_minibatch_gradients

        return partial(whisper_minibatch_gradients, context=self.context)

    def replay(self, base_data: BaseData) -> ReplaySampler:
        from .whisper_update import whisper_replay_sampler

        return whisper_replay_sampler(base_data.replay_pool, self.context)

    def mean_rewards(self, items: Sequence[FeedbackItem], config: PPOConfig,
                     generator: torch.Generator) -> tuple[float, float]:
        from .whisper_update import whisper_mean_rewards

        return whisper_mean_rewards(self.policy, items, config, generator, self.context)

    def rehearse(self, optimizer: torch.optim.Optimizer, items: Sequence[FeedbackItem], replay: ReplaySampler | None,
                 config: PPOConfig, rng: random.Random, should_stop, data_parallel):
        """Supervised steps on `items`' texts after the update (whisper_update.whisper_rehearsal); None when the
        objective has no supervised term (ppo) or rehearsal is off."""
        from .whisper_update import whisper_rehearsal

        if not config.rehearses:
            return None
        return whisper_rehearsal(self.policy, optimizer, items, config, self.context, replay, rng,
                                 should_stop=should_stop, data_parallel=data_parallel)

    def build_candidate(self, directory: Path, version: str, parent_dir: Path, parent_card: dict,
                        items: Sequence[FeedbackItem], anchor: Sequence[Utterance], card: dict,
                        adapt: bool) -> Candidate:
        from .whisper_import import write_whisper_version

        parent_words = (parent_card.get(SECOND_PASS_KEY) or {}).get("context_words", [])
        # Only words Whisper spells with several tokens: the rare ones it cannot be expected to know.
        rare = [w for w in corrected_words(items) if self.context.tokenizer.pieces(w) > 1]
        words = context_words(parent_words, rare) if adapt else list(parent_words)
        probe_dir = directory.with_name(directory.name + ".probe")
        probe_dir.mkdir(parents=True, exist_ok=True)
        probe = _write_probe(probe_dir, anchor) or parent_dir / PROBE_FILE
        try:
            written = write_whisper_version(self.policy, directory, version, tokenizer_json=self.tokenizer_json,
                                            probe_wav=probe, card={**card, "language": parent_card.get("language")},
                                            context_words=words)
        except ParityError as e:
            log.error("candidate %s: %s", version, e)
            return Candidate(directory, card, False, None)
        finally:
            shutil.rmtree(probe_dir, ignore_errors=True)
        return Candidate(directory, written, True, written["parity"]["max_abs_logprob_diff"])


def context_words(parent_words: Sequence[str], words: Sequence[str], limit: int = CONTEXT_WORDS) -> list[str]:
    """The parent's context words and the corrected words, newest last, each once, at most `limit`.

    The second pass biases its search toward them (core/context_bias.py): a corrected name reaches the
    decoder before the weights learn to spell it. (A "previous text" prompt of the same words, Whisper's
    <|startofprev|>, was measured first and derailed general decoding: docs/benchmarks.md.)"""
    kept = list(dict.fromkeys(reversed([*parent_words, *words])))[:limit]  # newest occurrence wins
    return list(reversed(kept))


def policy_kind(policy, version_dir: Path) -> CtcKind | WhisperKind:
    """The cycle's kind object for the trainer's policy (version_dir: the serving version it started from)."""
    if isinstance(policy, WhisperPolicy):
        from .whisper_import import TOKENIZER_FILE

        return WhisperKind(policy, version_dir / TOKENIZER_FILE)
    return CtcKind(policy)


__all__ = ["Candidate", "CtcKind", "WhisperKind", "adaptation_texts", "corrected_words", "policy_kind",
           "context_words"]
