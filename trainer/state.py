"""The trainer's resumable state: policy weights, optimizer, KL coefficient, under <data_dir>/trainer/.

    checkpoint/policy/           save_pretrained weights (those of `version`)
    checkpoint/trainer_state.pt  {"version", "optimizer", "kl_coef", "cycles"}
    intent.json                  {"version"}: a published version awaiting record_cycle + activate

The checkpoint is replaced atomically (written beside, then renamed) after every recorded cycle,
so it always describes a finished cycle. On load, the weights are used only if they belong to the
registry's CURRENT version (after a rollback the trainer starts again from what is served); the KL
coefficient is kept either way.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.registry import Registry, atomic_write_text
from .config import PPOConfig
from .policies import Policy, load_policy_dir
from .ppo import AdaptiveKLController
from .release import load_policy
from .whisper_model import WhisperPolicy

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
POLICY_SUBDIR = "policy"
STATE_FILE = "trainer_state.pt"
INTENT_FILE = "intent.json"


def make_optimizer(policy: Policy, config: PPOConfig) -> torch.optim.Optimizer:
    if isinstance(policy, WhisperPolicy):
        config = config.for_two_pass()
    return torch.optim.AdamW(policy.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                             betas=(0.9, 0.98))


@dataclass
class TrainerState:
    policy: Policy
    optimizer: torch.optim.Optimizer
    kl_controller: AdaptiveKLController
    version: str
    """The registry version the policy's weights are (the serving model at the start of a cycle)."""
    cycles: int = 0
    """Cycles this trainer recorded (any outcome)."""

    @classmethod
    def load(cls, trainer_dir: Path, registry: Registry, config: PPOConfig) -> TrainerState:
        current = registry.current_version()
        if current is None:
            raise FileNotFoundError(f"registry {registry.root} has no CURRENT version to train from")
        checkpoint = trainer_dir / CHECKPOINT_DIR
        saved = torch.load(checkpoint / STATE_FILE, weights_only=False) if (checkpoint / STATE_FILE).exists() else None
        kl = AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
        if saved is not None:
            kl.value = float(saved["kl_coef"])
        if saved is not None and saved["version"] == current:
            policy = load_policy_dir(checkpoint / POLICY_SUBDIR)
            optimizer = make_optimizer(policy, config)
            optimizer.load_state_dict(saved["optimizer"])
            log.info("trainer resumed from %s (version %s, kl_coef %.4f)", checkpoint, current, kl.value)
        else:
            policy = load_policy(registry.version_dir(current))
            optimizer = make_optimizer(policy, config)
            log.info("trainer starts from the serving version %s (kl_coef %.4f)", current, kl.value)
        return cls(policy, optimizer, kl, current, int(saved["cycles"]) if saved else 0)

    def save(self, trainer_dir: Path) -> None:
        """Replace the checkpoint atomically (a crash leaves the old one or the new one)."""
        checkpoint = trainer_dir / CHECKPOINT_DIR
        tmp = checkpoint.with_name(CHECKPOINT_DIR + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.policy.save_pretrained(tmp / POLICY_SUBDIR)
        torch.save({"version": self.version, "optimizer": self.optimizer.state_dict(),
                    "kl_coef": self.kl_controller.value, "cycles": self.cycles}, tmp / STATE_FILE)
        old = checkpoint.with_name(CHECKPOINT_DIR + ".old")
        if checkpoint.exists():
            if old.exists():
                shutil.rmtree(old)
            checkpoint.rename(old)
        tmp.rename(checkpoint)
        shutil.rmtree(old, ignore_errors=True)

    def snapshot(self) -> dict:
        """Copies of the weights and optimizer state, to restore after a rejected candidate."""
        return {"policy": {k: v.detach().clone() for k, v in self.policy.state_dict().items()},
                "optimizer": _clone(self.optimizer.state_dict())}

    def restore(self, snapshot: dict) -> None:
        self.policy.load_state_dict(snapshot["policy"])
        self.optimizer.load_state_dict(snapshot["optimizer"])

    @torch.no_grad()
    def step_back(self, snapshot: dict, keep: float = 0.5) -> None:
        """Weights := snapshot + keep * (weights - snapshot): the update shortened, along the line it took
        (weight-space interpolation, as WiSE-FT). The optimizer's moments stay those of the full update."""
        for name, parameter in self.policy.named_parameters():  # each tied tensor once
            parameter.copy_(torch.lerp(snapshot["policy"][name], parameter, keep))


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def write_intent(trainer_dir: Path, version: str) -> None:
    atomic_write_text(trainer_dir / INTENT_FILE, json.dumps({"version": version}) + "\n")


def read_intent(trainer_dir: Path) -> str | None:
    path = trainer_dir / INTENT_FILE
    return json.loads(path.read_text())["version"] if path.exists() else None


def clear_intent(trainer_dir: Path) -> None:
    (trainer_dir / INTENT_FILE).unlink(missing_ok=True)


__all__ = ["TrainerState", "clear_intent", "make_optimizer", "read_intent", "write_intent"]
