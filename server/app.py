"""The voxloop server: `create_server(config) -> (server, port)` and `serve(config)` until SIGTERM.

Built on grpc.aio rather than the thread-pool server: a streaming recognizer holds thousands of
long-lived bidirectional streams that mostly wait for the next 100 ms of audio. With grpc.aio each
open stream is a coroutine (a few KB), not a thread blocked in `next(request_iterator)`; the work per
chunk is batched across streams (`batcher.py`) and runs in one onnxruntime executor thread, so the
event loop only moves bytes, resamples and decodes a few frames per chunk.

Beside `voxloop.v1.Recognizer` it serves `voxloop.v1.Feedback` (corrections and acceptances into the
feedback store, which also receives every final utterance through a bounded queue and a writer
thread, `utterance_writer.py`), the standard `grpc.health.v1.Health` (SERVING once the model
is loaded; NOT_SERVING as soon as shutdown begins, so load balancers drain the replica) and server
reflection, `voxloop.v1.ModelAdmin` (model_admin.py), and with web_port the end-user page, whose
WebSocket bridge calls the same Recognizer and Feedback servicer objects (web.py). The registry
watcher (watcher.py) hot-swaps the model when the registry's target version changes; each utterance
holds the model it began with (model_holder.py). Shutdown: NOT_SERVING, close the listening socket
(new connections are refused, so every proxy routes around the replica), end the pages' microphone
recognitions as their Stop button would, let open recognitions finish for up to shutdown_grace_s,
close the pages' sockets, then cancel what is left, write every queued utterance, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from voxloop.v1 import feedback_pb2_grpc, model_admin_pb2_grpc
from voxloop.v1 import recognizer_pb2_grpc as pb_grpc

from ..core.lm_decoder import decoder_factory_from_card
from ..core.metrics import start_metrics_server
from ..core.model import OnnxModel
from ..core.registry import CARD_FILE, MODEL_FILE, Registry, RegistryError
from ..core.store import FeedbackStore
from ..core.warmup import warm_up
from ..core.whisper_decoder import WhisperSecondPass
from .auth import Authenticator, RateLimiter
from .batcher import Batcher, ServingModel
from .config import ServerConfig
from .feedback import FeedbackIntake
from .feedback_servicer import FEEDBACK_SERVICE_NAME, FeedbackServicer
from .finals import FinalsQueue
from .interceptors import RpcMetricsInterceptor
from .model_admin import MODEL_ADMIN_SERVICE_NAME, ModelAdminServicer
from .model_holder import ModelHolder
from .servicer import SERVICE_NAME, RecognizerServicer, StreamSlots
from .stream import FinishedUtterance
from .utterance_writer import UtteranceWriter
from .watcher import ModelWatcher, load_initial
from .web import WebBridge

log = logging.getLogger(__name__)

IMPORT_RECIPE_FILE = "import.json"
UNARY_DRAIN_S = 0.5
"""After the recognitions drained: how long in-flight short calls (health checks, model info) get;
open health Watch streams would otherwise hold the shutdown for the whole grace period."""
FEEDBACK_THREADS = 4
"""Threads that run feedback calls' store work (SQLite serializes the writes; reads run beside them)."""


def open_registry(config: ServerConfig) -> Registry:
    """The configured registry; an empty one is seeded with the shipped base model."""
    registry = Registry(config.registry_dir)
    if registry.current_version() is None:
        shipped = config.shipped_model_dir
        if (shipped / IMPORT_RECIPE_FILE).is_file() and not (shipped / CARD_FILE).is_file():
            raise RegistryError(
                f"the shipped model {shipped} is an import recipe, built by `voxloop serve` on first start or by "
                f"`voxloop models import {shipped.name}`; or seed the small CTC model: "
                f"VOXLOOP_SHIPPED_MODEL_DIR=models/base"
            )
        if not (shipped / CARD_FILE).is_file():
            raise RegistryError(
                f"no model to serve: the registry {registry.root} has no CURRENT version and there is no "
                f"shipped model at {shipped}; publish one (`voxloop export ...`) or point --model-dir at a registry"
            )
        version = registry.seed_from(shipped)
        log.info("seeded registry %s with the shipped model %s", registry.root, version)
    _report_registry_debris(registry)
    return registry


