"""The online trainer loop: wait for feedback, run a cycle, repeat; `voxloop train` and `voxloop serve` run it.

    loop = TrainerLoop(TrainerConfig(data_dir=...))
    loop.run_once()                     # one cycle now (`voxloop train --once`) -> CycleReport
    loop.run(stop_event)                # until stop_event is set (or loop.stop())
    thread = start_background(config)   # in a server process: daemon thread at nice 10, 1 torch thread

When a cycle starts (`should_start`): at least `min_feedback` items are pending, or `max_wait_s`
passed since the last cycle (or the start) with at least one pending. The loop counts pending items
every `poll_interval_s` (one indexed COUNT query) and at once when something calls `notify()`
(e.g. a feedback intake in the same process). Crash safety is the cycle's (cycle.py): feedback is
consumed only in the transaction that records its cycle, and the trainer state (weights, optimizer,
KL coefficient) is checkpointed after each recorded cycle under <data_dir>/trainer/, so a killed
trainer restarts where its last recorded cycle left it and re-reads whatever was not recorded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from ..core import metrics
from ..core.registry import Registry
from ..core.store import FeedbackStore
from .base_data import BaseData, ensure_corpus
from .config import TrainerConfig
from .cycle import CycleOutcome, CycleReport, recover_activation, run_cycle
from .distributed import SINGLE, DataParallel
from .gate import VersionScores
from .policies import ctc_vocabulary
from .state import TrainerState
from .update import UpdateAborted

log = logging.getLogger(__name__)


def should_start(pending: int, waited_s: float, config: TrainerConfig) -> bool:
    """Whether a cycle starts now, with `pending` items waiting and `waited_s` since the last cycle."""
    return pending >= config.min_feedback or (pending >= 1 and waited_s >= config.max_wait_s)


@dataclass
class _Kept:
    """What the loop keeps between cycles (loaded at the first cycle)."""

    state: TrainerState | None = None
    base_data: BaseData | None = None


class TrainerLoop:
    def __init__(self, config: TrainerConfig, *, store: FeedbackStore | None = None,
                 registry: Registry | None = None):
        self.config = config
        self._own_store = store is None
        self.store = store if store is not None else FeedbackStore.open(config.resolved_store_url)
        self.registry = registry if registry is not None else Registry(config.resolved_registry_dir)
        self._kept = _Kept()
        self._anchor_scores = VersionScores()
        self._wake = threading.Event()
        self._stop = threading.Event()

    def notify(self) -> None:
        """Count pending feedback now instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """Ask `run` to return; a running cycle stops at its next update step, recording nothing."""
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        if self._own_store:
            self.store.close()

    def run_once(self, should_stop=lambda: False, data_parallel: DataParallel = SINGLE) -> CycleReport:
        """One cycle on what is pending now (returns an "idle" report when nothing is).

        Under torchrun every process calls this once (trainer/distributed.py); run_cycle orders them.
        """
        torch.set_num_threads(self.config.num_threads)
        self.config.trainer_dir.mkdir(parents=True, exist_ok=True)
        if data_parallel.is_main:
            recover_activation(self.store, self.registry, self.config.trainer_dir)
        kept = self._kept
        if kept.state is None or kept.state.version != self.registry.current_version():
            kept.state = TrainerState.load(self.config.trainer_dir, self.registry, self.config.ppo)
        # Data-parallel processes load the base data inside the cycle, in order (the main one may synthesize it).
        if not data_parallel.enabled and kept.base_data is None and self.store.pending_count() > 0:
            corpus = ensure_corpus(self.config.corpus_dir, self.config.trainer_dir, self.config.fallback_sentences)
            kept.base_data = BaseData(corpus, ctc_vocabulary(kept.state.policy), self.config.anchor_size,
                                      self.config.replay_pool_size)
        try:
            return run_cycle(self.store, self.registry, self.config, state=kept.state, base_data=kept.base_data,
                             anchor_scores=self._anchor_scores, should_stop=should_stop,
                             data_parallel=data_parallel)
        except BaseException:
            kept.state = None  # its weights may be mid-update: reload from the checkpoint next time
            raise

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Run cycles until `stop_event` is set or `stop()` is called."""
        stop_event = stop_event or self._stop
        torch.set_num_threads(self.config.num_threads)
        last_cycle = time.monotonic()

        def stopping() -> bool:
            return stop_event.is_set() or self._stop.is_set()

        log.info("trainer loop: min_feedback %d, max_wait %.0f s, objective %s", self.config.min_feedback,
                 self.config.max_wait_s, self.config.ppo.objective)
        while not stopping():
            self._wake.clear()
            try:
                pending = self.store.pending_count()
            except Exception:
                log.exception("trainer loop: cannot count pending feedback")
                pending = 0
            if should_start(pending, time.monotonic() - last_cycle, self.config):
                try:
                    report = self.run_once(should_stop=stopping)
                    log.info("trainer cycle: %s (%s)", report.outcome, report.version_out or report.version_in)
                    last_cycle = time.monotonic()
                    continue  # more may be pending already
                except UpdateAborted:
                    log.info("trainer loop: cycle aborted for shutdown; its feedback stays pending")
                    break
                except Exception:
                    log.exception("trainer cycle failed; its feedback stays pending; retrying in %.0f s",
                                  self.config.failure_backoff_s)
                    metrics.TRAINER_CYCLES.labels(CycleOutcome.FAILED).inc()
                    metrics.TRAINER_LAST_CYCLE_TIMESTAMP.set(time.time())
                    self._wake.wait(self.config.failure_backoff_s)
                    continue
            self._wake.wait(self.config.poll_interval_s)
        log.info("trainer loop stopped")


def start_background(config: TrainerConfig, stop_event: threading.Event) -> tuple[TrainerLoop, threading.Thread]:
    """Run a TrainerLoop in a daemon thread at lower priority (invariant 8: training never starves serving).

    The thread sets its own niceness (`config.nice`, Linux threads have their own) and torch's
    intra-op threads (`config.num_threads`, process-wide). Stop it with `loop.stop()` (or the event),
    then `thread.join()`.
    """
    loop = TrainerLoop(config)

    def target() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), config.nice)
        except (OSError, AttributeError) as e:  # not permitted, or not Linux: run at normal priority
            log.warning("trainer thread: cannot set nice %d (%s)", config.nice, e)
        try:
            loop.run(stop_event)
        finally:
            loop.close()

    thread = threading.Thread(target=target, name="voxloop-trainer", daemon=True)
    thread.start()
    return loop, thread


__all__ = ["TrainerConfig", "TrainerLoop", "should_start", "start_background"]
