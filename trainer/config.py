"""The trainer's configs, one frozen dataclass per component, every field documented under it:

- TrainerConfig: the online trainer (loop, cycle, gate); `voxloop train` flags and the in-process trainer of
  `voxloop serve` (VOXLOOP_TRAINER_<FIELD>) map onto it; the PPO update's own knobs are its `ppo` field
  (PPOConfig; the maths is trainer/ppo.py);
- CorpusConfig: the synthetic corpus (`voxloop pretrain corpus`, trainer/corpus.py);
- PretrainConfig: base-model pretraining (`voxloop pretrain train`, trainer/pretrain.py).

This module imports no torch, so the CLI builds its flags from these classes (trainer/config_flags.py) at
no cost, and docs/operations.md's reference tables are generated from them (scripts/gen_operations_docs.py).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..core.data_dir import DEFAULT_DATA_DIR, REGISTRY_SUBDIR, STORE_FILE, TRAINER_SUBDIR

ENV_PREFIX = "VOXLOOP_TRAINER_"
"""`VOXLOOP_TRAINER_<FIELD>` sets a scalar field of the in-process trainer (e.g. VOXLOOP_TRAINER_MIN_FEEDBACK=16);
VOXLOOP_TRAINER_OBJECTIVE sets ppo.objective. Where data, store and registry live follows the server's config."""
_ENV_EXCLUDED = ("data_dir", "store_url", "registry_dir", "ppo")
DEFAULT_CORPUS_DIR = Path("corpus")
"""Where `voxloop pretrain corpus` writes the synthetic corpus and pretraining and the online trainer read it
(relative to the working directory)."""
TRAINER_METRICS_PORT = 9401
"""The standalone trainer's (`voxloop train`) Prometheus port, next to the server's (ServerConfig.metrics_port);
in `voxloop serve` the in-process trainer's metrics share the server's endpoint."""


Objective = Literal["ppo", "sft", "ppo+sft"]
OBJECTIVES: tuple[str, ...] = ("ppo", "sft", "ppo+sft")


