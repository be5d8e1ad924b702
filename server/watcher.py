"""The registry watcher: notices a new target version, loads and warms it off the serving path, swaps.

Every `model_watch_interval_s` (or at once when poked by an admin call) the watcher asks the registry
which version every replica should serve (`Registry.target_version()`: the pin, else CURRENT, else
the newest good one of the history). When that differs from the serving version it loads the new
one in a worker thread: sha256 of every file against the card, an onnxruntime session, a warm-up on
the probe utterance (warmup.py). Only then does it swap the holder's current reference. A version
that fails any step is refused: the old model keeps serving, the refusal is logged, counted
(voxloop_model_swaps_refused_total{reason}) and written to the registry (`refused/<version>.json`),
so that no replica serves it and no watcher retries it in a loop.

Polling rather than inotify: the registry may be a shared volume (NFS, a mounted bucket) where
inotify sees nothing, and reading a one-line file once a second costs nothing; admin calls poke the
watcher, so an activation through this replica takes effect at once.

The admin operations (activate, rollback, pin, unpin) run here too, under the same lock as the
watch loop, so a poll never races an admin call into loading twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from ..core import metrics
from ..core.registry import ROLLED_BACK, ReadFailed, Refusal, Registry, RegistryError, VerificationError, this_process
from ..core.warmup import WarmupFailed
from .batcher import ServingModel
from .model_holder import ModelHolder

log = logging.getLogger(__name__)

Loader = Callable[[str], ServingModel]
"""Verifies, loads and warms up a version (blocking; run in a worker thread); raises on any failure."""

READ_RETRY_S = 30.0
"""After a read error (ReadFailed: EIO on a shared volume), how long the watcher waits before trying that
version again; a read error is never recorded as a refusal."""
STARTUP_READ_ATTEMPTS = 3
"""At startup, how often a version whose files fail to read is tried (READ_RETRY_WAIT_S apart) before the
next good one is served instead."""
READ_RETRY_WAIT_S = 1.0
MAX_VERSIONS_IN_MESSAGE = 5


class UnknownVersion(LookupError):
    """No such version in the registry (-> NOT_FOUND)."""


class NotPossible(Exception):
    """The registry's state does not allow the operation: pinned, refused, nothing to roll back, or the
    version failed to load (-> FAILED_PRECONDITION)."""


def refusal_reason(error: BaseException) -> str:
    """The metric label of a failed load: missing_file, sha256, card, io (a read error: never a refusal),
    warmup, probe_mismatch, or load (onnxruntime cannot load the graph, or it breaks the model contract)."""
    return error.reason if isinstance(error, VerificationError | WarmupFailed) else "load"


def publish_metrics(model: ServingModel) -> None:
    metrics.MODEL_INFO.info({"version": model.version, "parent_version": str(model.card.get("parent_version") or "")})


def _load_retrying_reads(load: Loader, version: str) -> ServingModel:
    """load(version), trying again after a read error (STARTUP_READ_ATTEMPTS in all); raises the last error."""
    for attempt in range(1, STARTUP_READ_ATTEMPTS + 1):
        try:
            return load(version)
        except ReadFailed as e:
            if attempt == STARTUP_READ_ATTEMPTS:
                raise
            log.warning("reading version %s failed (%s); trying again in %g s", version, e, READ_RETRY_WAIT_S)
            time.sleep(READ_RETRY_WAIT_S)
    raise AssertionError("unreachable")


def load_initial(registry: Registry, load: Loader) -> ServingModel:
    """At startup: the target version, or (refusing each that fails) the next good one; raises if none loads.

    A version whose files cannot be read (ReadFailed) is skipped for this start but not refused. When
    nothing else loads, every refused version (but a rolled-back one) is tried once more, newest first,
    and the first that loads is served with its refusal cleared: a refusal is a verdict of an earlier
    start, and its cause (a transient fault, a file since restored) may be gone.
    """
    unreadable: dict[str, str] = {}  # this start only
    failed: dict[str, str] = {}
    while True:
        version = registry.target_version(exclude=unreadable)
        if version is None:
            break
        fingerprint = registry.fingerprint(version)
        try:
            model = _load_retrying_reads(load, version)
        except Exception as e:
            pin = registry.pinned()
            if pin is not None and pin.version == version:  # a pin is the admin's word: do not fall back
                raise
            if isinstance(e, ReadFailed):
                unreadable[version] = str(e)
                log.error("version %s cannot be read now (%s); serving another version", version, e)
                continue
            failed[version] = f"{refusal_reason(e)}: {e}"
            metrics.MODEL_SWAPS_REFUSED.labels(refusal_reason(e)).inc()
            registry.refuse(version, refusal_reason(e), str(e), fingerprint=fingerprint)
            continue
        _clear_lapsed_refusal(registry, version)
        publish_metrics(model)
        return model
    model = _retry_refused(registry, load, tried=set(failed) | set(unreadable))
    if model is not None:
        publish_metrics(model)
        return model
    refusals = {v: f"{r.reason}: {r.detail}" for v, r in registry.refusals().items()}
    problems = {**refusals, **failed, **{v: f"io: {e}" for v, e in unreadable.items()}}
    listed = "; ".join(f"{v} ({why[:200]})" for v, why in list(problems.items())[:MAX_VERSIONS_IN_MESSAGE])
    more = f" and {len(problems) - MAX_VERSIONS_IN_MESSAGE} more" if len(problems) > MAX_VERSIONS_IN_MESSAGE else ""
    raise RegistryError(
        f"no servable version in {registry.root}: "
        + (f"none loads: {listed}{more}. " if problems else "CURRENT is unset and the history names no version. ")
        + "Restore or republish the version's files (a refused version is tried again when its files change, "
          "and at every start when nothing else loads) or publish a new one; `voxloop models check --registry "
          f"{registry.root}` shows the registry's state")


def _clear_lapsed_refusal(registry: Registry, version: str) -> None:
    """`version` just loaded: a refusal record left for it has lapsed (its files changed since); remove it."""
    try:
        if registry.refusal(version) is not None:
            registry.clear_refusal(version)
    except (RegistryError, OSError) as e:  # a read-only registry: the lapsed record stays, harmlessly
        log.warning("could not clear the lapsed refusal of %s: %s", version, e)


def _retry_refused(registry: Registry, load: Loader, tried: set[str]) -> ServingModel | None:
    """Nothing servable: try each refused version not tried in this start (rollbacks excepted), newest first."""
    refused = registry.refusals()
    candidates = [v for v in reversed(registry.versions())
                  if v in refused and v not in tried and refused[v].reason != ROLLED_BACK]
    for version in candidates:
        try:
            model = _load_retrying_reads(load, version)
        except Exception as e:
            log.error("refused version %s still fails (%s: %s)", version, refusal_reason(e), e)
            continue
        registry.clear_refusal(version)
        log.warning("version %s, refused by an earlier start (%s), loads now: serving it and clearing the refusal",
                    version, refused[version].reason)
        return model
    return None


class ModelWatcher:
    """Keeps the holder's current model on the registry's target version; runs the admin operations."""

    def __init__(self, registry: Registry, holder: ModelHolder, load: Loader, *, interval_s: float):
        self.registry = registry
        self.holder = holder
        self.interval_s = interval_s
        self._load = load
        self._lock = asyncio.Lock()
        self._poked = asyncio.Event()
        # version -> (reason, fingerprint of its files then); kept even if the registry is read-only. A
        # version whose fingerprint changed since is tried again, as its registry refusal lapses.
        self._refused_here: dict[str, tuple[str, str]] = {}
        self._unreadable_until: dict[str, float] = {}  # version -> monotonic time to try it again (ReadFailed)
        self._registry_problem: str | None = None  # the last registry read error logged (logged once)
        self._task: asyncio.Task | None = None
        self.swaps = 0
        self.refusals = 0

    # --- the watch loop ---

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registry-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def poke(self) -> None:
        """Check the registry now rather than at the next interval."""
        self._poked.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except (RegistryError, OSError) as e:  # an unreadable CURRENT or PIN, an NFS hiccup: keep serving
                self._report_registry_problem(e)
            except Exception:  # a bug: its traceback
                log.exception("checking the registry %s failed; retrying in %g s", self.registry.root,
                              self.interval_s)
            else:
                self._report_registry_problem(None)
            self._poked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self.interval_s)

    def _report_registry_problem(self, error: BaseException | None) -> None:
        """One log line when reading the registry starts failing (or fails differently), one when it recovers:
        not a traceback every watch interval."""
        message = None if error is None else f"{type(error).__name__}: {error}"
        if message == self._registry_problem:
            return
        if message is None:
            log.info("the registry %s reads again", self.registry.root)
        else:
            log.warning("cannot read the registry %s (%s); still serving %s, looking again every %g s",
                        self.registry.root, message, self.holder.current.version, self.interval_s)
        self._registry_problem = message

    def _may_try(self, version: str) -> bool:
        """Not refused here (or refused, but its files changed since), and no recent read error."""
        if time.monotonic() < self._unreadable_until.get(version, 0.0):
            return False
        refused = self._refused_here.get(version)
        return refused is None or refused[1] != self.registry.fingerprint(version)

    async def check(self) -> str:
        """Move to the registry's target version if it is new and loadable; returns the serving version."""
        async with self._lock:
            target = await asyncio.to_thread(self.registry.target_version)
            if (target is not None and target != self.holder.current.version
                    and await asyncio.to_thread(self._may_try, target)):
                with contextlib.suppress(NotPossible):  # refused and logged; the old model keeps serving
                    await self._switch(target)
            return self.holder.current.version

    async def _switch(self, version: str) -> ServingModel:
        """Load, warm and swap to `version`; on failure refuse it (or, for a read error, retry later) and
        raise NotPossible."""
        began = time.perf_counter()
        fingerprint = await asyncio.to_thread(self.registry.fingerprint, version)
        try:
            model = await asyncio.to_thread(self._load, version)
        except ReadFailed as e:
            self._unreadable_until[version] = time.monotonic() + READ_RETRY_S
            log.error("cannot read model %s (%s); not refused, trying again in %g s; still serving %s", version, e,
                      READ_RETRY_S, self.holder.current.version)
            raise NotPossible(f"version {version} could not be read ({e}); it is not refused: try again") from e
        except Exception as e:
            reason = refusal_reason(e)
            self.refusals += 1
            self._refused_here[version] = (reason, fingerprint)
            metrics.MODEL_SWAPS_REFUSED.labels(reason).inc()
            log.error("refused model %s (%s): %s; still serving %s", version, reason, e, self.holder.current.version)
            try:
                await asyncio.to_thread(self.registry.refuse, version, reason, str(e), fingerprint=fingerprint)
            except OSError:
                log.exception("could not record the refusal of %s in the registry", version)
            raise NotPossible(f"version {version} was refused ({reason}): {e}") from e
        self._unreadable_until.pop(version, None)
        self._refused_here.pop(version, None)
        await asyncio.to_thread(_clear_lapsed_refusal, self.registry, version)
        model.start()
        old = self.holder.swap(model)
        self.swaps += 1
        metrics.MODEL_SWAPS.inc()
        metrics.LAST_SWAP_TIMESTAMP.set(time.time())
        publish_metrics(model)
        log.info("now serving %s (was %s; load and warm-up took %.2f s)", version, old.version,
                 time.perf_counter() - began)
        return model

    # --- admin operations (ModelAdmin) ---

    def _check_published(self, version: str) -> None:
        if version not in self.registry.versions():
            raise UnknownVersion(f"no version {version!r} in the registry; `voxloop models list` shows them")

    def _standing_refusal(self, version: str) -> Refusal | None:
        refusal = self.registry.refusal(version)
        return refusal if refusal is not None and self.registry.stands(refusal) else None

    def _check_not_pinned(self, operation: str) -> None:
        pin = self.registry.pinned()
        if pin is not None:
            raise NotPossible(f"the registry is pinned to {pin.version} (by {pin.by}); unpin first "
                              f"(`voxloop models unpin`) to {operation}")

    async def _serve_now(self, version: str) -> None:
        """Make this replica serve `version` (loading it unless it already serves)."""
        if version != self.holder.current.version:
            await self._switch(version)

    async def activate(self, version: str, *, force: bool = False, by: str = "") -> tuple[str, str]:
        """Load and warm `version` here, then point CURRENT at it; returns (previous, serving) versions.

        Raises UnknownVersion, NotPossible (pinned; refused and not `force`; failed to load).
        """
        async with self._lock:
            await asyncio.to_thread(self._check_published, version)
            await asyncio.to_thread(self._check_not_pinned, f"activate {version}")
            refusal = await asyncio.to_thread(self._standing_refusal, version)
            if refusal is not None or not await asyncio.to_thread(self._may_try, version):
                if not force:
                    reason = refusal.reason if refusal is not None else self._refused_here[version][0]
                    raise NotPossible(f"version {version} was refused ({reason}); activate it with force to try "
                                      "again (`voxloop models activate --force`)")
                await asyncio.to_thread(self.registry.clear_refusal, version)
                self._refused_here.pop(version, None)
                self._unreadable_until.pop(version, None)
            previous = self.holder.current.version
            await self._serve_now(version)  # a broken version never reaches CURRENT
            await asyncio.to_thread(self.registry.activate, version, action="activate", by=by or this_process())
            return previous, self.holder.current.version

    async def rollback(self, *, by: str = "") -> tuple[str, str]:
        """Refuse the serving version (rolled_back) and go back to the previous one; returns (previous, serving)."""
        async with self._lock:
            await asyncio.to_thread(self._check_not_pinned, "roll back")
            serving = self.holder.current.version
            target = await asyncio.to_thread(self.registry.previous_version, serving)
            if target is None:
                raise NotPossible(f"nothing to roll back to: no other good version in the history before {serving}")
            await self._serve_now(target)
            who = by or this_process()
            await asyncio.to_thread(self.registry.refuse, serving, ROLLED_BACK, f"rolled back to {target}", by=who)
            await asyncio.to_thread(self.registry.activate, target, action="rollback", by=who)
            log.info("rolled back from %s to %s (%s)", serving, target, who)
            return serving, self.holder.current.version

    async def pin(self, version: str = "", *, by: str = "") -> tuple[str, str]:
        """Serve `version` (default: the serving one) everywhere and stop automatic activation."""
        async with self._lock:
            version = version or self.holder.current.version
            await asyncio.to_thread(self._check_published, version)
            refusal = await asyncio.to_thread(self._standing_refusal, version)
            if refusal is not None:
                raise NotPossible(f"version {version} was refused ({refusal.reason}); pin a good version")
            previous = self.holder.current.version
            await self._serve_now(version)
            await asyncio.to_thread(self.registry.pin, version, by=by or this_process())
            return previous, self.holder.current.version

    async def unpin(self) -> tuple[str, str]:
        """Resume automatic activation: serve the registry's target (CURRENT) again."""
        previous = self.holder.current.version
        await asyncio.to_thread(self.registry.unpin)
        serving = await self.check()
        return previous, serving


__all__ = ["Loader", "ModelWatcher", "NotPossible", "UnknownVersion", "load_initial", "refusal_reason"]