def _report_registry_debris(registry: Registry) -> None:
    """Name, once at startup, what in the registry is not a version (it blocks nothing, but should go)."""
    try:
        broken, leftovers = registry.broken_versions(), [item for item in registry.leftovers() if not item.live]
    except OSError as e:
        log.warning("cannot scan the registry %s for leftovers: %s", registry.root, e)
        return
    for name, why in broken.items():
        log.warning("registry %s: versions/%s is not a usable version (%s); it is skipped", registry.root, name, why)
    if leftovers:
        log.warning("registry %s holds %d leftovers of interrupted writes (%s); `voxloop models check --clean "
                    "--model-dir %s` removes them", registry.root, len(leftovers),
                    ", ".join(item.path.name for item in leftovers[:5]), registry.root)


def load_serving_model(registry: Registry, config: ServerConfig, open_streams: Callable[[], int],
                       version: str | None = None, *, warmup: bool = False) -> ServingModel:
    """Verify a version's files (default: CURRENT's) against its card and load it with a batcher (not started).

    With `warmup`, the probe utterance runs through it first (warmup.py); raises VerificationError,
    ModelFormatError or WarmupFailed. Blocking: the watcher calls it in a worker thread.
    """
    version = version or registry.current_version()
    card = registry.verify(version)
    model = OnnxModel(registry.version_dir(version) / MODEL_FILE, intra_op_threads=config.onnx_intra_op_threads)
    # The version's own lexicon + LM (card["decoder"]), loaded once and shared by its utterances' decoders.
    decoder_factory = decoder_factory_from_card(card, registry.version_dir(version), model.spec.vocabulary,
                                                model.spec.frame_shift_s)
    # One thread: a decoder step is ~250 small ops, and waking a second intra-op thread for each costs more
    # than it saves (measured: a final took 4x longer with two); the first pass's batches keep theirs.
    second_pass = WhisperSecondPass.from_card(card, registry.version_dir(version), intra_op_threads=1)
    if warmup:
        warm_up(model, card, registry.version_dir(version), second_pass)
    if second_pass is not None and config.second_pass_beam_size:  # the operator's choice, after the probe
        second_pass.settings = dataclasses.replace(second_pass.settings, beam_size=config.second_pass_beam_size)
    if model.spec.version != version:
        log.warning("registry version %s holds a graph exported as %s; results report %s",
                    version, model.spec.version, version)
    if model.spec.chunk_s > config.interim_interval_s + 1e-9:
        log.warning("the model decodes %.0f ms chunks: interim results come every chunk, not every %.0f ms",
                    model.spec.chunk_s * 1000, config.interim_interval_s * 1000)
    batcher = Batcher(model, max_batch_size=config.batch_max_size, max_wait_s=config.batch_max_wait_s,
                      open_streams=open_streams)
    finals = (FinalsQueue(second_pass, threads=config.second_pass_threads, max_batch=config.second_pass_max_batch,
                          version=version) if second_pass is not None else None)
    return ServingModel(version=version, model=model, card=card, batcher=batcher, decoder_factory=decoder_factory,
                        finals=finals)


def _listen_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"{host}:{port}"


