"""TrainerConfig: every knob of the online trainer (loop, cycle, gate), in one frozen dataclass.

`voxloop train` flags and the in-process trainer of `voxloop serve` map onto it (trainer/cli.py);
the PPO update's own knobs are its `ppo` field (trainer/ppo.py PPOConfig).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .ppo import PPOConfig

TRAINER_SUBDIR = "trainer"
"""Under data_dir: the trainer's checkpoint, intent file and fallback corpus."""
STORE_FILE = "feedback.sqlite3"  # the server's default store file name under data_dir (server/config.py)
REGISTRY_SUBDIR = "registry"  # the server's default registry under data_dir (server/config.py)
ENV_PREFIX = "VOXLOOP_TRAINER_"
"""`VOXLOOP_TRAINER_<FIELD>` sets a scalar field of the in-process trainer (e.g. VOXLOOP_TRAINER_MIN_FEEDBACK=16);
VOXLOOP_TRAINER_OBJECTIVE sets ppo.objective. Where data, store and registry live follows the server's config."""
_ENV_EXCLUDED = ("data_dir", "store_url", "registry_dir", "ppo")


@dataclass(frozen=True)
class TrainerConfig:
    """The online trainer: when a cycle starts, what it reads, how it updates, gates and publishes."""

    data_dir: Path = Path("~/.local/share/voxloop")
    """Root of the server's and trainer's state ($VOXLOOP_HOME); the trainer keeps <data_dir>/trainer/."""
    store_url: str | Path | None = None
    """Feedback store (SQLite path or SQLAlchemy URL); None: <data_dir>/feedback.sqlite3, the server's."""
    registry_dir: Path | None = None
    """Model registry published to; None: <data_dir>/registry, the server's."""
    corpus_dir: Path | None = Path("corpus")
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
    max_utterance_s: float = 30.0
    """Longer utterances are not trained on (bounded memory); they are still consumed."""
    anchor_size: int = 100
    """Base-corpus dev utterances in the fixed anchor set."""
    replay_pool_size: int = 512
    """Base-corpus train utterances held in memory for replay."""
    fallback_sentences: int = 600
    """Sentences of the corpus synthesized when corpus_dir has none (anchor = its dev split)."""
    max_anchor_regression: float = 0.01
    """Largest anchor WER rise (absolute; 0.01 = 1 point) the gate accepts."""
    max_total_anchor_regression: float = 0.02
    """Largest anchor WER rise over the lineage's base version (the last one not made by this trainer)."""
    min_heldout_utterances: int = 1
    """Fewest held-out items with a reference that must score a candidate before it is published. A batch
    without them (rejections alone: no text) cannot show the candidate got better where users spoke, and
    rejection-only cycles measurably made that worse (docs/benchmarks.md), so it is gated; 0 publishes
    on the anchor alone."""
    adapt_lexicon: bool = True
    """Text-side adaptation: teach a CTC version's lexicon/LM (if it has a decoder) the words of the corrections
    it trained on; put the words users corrected into a Whisper version's vocabulary prompt."""
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
        if self.anchor_size < 0 or self.replay_pool_size < 0 or self.num_threads < 1:
            raise ValueError("anchor_size and replay_pool_size must be >= 0, num_threads >= 1")

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


__all__ = ["TrainerConfig", "config_from_env", "overrides_from_env"]
