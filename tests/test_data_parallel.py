"""Data-parallel training: `torchrun --nproc_per_node 2 -m voxloop.clients.cli train --once` (gloo, CPU) makes the
update one process makes with two minibatches per step, and the group's pieces do what they say."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import free_port
from trainer_support import add_feedback, tone
from voxloop.core.registry import Registry
from voxloop.core.store import FeedbackStore
from voxloop.trainer.distributed import SINGLE, backend_for, data_parallel_from_env
from voxloop.trainer.policies import load_policy_dir
from voxloop.trainer.release import POLICY_DIR

TRAINER_ENV = {  # a tiny random model on a toy corpus: every item trained on, the gate on parity only
    "VOXLOOP_TRAINER_HELDOUT_SHARE": "0", "VOXLOOP_TRAINER_MIN_HELDOUT_UTTERANCES": "0",
    "VOXLOOP_TRAINER_MAX_ANCHOR_REGRESSION": "1", "VOXLOOP_TRAINER_MAX_TOTAL_ANCHOR_REGRESSION": "1",
    "VOXLOOP_TRAINER_ANCHOR_SIZE": "3", "VOXLOOP_TRAINER_REPLAY_POOL_SIZE": "6", "VOXLOOP_TRAINER_NUM_THREADS": "1",
}
ITEMS = 40  # three minibatches of 16 per epoch: two-minibatch steps, then a one-minibatch tail


def test_one_process_is_the_identity_group():
    assert data_parallel_from_env({}) is SINGLE and data_parallel_from_env({"WORLD_SIZE": "1"}) is SINGLE
    assert SINGLE.is_main and not SINGLE.enabled and SINGLE.owns(0) and SINGLE.owns(7)
    assert SINGLE.broadcast({"a": 1}) == {"a": 1} and SINGLE.sum([1.5, 2.0]) == [1.5, 2.0]
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ValueError, match="torchrun"):
        data_parallel_from_env({"WORLD_SIZE": "2", "RANK": "2"})


def _train_once(root: Path, corpus: Path, launcher: list[str], *extra: str) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "voxloop.clients.cli", "train", "--once", "--data-dir", str(root / "data"),
               "--store", str(root / "feedback.sqlite3"), "--registry", str(root / "registry"), "--corpus",
               str(corpus), *extra]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **TRAINER_ENV})
    assert run.returncode == 0, run.stderr[-4000:]
    return run


@pytest.mark.slow
def test_two_gloo_processes_make_the_update_of_one_process_with_two_minibatches_per_step(tmp_path, tiny_version_dir,
                                                                                          toy_corpus):
    twin = tmp_path / "twin"
    registry = Registry(twin / "registry")
    registry.seed_from(tiny_version_dir)
    corpus = toy_corpus
    with FeedbackStore.open(twin / "feedback.sqlite3") as store:
        for i in range(ITEMS):
            word = "abc"[i % 3]
            add_feedback(store, tone(word, seconds=0.5 + 0.05 * (i % 7), seed=100 + i), text=word)
    single, parallel, plain = (shutil.copytree(twin, tmp_path / name) for name in ("single", "parallel", "plain"))

    _train_once(single, corpus, [sys.executable], "--gradient-accumulation-steps", "2")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    launched = _train_once(parallel, corpus, torchrun)
    assert launched.stdout.count("cycle ") == 1  # the main process alone reports (and records) the cycle
    _train_once(plain, corpus, [sys.executable])  # one minibatch per step: a different update

    def published(root: Path) -> dict[str, torch.Tensor]:
        registry = Registry(root / "registry")
        version = registry.current_version()
        assert version == "tiny-0001-c0001"
        with FeedbackStore.open(root / "feedback.sqlite3") as store:
            assert store.pending_count() == 0 and store.latest_cycle().model_version_out == version
        return load_policy_dir(registry.version_dir(version) / POLICY_DIR).state_dict()

    parent = load_policy_dir(registry.version_dir("tiny-0001") / POLICY_DIR).state_dict()
    one, two, other = published(single), published(parallel), published(plain)
    for name, before in parent.items():
        if not before.is_floating_point():
            continue
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    moved = [name for name, before in parent.items() if before.is_floating_point()
             and not torch.allclose(one[name], before)]
    assert len(moved) > len(parent) // 2  # the cycle did update the policy
    assert any(not torch.allclose(other[name], one[name], rtol=1e-4, atol=1e-5) for name in moved)