class VoxloopServer:
    """A created (bound, not yet started) server. Use from the event loop it was created in."""

    def __init__(self, config: ServerConfig, grpc_server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                 watcher: ModelWatcher, slots: StreamSlots, sink_executor: ThreadPoolExecutor | None,
                 store: FeedbackStore, writer: UtteranceWriter | None, feedback_executor: ThreadPoolExecutor,
                 web: WebBridge):
        self.config = config
        self.web = web
        """The end-user page and its WebSocket bridge (web.py); serving once started with a web port."""
        self.watcher = watcher
        self.models = watcher.holder
        self.slots = slots
        self.store = store
        self.writer = writer
        self._server = grpc_server
        self._health = health_servicer
        self._sink_executor = sink_executor
        self._feedback_executor = feedback_executor
        self._retention: asyncio.Task | None = None
        self._stopped = False

    @property
    def model(self) -> ServingModel:
        """The model new utterances get (it changes when the watcher swaps)."""
        return self.models.current

    @property
    def utterances_dropped(self) -> int:
        """Finals whose utterance was not stored (writer queue full, or the insert failed)."""
        return self.writer.dropped if self.writer is not None else 0

    @property
    def active_streams(self) -> int:
        """Open recognitions (streams and Recognize calls)."""
        return self.slots.active

    async def start(self) -> None:
        self.model.start()
        await self._server.start()
        self.watcher.start()
        for service in ("", SERVICE_NAME, FEEDBACK_SERVICE_NAME, MODEL_ADMIN_SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._retention = asyncio.create_task(self._expire_audio_periodically(), name="audio-retention")
        if self.config.web_port:
            await self.start_web()
        log.info("serving model %s", self.model.version)

    async def start_web(self, port: int | None = None) -> int:
        """Serve the end-user page on `port` (default config.web_port; 0 picks a free one); returns the bound port."""
        return await self.web.start(self.config.host, self.config.web_port if port is None else port)

    @property
    def web_url(self) -> str | None:
        """The page's address once it is served, else None."""
        if self.web.port is None:
            return None
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "[::]") else self.config.host
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{_listen_address(host, self.web.port)}/"

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, stop listening, let open recognitions finish (up to grace_s).

        gRPC's own shutdown closes the listening socket at once and sends GOAWAY on open connections,
        while the calls already running go on: a proxy that only checks TCP sees the replica gone
        (connection refused) and sends new streams elsewhere, as one that watches the health service
        does after NOT_SERVING. Recognitions that slip in on an open connection before its GOAWAY get
        UNAVAILABLE, which clients retry.
        """
        if self._stopped:
            return
        self._stopped = True
        grace_s = self.config.shutdown_grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        self.slots.draining = True
        log.info("shutting down: stopped listening; %d open recognitions get up to %g s", self.slots.active,
                 grace_s)
        closing = asyncio.create_task(self._server.stop(grace_s), name="grpc-shutdown")
        await self.web.finish_recognitions()  # a page's microphone would stream on: end it as Stop does
        if not await self.slots.drain(grace_s):
            log.warning("shutdown grace over: cancelling %d open recognitions", self.slots.active)
        await self.web.stop()
        await self.watcher.stop()
        # The recognitions are done; other calls (open health Watch streams) get UNARY_DRAIN_S, then
        # are cancelled, rather than holding the shutdown for the whole grace period.
        await self._server.stop(UNARY_DRAIN_S)
        await closing
        await self.models.close()
        if self._sink_executor is not None:  # the last finals' utterances reach the sink before we return
            await asyncio.to_thread(self._sink_executor.shutdown, wait=True)
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        await asyncio.to_thread(self._close_store)
        log.info("stopped")

    async def _expire_audio_periodically(self) -> None:
        """Retention: delete audio older than audio_retention_s now, then every retention_interval_s."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self._feedback_executor, self.store.expire_audio,
                                           self.config.audio_retention_s)
            except Exception:  # a busy or unreachable store: try again next round
                log.exception("audio retention failed; retrying in %g s", self.config.retention_interval_s)
            await asyncio.sleep(self.config.retention_interval_s)

    def _close_store(self) -> None:
        # Every final sent was queued before it was sent: writing the queue out loses nothing acked.
        _close_feedback(self.writer, self._feedback_executor, self.store)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _close_feedback(writer: UtteranceWriter | None, executor: ThreadPoolExecutor, store: FeedbackStore) -> None:
    if writer is not None:
        writer.close()
    executor.shutdown(wait=True)
    store.close()


