"""The trainer loop: when cycles start, crash-and-resume exactly-once consumption, `voxloop train --once`."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import pytest
import torch
from trainer_support import add_feedback, tone
from voxloop.core.registry import Registry
from voxloop.core.store import FeedbackStore
from voxloop.trainer.config import PPOConfig, TrainerConfig
from voxloop.trainer.cycle import run_cycle
from voxloop.trainer.loop import TrainerLoop, should_start, start_background
from voxloop.trainer.state import read_intent
from voxloop.trainer.update import UpdateAborted

torch.set_num_threads(1)


@pytest.fixture
def setup(tmp_path, tiny_version_dir, toy_corpus):
    registry = Registry(tmp_path / "data" / "registry")
    registry.seed_from(tiny_version_dir)
    config = TrainerConfig(data_dir=tmp_path / "data", corpus_dir=toy_corpus, heldout_share=0.0,
                           min_heldout_utterances=0, anchor_size=3,
                           replay_pool_size=4, max_anchor_regression=1.0, max_total_anchor_regression=1.0,
                           ppo=PPOConfig(epochs=2, minibatch_size=4, learning_rate=3e-3, replay_per_minibatch=2))
    store = FeedbackStore.open(config.resolved_store_url)
    yield store, registry, config
    store.close()


def consumed_exactly_once(store: FeedbackStore, ids: list[int]) -> None:
    cycles, seen = store.latest_cycle().id, []
    for cycle_id in range(1, cycles + 1):
        seen.extend(store.get_cycle(cycle_id).feedback_ids)
    assert sorted(seen) == sorted(ids), "every item consumed once, none twice"
    assert store.pending_count() == 0


def test_a_cycle_starts_on_enough_feedback_or_after_the_wait():
    config = TrainerConfig(min_feedback=64, max_wait_s=600)
    assert should_start(64, 0.0, config)
    assert not should_start(63, 599.0, config)
    assert should_start(1, 600.0, config)
    assert not should_start(0, 10_000.0, config)


@pytest.mark.slow  # training cycles
def test_crash_mid_update_leaves_the_batch_pending_and_a_restart_consumes_it_once(setup):
    store, registry, config = setup
    ids = [add_feedback(store, tone(w, seed=i), text=w) for i, w in enumerate("abcab")]
    steps = iter(range(100))
    with pytest.raises(UpdateAborted):
        run_cycle(store, registry, config, should_stop=lambda: next(steps) >= 1)  # killed after one step
    assert store.pending_count() == len(ids) and store.latest_cycle() is None
    assert registry.versions() == ["tiny-0001"]
    report = TrainerLoop(config, store=store, registry=registry).run_once()  # a fresh trainer, as after a restart
    assert report.outcome == "published"
    consumed_exactly_once(store, ids)


@pytest.mark.slow  # training cycles
def test_crash_between_publish_and_record_retrains_the_batch_once(setup, monkeypatch):
    store, registry, config = setup
    ids = [add_feedback(store, tone(w, seed=i), text=w) for i, w in enumerate("abca")]

    def killed(*args, **kwargs):
        raise RuntimeError("killed before record_cycle committed")

    with monkeypatch.context() as patch:
        patch.setattr(store, "record_cycle", killed)
        with pytest.raises(RuntimeError, match="killed"):
            run_cycle(store, registry, config)
    orphan = read_intent(config.trainer_dir)
    assert orphan == "tiny-0001-c0001" and registry.current_version() == "tiny-0001"  # published, never served
    assert store.pending_count() == len(ids)
    report = TrainerLoop(config, store=store, registry=registry).run_once()
    assert report.outcome == "published" and report.version_out == "tiny-0001-c0001.1"
    assert registry.current_version() == report.version_out and read_intent(config.trainer_dir) is None
    consumed_exactly_once(store, ids)


@pytest.mark.slow  # training cycles
def test_crash_between_record_and_activate_is_finished_on_restart(setup, monkeypatch):
    store, registry, config = setup
    ids = [add_feedback(store, tone(w, seed=i), text=w) for i, w in enumerate("bca")]

    def killed(version):
        raise RuntimeError("killed before CURRENT moved")

    with monkeypatch.context() as patch:
        patch.setattr(registry, "activate", killed)
        with pytest.raises(RuntimeError, match="killed"):
            run_cycle(store, registry, config)
    assert store.latest_cycle().outcome == "published" and registry.current_version() == "tiny-0001"
    report = TrainerLoop(config, store=store, registry=registry).run_once()
    assert report.outcome == "idle"  # nothing pending: the batch was recorded
    assert registry.current_version() == "tiny-0001-c0001" == store.latest_cycle().model_version_out
    consumed_exactly_once(store, ids)


@pytest.mark.slow  # training cycles
def test_the_trainer_resumes_from_its_checkpoint(setup):
    from voxloop.trainer.state import TrainerState

    store, registry, config = setup
    add_feedback(store, tone("a"), text="a")
    loop = TrainerLoop(config, store=store, registry=registry)
    first = loop.run_once()
    trained = loop._kept.state
    resumed = TrainerState.load(config.trainer_dir, registry, config.ppo)  # what a restarted process loads
    assert resumed.version == first.version_out == registry.current_version() and resumed.cycles == 1
    assert resumed.kl_controller.value == trained.kl_controller.value != config.ppo.init_kl_coef
    assert len(resumed.optimizer.state) > 0  # AdamW moments came back, not a fresh optimizer
    assert all(torch.equal(a, b) for a, b in zip(resumed.policy.state_dict().values(),
                                                 trained.policy.state_dict().values(), strict=True))
    add_feedback(store, tone("b"), text="b")
    second = TrainerLoop(config, store=store, registry=registry).run_once()
    assert second.version_in == first.version_out and second.outcome == "published"


@pytest.mark.slow  # training cycles
def test_the_loop_wakes_on_feedback_and_stops_cleanly(setup):
    store, registry, config = setup
    config = dataclasses.replace(config, min_feedback=3, max_wait_s=3600, poll_interval_s=0.2)
    loop = TrainerLoop(config, store=store, registry=registry)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        ids = [add_feedback(store, tone(w), text=w) for w in "ab"]
        time.sleep(0.6)
        assert store.latest_cycle() is None  # 2 < min_feedback, and max_wait not reached
        ids.append(add_feedback(store, tone("c"), text="c"))
        loop.notify()
        deadline = time.monotonic() + 120
        while store.latest_cycle() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.latest_cycle() is not None and sorted(store.latest_cycle().feedback_ids) == sorted(ids)
    finally:
        loop.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_background_trainer_thread_runs_at_lower_priority(setup):
    store, registry, config = setup
    stop = threading.Event()
    loop, thread = start_background(dataclasses.replace(config, poll_interval_s=0.1), stop)
    try:
        deadline = time.monotonic() + 10
        while os.getpriority(os.PRIO_PROCESS, thread.native_id) != config.nice and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == config.nice
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != config.nice  # only that thread
    finally:
        loop.stop()
        thread.join(30)
    assert not thread.is_alive()


@pytest.mark.slow  # training cycles
def test_voxloop_train_once_exits_0_with_a_new_version(setup, capsys):
    from voxloop.clients.cli import main

    store, registry, config = setup
    for i, w in enumerate("abcabcab"):
        add_feedback(store, tone(w, seed=i), text=w)
    status = main(["train", "--once", "--data-dir", str(config.data_dir), "--corpus", str(config.corpus_dir),
                   "--objective", "ppo+sft", "--json"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert registry.current_version() == "tiny-0001-c0001", out
    assert store.pending_count() == 0 and store.latest_cycle().outcome == "published"
    assert '"outcome": "published"' in out