@dataclass(frozen=True)
class PPOConfig:
    """Every knob of one cycle's policy update (PPO and its ptx terms)."""

    objective: Objective = "ppo+sft"
    """ppo: reward terms only; sft: supervised CTC on feedback targets only; ppo+sft: both (PPO-ptx)."""
    samples_per_utterance: int = 4
    """K: CTC paths sampled from pi_old per utterance (the greedy path and target alignment come on top)."""
    sampling_temperature: float = 1.0
    """Temperature of the per-frame distributions paths are sampled from (1 = the policy itself)."""
    include_greedy: bool = True
    """Add the greedy (best-path) candidate: usually what the user was shown."""
    include_target_alignment: bool = True
    """Add the Viterbi alignment of the feedback target: a candidate that spells the right answer."""
    reward_unit: Literal["char", "word"] = "char"
    """Edit-distance reward counted in characters (denser signal) or words (what WER counts)."""
    normalize_advantages: bool = False
    """Divide group advantages by the group std (GRPO); off: measured to drift more (issue #5)."""
    clip_range: float = 0.2
    """epsilon of the clipped ratio: the ratio is clipped to [1 - eps, 1 + eps]."""
    init_kl_coef: float = 1.0
    """beta at the first cycle: weight of the exact per-frame KL to the reference policy."""
    target_kl: float | None = 0.02
    """nats/frame the adaptive controller steers the KL to; None keeps beta fixed."""
    kl_horizon: int = 200
    """Updates over which the controller may change beta by about e^(0.2) (Ziegler et al.)."""
    entropy_coef: float = 0.001
    """Weight of the per-frame entropy bonus."""
    sft_coef: float = 1.0
    """Weight of the CTC loss on feedback targets (corrections, acceptances, chosen alternatives)."""
    replay_coef: float = 1.0
    """Weight of the CTC loss on replayed base-corpus utterances (0 = no replay)."""
    replay_per_minibatch: int = 8
    """Base-corpus utterances replayed with each minibatch."""
    epochs: int = 2
    """Passes over the rollouts (with 4 the shipped model broke the 1-point anchor margin; bench/trainer_cycle.py)."""
    minibatch_size: int = 16
    """Feedback utterances per minibatch (per gradient step, without accumulation)."""
    two_pass_learning_rate: float = 1e-5
    """learning_rate for a two-pass (Whisper) policy: its pretrained 38 M-parameter decoder needs ~10x less
    than the small CTC model (1e-4 made the per-token KL 0.25 nats in one cycle)."""
    two_pass_epochs: int = 1
    """epochs for a two-pass policy: its candidates are token sequences scored over 51,864 tokens, so a pass
    costs far more (a 64-item cycle: 154 s with 1 epoch and 2 samples, 276 s with 2 and 4; docs/benchmarks.md)."""
    two_pass_samples_per_utterance: int = 2
    """samples_per_utterance for a two-pass policy (each sample is a full decode)."""
    rehearsal_steps: int = 8
    """Two-pass (Whisper) policies, objectives sft and ppo+sft: after the cycle's update, up to this many
    supervised minibatches (cross-entropy on the users' texts, with base replay) drawn from the rehearsal
    memory -- texts earlier cycles consumed (TrainerConfig.rehearsal_memory) -- and this cycle's, one pass
    at most. One exposure per correction moves a pretrained decoder little at a learning rate that keeps
    the anchor (128 corrections: -8% domain WER without, docs/benchmarks.md); 0 turns it off. CTC
    policies do not rehearse: their text side learns a corrected word outright."""
    rehearsal_learning_rate: float = 3e-5
    """AdamW learning rate of the rehearsal's steps (the PPO steps take two_pass_learning_rate). Adaptation
    bench (warehouse scenario, v2, 128 corrections, four draws; docs/benchmarks.md): with the gate's held-out
    pool and its backoff, 3e-5 lowered domain WER by 44-56% relative (mean 50%), 1e-5 by 34-41% (mean 38%),
    the gate's anchor within 1 point of the base in both and the bench's anchor better. Without the backoff
    3e-5 stalled: candidates rose 2.4-3.4 anchor points a cycle and were refused outright."""
    rehearsal_kl_coef: float = 5.0
    """Weight of the exact KL to the reference over the replayed base utterances' tokens in each rehearsal
    step (distillation: it holds the decoder's general behaviour where replay's cross-entropy holds only the
    replayed tokens). Offline, 3e-5, 4 cycles: the gate's anchor 25.8% -> 27.5% without it, 26.7% at 1,
    25.6% at 5. Adaptation bench at 1e-5, 128 corrections: -26.5% domain WER with it (5), -21.6% without;
    0 turns it off."""
    head_ctc_coef: float = 1.0
    """Weight of the CTC loss on feedback targets that trains a two-pass (Whisper) policy's first-pass head
    (objective sft, ppo+sft; its interim results learn the corrected words too)."""
    rows_per_forward: int = 16
    """A two-pass policy's minibatch runs its decoder on at most this many candidate transcripts at a time
    (each holds full distributions over Whisper's 51,864 tokens: this bounds the update's memory)."""
    gradient_accumulation_steps: int = 1
    """Minibatches one optimizer step sums the gradients of (their mean loss). Under torchrun with N processes a
    step takes N times as many, one share per process: N processes update exactly as one process with N times
    the accumulation (trainer/distributed.py)."""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant within and across cycles; 3e-4 regressed the anchor set by 1.4-1.7 points)."""
    weight_decay: float = 0.0
    """AdamW weight decay (0: pull toward the reference is the KL term's job)."""
    grad_clip_norm: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 0
    """Seed of path sampling, minibatch order and replay draws."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES} (got {self.objective!r})")
        if self.samples_per_utterance < 0 or (self.samples_per_utterance == 0 and not self.include_greedy):
            raise ValueError("samples_per_utterance must be >= 0, and > 0 unless include_greedy is on")
        if self.sampling_temperature <= 0:
            raise ValueError(f"sampling_temperature must be > 0 (got {self.sampling_temperature})")
        if not 0 < self.clip_range < 1:
            raise ValueError(f"clip_range must be in (0, 1), e.g. 0.2 (got {self.clip_range})")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError("target_kl must be > 0 nats/frame, or None for a fixed KL coefficient")
        if min(self.init_kl_coef, self.entropy_coef, self.sft_coef, self.replay_coef, self.head_ctc_coef,
               self.rehearsal_kl_coef) < 0:
            raise ValueError("init_kl_coef, entropy_coef, sft_coef, replay_coef, head_ctc_coef and rehearsal_kl_coef "
                             "must be >= 0")
        if self.rows_per_forward < 1:
            raise ValueError("rows_per_forward must be >= 1")
        if min(self.epochs, self.two_pass_epochs, self.minibatch_size, self.kl_horizon,
               self.gradient_accumulation_steps) < 1:
            raise ValueError("epochs, two_pass_epochs, minibatch_size, gradient_accumulation_steps and kl_horizon "
                             "must be >= 1")
        if self.two_pass_samples_per_utterance < 0:
            raise ValueError("two_pass_samples_per_utterance must be >= 0")
        if self.rehearsal_steps < 0:
            raise ValueError("rehearsal_steps must be >= 0")
        if min(self.learning_rate, self.two_pass_learning_rate, self.rehearsal_learning_rate,
               self.grad_clip_norm) <= 0:
            raise ValueError("learning_rate, two_pass_learning_rate, rehearsal_learning_rate and grad_clip_norm "
                             "must be > 0")

    def for_two_pass(self) -> PPOConfig:
        """The knobs a two-pass (Whisper) policy's update uses: the two_pass_* fields in place of their namesakes."""
        return dataclasses.replace(self, learning_rate=self.two_pass_learning_rate, epochs=self.two_pass_epochs,
                                   samples_per_utterance=self.two_pass_samples_per_utterance)

    @property
    def uses_rewards(self) -> bool:
        return self.objective in ("ppo", "ppo+sft")

    @property
    def uses_targets(self) -> bool:
        return self.objective in ("sft", "ppo+sft")

    @property
    def rehearses(self) -> bool:
        """Whether a two-pass policy's cycle rehearses (rehearsal_steps): a supervised objective and steps > 0."""
        return self.uses_targets and self.rehearsal_steps > 0


@dataclass(frozen=True)
class TrainerConfig:
    """The online trainer: when a cycle starts, what it reads, how it updates, gates and publishes."""

    data_dir: Path = DEFAULT_DATA_DIR
    """Root of the server's and trainer's state ($VOXLOOP_HOME); the trainer keeps <data_dir>/trainer/."""
    store_url: str | Path | None = None
    """Feedback store (SQLite path or SQLAlchemy URL); None: <data_dir>/feedback.sqlite3, the server's."""
    registry_dir: Path | None = None
    """Model registry published to; None: <data_dir>/registry, the server's."""
    corpus_dir: Path | None = DEFAULT_CORPUS_DIR
    """Base corpus for the anchor set (dev) and replay (train); missing: a small one is synthesized."""
    min_feedback: int = 64
    """A cycle starts as soon as this many feedback items are pending..."""
    max_wait_s: float = 600.0
    """...or when this long passed since the last cycle (or the start) with at least one pending."""
    poll_interval_s: float = 5.0
    """How often the loop counts pending feedback when nobody wakes it (TrainerLoop.notify)."""
    max_batch: int = 64
    """Feedback items one cycle reads (held-out share included)."""
    max_share_per_user: float = 0.5
    """Poisoning guard: one user's items are at most this share of a batch."""
    heldout_share: float = 0.2
    """Share of items with a reference text held out for the gate (by a hash of the feedback id)."""
    heldout_pool: int = 48
    """Earlier cycles' held-out items (the most recently consumed; never trained on) the gate scores beside
    this batch's own: the 1-4 items one batch holds out decide by a word or two (docs/benchmarks.md); 0: this
    batch's alone."""
    max_utterance_s: float = 30.0
    """Longer utterances are not trained on (bounded memory); they are still consumed."""
    anchor_size: int = 100
    """Base-corpus dev utterances in the fixed anchor set."""
    rehearsal_memory: int = 512
    """Most recently consumed items with a text (corrections, acceptances, choices; not held out, not flagged,
    audio still stored) a cycle may rehearse (PPOConfig.rehearsal_steps); 0: none."""
    replay_pool_size: int = 512
    """Base-corpus train utterances held in memory for replay."""
    fallback_sentences: int = 600
    """Sentences of the corpus synthesized when corpus_dir has none (anchor = its dev split)."""
    max_anchor_regression: float = 0.02
    """Largest anchor WER rise (absolute; 0.01 = 1 point) over the serving version the gate accepts: how much
    of earlier cycles' anchor gains one cycle may give back."""
    max_total_anchor_regression: float = 0.01
    """Largest anchor WER rise over the lineage's base version (the last one not made by this trainer): what
    the trainer may cost general speech in all. The anchor moves 1-2 points between neighbouring versions,
    so judging each cycle by 1 point against the serving version refused candidates after a version that
    scored low by luck (docs/benchmarks.md)."""
    gate_backoffs: int = 1
    """A candidate refused by the anchor rules alone is rebuilt this many times, each time with its update
    halved (weights halfway back to the serving version's: a shorter step along the same direction keeps
    more of what it learned than of its drift), and gated again; 0: refused at once."""
    min_heldout_utterances: int = 1
    """Fewest held-out items with a reference that must score a candidate before it is published. A batch
    without them (rejections alone: no text) cannot show the candidate got better where users spoke, and
    rejection-only cycles measurably made that worse (docs/benchmarks.md), so it is gated; 0 publishes
    on the anchor alone."""
    adapt_lexicon: bool = True
    """Text-side adaptation: teach a CTC version's lexicon/LM (if it has a decoder) the words of the corrections
    it trained on; add the rare words users corrected to a Whisper version's context words (its second pass
    biases its search toward them)."""
    num_threads: int = 1
    """torch intra-op threads of the trainer (process-wide; the server also sets 1)."""
    nice: int = 10
    """Niceness of the in-process trainer thread (serving keeps priority)."""
    failure_backoff_s: float = 60.0
    """Wait after a failed cycle before the next try."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The update's knobs (objective, K, clip range, KL target, epochs, ...)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        if self.min_feedback < 1 or self.max_batch < 1:
            raise ValueError("min_feedback and max_batch must be >= 1")
        if self.max_wait_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("max_wait_s and poll_interval_s must be > 0 seconds")
        if not 0.0 <= self.heldout_share < 1.0:
            raise ValueError(f"heldout_share must be in [0, 1), e.g. 0.2 (got {self.heldout_share})")
        if not 0.0 < self.max_share_per_user <= 1.0:
            raise ValueError("max_share_per_user must be in (0, 1]; 1 means no per-user cap")
        if self.max_anchor_regression < 0 or self.max_total_anchor_regression < 0:
            raise ValueError("max_anchor_regression and max_total_anchor_regression must be >= 0 "
                             "(absolute WER, 0.01 = 1 point)")
        if self.min_heldout_utterances < 0:
            raise ValueError(f"min_heldout_utterances must be >= 0 (got {self.min_heldout_utterances})")
        if min(self.anchor_size, self.replay_pool_size, self.rehearsal_memory, self.heldout_pool,
               self.gate_backoffs) < 0 or self.num_threads < 1:
            raise ValueError("anchor_size, replay_pool_size, rehearsal_memory, heldout_pool and gate_backoffs must "
                             "be >= 0, num_threads >= 1")

    @property
    def trainer_dir(self) -> Path:
        return self.data_dir / TRAINER_SUBDIR

    @property
    def resolved_store_url(self) -> str | Path:
        return self.store_url if self.store_url is not None else self.data_dir / STORE_FILE

    @property
    def resolved_registry_dir(self) -> Path:
        return Path(self.registry_dir) if self.registry_dir is not None else self.data_dir / REGISTRY_SUBDIR

    def with_objective(self, objective: str) -> TrainerConfig:
        return dataclasses.replace(self, ppo=dataclasses.replace(self.ppo, objective=objective))


# --- `voxloop pretrain`: the synthetic corpus and the base model ---

# espeak-ng English voices whose synthesis ships with espeak-ng itself (the mb-* voices need mbrola).
ESPEAK_LANGUAGES = (
    "en-us",
    "en",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-029",
    "en-us-nyc",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
# Variants from `espeak-ng --voices=variant` that sound distinct from each other ("" is the
# language's own default). klatt6 is left out: it renders identically to klatt. The novelty
# variants (whisper, croak, Demonic, ...) are left out on purpose: nobody talks to an ASR like that.
ESPEAK_VARIANTS = (
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "Alex", "Andy", "Annie", "adam", "Alicia",
    "Andrea", "belinda", "benjamin", "david", "ed", "edward", "linda", "max", "Michael", "paul",
    "quincy", "steph", "travis", "victor", "zac", "norbert",
)  # fmt: skip
# Every voice `flite -lv` lists except awb_time, a limited-domain voice that can only tell the time.
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")


@dataclass(frozen=True)
class CorpusConfig:
    """How `build_corpus` builds the synthetic corpus."""

    out_dir: Path
    """Directory the corpus is written to; must be empty or not exist yet."""
    seed: int = 0
    """Seeds sentence order, split assignment and every utterance's voice, speed and pitch."""
    num_sentences: int = 12000
    """Distinct sentences to use (all available ones if fewer pass the filters)."""
    min_words: int = 3
    """Fewest words a normalized sentence may have."""
    max_words: int = 20
    """Most words a normalized sentence may have."""
    dev_fraction: float = 0.05
    """Share of sentences in dev (at least one)."""
    test_fraction: float = 0.05
    """Share of sentences in the test splits (at least one)."""
    train_utterances_per_sentence: int = 1
    """Readings of each train sentence, each in a different training voice."""
    flite_fraction: float = 0.3
    """Share of training-voice utterances read by flite rather than espeak-ng."""
    heldout_espeak_voice: str = "en-gb-x-gbcwmd+f3"
    """espeak-ng language+variant for test_heldout_espeak; neither part is used in train/dev/test."""
    heldout_flite_voice: str = "rms"
    """flite voice for test_heldout_flite, never used in train/dev/test."""
    espeak_speed_wpm: tuple[int, int] = (130, 190)
    """Inclusive range of espeak-ng speaking rates (`-s`, words per minute)."""
    espeak_pitch: tuple[int, int] = (30, 70)
    """Inclusive range of espeak-ng base pitch (`-p`, 0..99)."""
    flite_duration_stretch: tuple[float, float] = (0.85, 1.2)
    """Range of flite's duration_stretch (>1 is slower), the counterpart of espeak-ng's speed."""
    max_duration_s: float = 12.0
    """Utterances longer than this after trimming are dropped."""
    max_edge_silence_s: float = 0.15
    """Leading/trailing silence kept at most, in seconds."""
    workers: int = 2
    """Synthesis processes; 1 synthesizes in this process."""
    fortunes_dir: Path = Path("/usr/share/games/fortunes")
    """Debian fortunes files (package fortune-mod and the fortunes* packages)."""

    def __post_init__(self) -> None:
        # Accept str paths from CLIs and notebooks; the dataclass is frozen, hence object.__setattr__.
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "fortunes_dir", Path(self.fortunes_dir))
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}..{self.max_words}")
        if self.num_sentences < 3:
            raise ValueError("num_sentences must be at least 3 (one each for train, dev and test)")
        if not (0 < self.dev_fraction < 1 and 0 < self.test_fraction < 1
                and self.dev_fraction + self.test_fraction < 1):  # fmt: skip
            raise ValueError("dev_fraction and test_fraction must be in (0, 1) and sum to less than 1")
        if not 0 <= self.flite_fraction <= 1:
            raise ValueError(f"flite_fraction must be in [0, 1], got {self.flite_fraction}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        language, _, variant = self.heldout_espeak_voice.partition("+")
        if language not in ESPEAK_LANGUAGES or variant not in ESPEAK_VARIANTS:
            raise ValueError(
                f"heldout_espeak_voice {self.heldout_espeak_voice!r} must be LANGUAGE+VARIANT with "
                f"LANGUAGE in {ESPEAK_LANGUAGES} and VARIANT in ESPEAK_VARIANTS"
            )
        if self.heldout_flite_voice not in FLITE_VOICES:
            raise ValueError(f"heldout_flite_voice must be one of {FLITE_VOICES}")
        if self.train_utterances_per_sentence < 1:
            raise ValueError(
                f"train_utterances_per_sentence must be >= 1, got {self.train_utterances_per_sentence}"
            )
        if self.train_utterances_per_sentence > min(len(self.training_espeak_languages),
                                                    len(self.training_flite_voices)):  # fmt: skip
            raise ValueError("train_utterances_per_sentence exceeds the number of training voices")

    @property
    def training_espeak_languages(self) -> tuple[str, ...]:
        held_out = self.heldout_espeak_voice.partition("+")[0]
        return tuple(v for v in ESPEAK_LANGUAGES if v != held_out)

    @property
    def training_espeak_variants(self) -> tuple[str, ...]:
        held_out = self.heldout_espeak_voice.partition("+")[2]
        return tuple(v for v in ESPEAK_VARIANTS if v != held_out)

    @property
    def training_flite_voices(self) -> tuple[str, ...]:
        return tuple(v for v in FLITE_VOICES if v != self.heldout_flite_voice)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything `voxloop pretrain train` can set."""

    corpus_dir: Path
    """Corpus built by `voxloop pretrain corpus` (manifests train.jsonl, dev.jsonl, ...)."""
    out_dir: Path
    """Where checkpoints, the best weights and history.jsonl go."""
    epochs: int = 12
    """Passes over the training split; the LR schedule spans exactly this many."""
    max_minutes: float = 120.0
    """Wall-clock budget; training stops (after a checkpoint) when it runs out."""
    max_batch_seconds: float = 100.0
    """Padded audio seconds per batch."""
    peak_lr: float = 2e-3
    """AdamW learning rate at the end of the warmup; cosine decay to 0 over the step budget follows."""
    warmup_steps: int = 400
    """Optimizer steps of linear warmup from 0 to peak_lr."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    grad_clip_norm: float = 5.0
    """Global gradient-norm clip."""
    speed_perturb_prob: float = 0.4
    """Share of utterances played at 0.9x or 1.1x speed."""
    noise_prob: float = 0.3
    """Share of utterances with white noise added."""
    noise_snr_db: tuple[float, float] = (8.0, 30.0)
    """Range of the added noise's signal-to-noise ratio, dB (drawn uniformly)."""
    reverb_prob: float = 0.15
    """Share of utterances convolved with a synthetic room response."""
    reverb_rt60_s: tuple[float, float] = (0.15, 0.6)
    """Range of the room's reverberation time (RT60), seconds."""
    dev_utterances: int = 300
    """Dev utterances decoded after each epoch (a fixed subset, for speed)."""
    checkpoint_minutes: float = 10.0
    """Minutes between checkpoints within an epoch (one is also written at each epoch's end)."""
    num_threads: int = 2
    """torch intra-op threads."""
    seed: int = 0
    """Seeds initialization, batch order and augmentation."""
    d_model: int = 144
    """Conformer width of a new model (ignored when resuming: the checkpoint's architecture wins)."""
    num_layers: int = 6
    """Conformer blocks of a new model."""
    num_heads: int = 4
    """Attention heads per block of a new model."""

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if not 0 < self.max_batch_seconds <= 1200:
            raise ValueError("max_batch_seconds must be in (0, 1200]; lower it if memory runs out")


def overrides_from_env(env: Mapping[str, str]) -> dict[str, object]:
    """TrainerConfig fields set by `VOXLOOP_TRAINER_<FIELD>` variables, converted to the field's type.

    Raises ValueError naming the variable when a value does not parse.
    """
    types = typing.get_type_hints(TrainerConfig)
    overrides: dict[str, object] = {}
    for f in dataclasses.fields(TrainerConfig):
        variable = ENV_PREFIX + f.name.upper()
        if f.name in _ENV_EXCLUDED or variable not in env:
            continue
        raw = env[variable].strip()
        target = next((t for t in typing.get_args(types[f.name]) if t is not type(None)), types[f.name])
        try:
            if target is bool:
                if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(raw)
                overrides[f.name] = raw.lower() in ("1", "true", "yes", "on")
            else:
                overrides[f.name] = target(raw)
        except (TypeError, ValueError):
            raise ValueError(f"${variable}: {raw!r} is not a valid {target.__name__}") from None
    return overrides


def config_from_env(env: Mapping[str, str], **fields: object) -> TrainerConfig:
    """The in-process trainer's config: `fields` (where the server keeps its data) plus `VOXLOOP_TRAINER_*`."""
    config = TrainerConfig(**fields, **overrides_from_env(env))
    objective = env.get(ENV_PREFIX + "OBJECTIVE", "").strip()
    return config.with_objective(objective) if objective else config


__all__ = ["ESPEAK_LANGUAGES", "ESPEAK_VARIANTS", "FLITE_VOICES", "OBJECTIVES", "CorpusConfig", "Objective",
           "PPOConfig", "PretrainConfig", "TrainerConfig", "config_from_env", "overrides_from_env"]