def _sink_runner(sink: Callable[[FinishedUtterance], None] | None, executor: ThreadPoolExecutor | None,
                 writer: UtteranceWriter | None):
    """The stream's hook for each final utterance, awaited before the final is sent.

    The store writer's part is a non-blocking enqueue (the hot path never waits for the database);
    an extra `sink` runs in its own thread and may block.
    """
    if sink is None and writer is None:
        return None

    async def run(utterance: FinishedUtterance) -> None:
        if writer is not None:
            writer.offer(utterance)
        if sink is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(executor, sink, utterance)
            except Exception:
                log.exception("utterance sink failed for utterance %s", utterance.utterance_id)

    return run


def create_server(
    config: ServerConfig, *, utterance_sink: Callable[[FinishedUtterance], None] | None = None,
    reuse_port: bool = False,
) -> tuple[VoxloopServer, int]:
    """Load the current model, build and bind the gRPC server; returns it (not started) and its port.

    Call it from the event loop that will run the server, then `await server.start()`; always
    `await server.stop()` (e.g. in `finally`). Every final utterance is queued for the feedback store
    (config.store_url) unless store_utterances is off; `utterance_sink`, when given, also gets each one
    (its audio, transcript and model version) before the client gets the final; it runs in a thread
    of its own, so it may block. `reuse_port` binds with SO_REUSEPORT, for the worker processes of
    `voxloop serve --workers N` (workers.py); otherwise a second server on a taken port fails.
    Raises RegistryError / ModelFormatError when there is no servable model, ValueError for a bad
    tokens file, OSError when the port cannot be bound.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True)
    authenticator = Authenticator.from_config(config)
    slots = StreamSlots(config.max_concurrent_streams)
    registry = open_registry(config)
    holder: ModelHolder | None = None

    def load(version: str) -> ServingModel:
        return load_serving_model(registry, config, lambda: holder.open_streams(version) if holder else 1,
                                  version, warmup=True)

    holder = ModelHolder(load_initial(registry, load), open_recognitions=lambda: slots.active)
    watcher = ModelWatcher(registry, holder, load, interval_s=config.model_watch_interval_s)
    store = FeedbackStore.open(config.store_url)
    writer = (UtteranceWriter(store.add_utterances, max_queued=config.utterance_queue_size,
                              batch_size=config.utterance_batch_size) if config.store_utterances else None)
    feedback_executor = ThreadPoolExecutor(FEEDBACK_THREADS, thread_name_prefix="feedback")
    try:
        return _create_grpc_server(config, utterance_sink, authenticator, slots, watcher, store, writer,
                                   feedback_executor, reuse_port)
    except BaseException:
        _close_feedback(writer, feedback_executor, store)
        raise


def _create_grpc_server(config: ServerConfig, utterance_sink: Callable[[FinishedUtterance], None] | None,
                        authenticator: Authenticator, slots: StreamSlots, watcher: ModelWatcher, store: FeedbackStore,
                        writer: UtteranceWriter | None, feedback_executor: ThreadPoolExecutor,
                        reuse_port: bool) -> tuple[VoxloopServer, int]:
    sink_executor = ThreadPoolExecutor(1, thread_name_prefix="utterance-sink") if utterance_sink else None
    on_utterance = _sink_runner(utterance_sink, sink_executor, writer)

    server = grpc.aio.server(interceptors=[RpcMetricsInterceptor()], options=[
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),  # unless asked, a second server on the same port must fail
    ])
    recognizer = RecognizerServicer(config, lambda: watcher.holder.current, slots, on_utterance, authenticator,
                                    leases=watcher.holder)
    pb_grpc.add_RecognizerServicer_to_server(recognizer, server)
    model_admin_pb2_grpc.add_ModelAdminServicer_to_server(ModelAdminServicer(watcher, authenticator), server)
    intake = FeedbackIntake(config, store, writer, RateLimiter(config.feedback_rate_per_s, config.feedback_burst))
    feedback = FeedbackServicer(intake, authenticator, feedback_executor)
    feedback_pb2_grpc.add_FeedbackServicer_to_server(feedback, server)
    # The page calls these same servicer objects in-process: one auth, one rate limiter, one set of slots.
    web = WebBridge(config, recognizer, feedback, watcher.holder, authenticator.allow_anonymous)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (SERVICE_NAME, FEEDBACK_SERVICE_NAME, MODEL_ADMIN_SERVICE_NAME, health_name, reflection.SERVICE_NAME), server)
    address = _listen_address(config.host, config.port)
    try:
        if config.tls:
            credentials = grpc.ssl_server_credentials(
                [(config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        port = 0
        log.debug("binding %s failed: %s", address, e)
    if port == 0:
        raise OSError(f"cannot listen on {address} (in use, or not an address of this machine); "
                      "pick another with --port (0 picks a free one) or --host")
    return VoxloopServer(config, server, health_servicer, watcher, slots, sink_executor, store, writer,
                         feedback_executor, web), port


async def _serve(config: ServerConfig, utterance_sink: Callable[[FinishedUtterance], None] | None,
                 reuse_port: bool, on_serving: Callable[[VoxloopServer], None] | None) -> None:
    server, port = create_server(config, utterance_sink=utterance_sink, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    metrics = None
    try:
        await server.start()
        freeze_startup_objects()
        # One metrics endpoint per process (the in-process trainer's metrics share it), so it belongs
        # here and not to VoxloopServer, of which tests and embedders may run several.
        metrics = start_metrics_server(config.metrics_port, config.host) if config.metrics_port else None
        log.info("voxloop listening on %s (model %s, registry %s)", _listen_address(config.host, port),
                 server.model.version, config.registry_dir, extra={"port": port})
        if server.web_url is not None:
            log.info("web page on %s", server.web_url)
        if on_serving is not None:
            await asyncio.to_thread(on_serving, server)  # e.g. open a browser: may block a moment
        await stop.wait()
    finally:
        await server.stop()
        if metrics is not None:  # stopped last: Prometheus scrapes on while the streams drain
            metrics.stop()


def freeze_startup_objects() -> None:
    """Exclude what exists after startup (imports, the loaded model: ~230,000 objects) from garbage collection.

    They live as long as the process; without this, every full collection, which steady allocation
    triggers every so often, walks them all on the event loop: 150-500 ms without a health check or
    a chunk answered (measured on 2 busy cores). With gc.freeze() a full collection sees only what
    was allocated since.
    """
    gc.collect()
    gc.freeze()


def serve(config: ServerConfig, *, utterance_sink: Callable[[FinishedUtterance], None] | None = None,
          reuse_port: bool = False, on_serving: Callable[[VoxloopServer], None] | None = None) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully (one process; workers.py runs several);
    `on_serving(server)` once it serves.

    Raises what create_server raises (RegistryError, ModelFormatError, OSError) before serving.
    """
    # Whatever torch work runs in the server's threads is small: intra-op threads would only fight the
    # onnxruntime thread for the cores (measured: 3x slower event-loop work under load with 2 threads).
    torch.set_num_threads(1)
    asyncio.run(_serve(config, utterance_sink, reuse_port, on_serving))


class BackgroundServer:
    """A server on its own event loop in a daemon thread: for tests, and for embedding beside other work.

        with BackgroundServer(config) as running:
            client = RecognizerClient(running.target)
    """

    def __init__(self, config: ServerConfig, *, utterance_sink: Callable[[FinishedUtterance], None] | None = None):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="voxloop-server", daemon=True)
        self._thread.start()
        try:
            self.server, self.port = self.call(self._start(config, utterance_sink))
        except BaseException:
            self._close_loop()
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _start(self, config, utterance_sink) -> tuple[VoxloopServer, int]:
        server, port = create_server(config, utterance_sink=utterance_sink)
        await server.start()
        return server, port

    def call(self, coroutine, timeout_s: float | None = None):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self, grace_s: float | None = None) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.stop(grace_s))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["BackgroundServer", "VoxloopServer", "create_server", "open_registry", "serve"]
