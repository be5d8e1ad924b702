"""The serving model of a running server: one atomic current reference, and leases per utterance.

An utterance acquires the current model when it begins and releases it when it ends (or its stream
closes); `swap` replaces the current reference in one assignment on the event loop, so new
utterances get the new model at once while the open ones finish on theirs (invariant 2). A
swapped-out model is retired: its batcher (onnxruntime executor and session) is closed when its
last lease is released, so memory does not grow across swaps.

Everything here runs on the server's event loop: no locks, and no await between reading the current
reference and counting the lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .batcher import ServingModel

log = logging.getLogger(__name__)


class ModelHolder:
    """Which model new utterances get, and which retired ones still decode open utterances."""

    def __init__(self, model: ServingModel, open_recognitions: Callable[[], int] = lambda: 1):
        self._current = model
        self._open_recognitions = open_recognitions
        self._leases: dict[int, int] = {}  # id(ServingModel) -> utterances decoding with it
        self._retired: dict[int, ServingModel] = {}  # swapped out, still leased
        self._closing: set[asyncio.Task] = set()
        self._swap_listeners: list[Callable[[ServingModel], None]] = []

    @property
    def current(self) -> ServingModel:
        """The model a new utterance gets (GetModelInfo reports it)."""
        return self._current

    @property
    def retired(self) -> list[ServingModel]:
        """Swapped-out models that open utterances still decode with."""
        return list(self._retired.values())

    def leases(self, model: ServingModel) -> int:
        return self._leases.get(id(model), 0)

    def acquire(self) -> ServingModel:
        """The current model, held for one utterance: call release(model) when the utterance ends."""
        model = self._current
        self._leases[id(model)] = self._leases.get(id(model), 0) + 1
        return model

    def release(self, model: ServingModel) -> None:
        remaining = self._leases.get(id(model), 0) - 1
        if remaining > 0:
            self._leases[id(model)] = remaining
            return
        self._leases.pop(id(model), None)
        if id(model) in self._retired:
            self._close(model)

    def on_swap(self, listener: Callable[[ServingModel], None]) -> None:
        """Call `listener(new_model)` on the event loop after each swap (the web page's "now serving" notice)."""
        self._swap_listeners.append(listener)

    def swap(self, model: ServingModel) -> ServingModel:
        """Make `model` (its batcher started) the current one; returns the model it replaced (retired)."""
        old, self._current = self._current, model
        if old is model:
            return old
        for listener in self._swap_listeners:
            try:
                listener(model)
            except Exception:  # a listener's bug must not undo or stall the swap
                log.exception("model swap listener failed")
        self._retired[id(old)] = old
        if self.leases(old) == 0:
            self._close(old)
        else:
            log.info("model %s retired; %d open utterances finish on it", old.version, self.leases(old))
        return old

    def open_streams(self, version: str) -> int:
        """Streams that may soon send a chunk to `version`'s batcher (how long a batch waits for more)."""
        on_retired = sum(self.leases(m) for m in self._retired.values() if m.version != version)
        if version == self._current.version:
            return max(1, self._open_recognitions() - on_retired)
        return max(1, sum(self.leases(m) for m in self._retired.values() if m.version == version))

    def _close(self, model: ServingModel) -> None:
        del self._retired[id(model)]
        task = asyncio.get_running_loop().create_task(model.close(), name=f"close-{model.version}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        log.info("model %s released (its last utterance ended)", model.version)

    async def settle(self) -> None:
        """Wait until every released model's batcher has closed (tests, shutdown)."""
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def close(self) -> None:
        """Server stop: close every batcher, current and retired (their streams were drained or cancelled)."""
        for model in [self._current, *self._retired.values()]:
            await model.close()
        self._retired.clear()
        await self.settle()


__all__ = ["ModelHolder"]
