"""`voxloop serve --workers N`: N server processes sharing one gRPC port, under a small supervisor.

    exit_status = serve_workers(config, run_worker)     # run_worker(worker_config, index) runs one server

Why processes: one server is one asyncio event loop (gRPC, resampling, endpointing, decoding) beside
one onnxruntime thread, so it uses about one core; on a 2-core host at 100 streams that loop is the
bottleneck (docs/benchmarks.md). Why SO_REUSEPORT: every worker binds the same port with it and the
Linux kernel spreads new connections over their listening sockets (by a hash of the connection's
addresses), with no process or hop added to the data path. The usual alternative, a parent that
listens and hands the socket to forked children, is not open to us: gRPC Python cannot serve on a
listening socket it did not create. Balance is per connection: a client (or a proxy) multiplexing many
streams over one connection keeps them on one worker; behind a proxy, run a server per port instead.

The supervisor (this process, which serves nothing itself):
- reserves the port: it refuses to start when something already accepts connections on it (even a
  server sharing the port the same way), then holds a bound, non-listening SO_REUSEPORT socket, so
  no server without SO_REUSEPORT can take the port while a worker restarts; port 0 picks one free
  port for all workers;
- starts worker i (a fresh interpreter, multiprocessing's spawn) with metrics on metrics_port + i
  (each worker's Prometheus endpoint is its own: scrape them all, see docs/operations.md) and
  calls `run_worker(config, i)` there; the CLI gives worker 0, and only it, the in-process trainer (and
  worker_config gives it, and only it, the web page);
- replaces a worker that exits, unless it exits within WORKER_MIN_UPTIME_S of its start (a crash
  loop: bad config, a taken metrics port): then it stops the others and returns 1;
- on SIGTERM or SIGINT sends SIGTERM to every worker (each drains as a single server does: NOT_SERVING,
  stops listening, lets its streams finish) and waits up to shutdown_grace_s + WORKER_EXIT_MARGIN_S
  before it SIGKILLs what is left.
Workers get SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so none is left holding the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import ServerConfig

log = logging.getLogger(__name__)

WORKER_MIN_UPTIME_S = 10.0
"""A worker that exits sooner than this after its start is not replaced: the supervisor stops."""
WORKER_EXIT_MARGIN_S = 20.0
"""After shutdown_grace_s: time a worker has to write its utterance queue and close the store."""
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

WorkerMain = Callable[[ServerConfig, int], None]
"""Runs one server process until SIGTERM: (its config, its index 0..N-1). Must be picklable (module level)."""


def worker_config(config: ServerConfig, index: int, port: int) -> ServerConfig:
    """Worker `index`'s config: the shared port, metrics on metrics_port + index (0 stays off), and the web
    page in worker 0 only (one process binds web_port; the page's recognitions run there)."""
    metrics_port = config.metrics_port + index if config.metrics_port else 0
    web_port = config.web_port if index == 0 else 0
    return dataclasses.replace(config, port=port, metrics_port=metrics_port, web_port=web_port)


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host.strip("[]"))


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket on (host, port) that keeps the port for the workers.

    Raises OSError naming the fix when something accepts connections there or holds the port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host.strip('[]')}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    if port:
        with socket.socket(family) as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((_probe_host(host), port)) == 0:
                raise OSError(f"cannot listen on {where}: a server already accepts connections there; stop it, or "
                              "pick another port with --port (0 picks a free one)")
    reserved = socket.socket(family)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind((host.strip("[]"), port))
    except OSError as e:
        reserved.close()
        raise OSError(f"cannot listen on {where} ({e.strerror or e}); pick another port with --port "
                      "(0 picks a free one) or --host") from None
    return reserved


def _worker_entry(run_worker: WorkerMain, config: ServerConfig, index: int, supervisor_pid: int) -> None:
    """The worker process's main: die with the supervisor, then run the server."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor_pid:  # the supervisor died before prctl took effect (it may be PID 1 itself)
        return
    run_worker(config, index)


@dataclass
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    started: float


class _Supervisor:
    def __init__(self, config: ServerConfig, run_worker: WorkerMain, port: int):
        self.config = config
        self.run_worker = run_worker
        self.port = port
        self._context = multiprocessing.get_context("spawn")
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self.stopping = False

    def request_stop(self, *_: object) -> None:
        """Signal handler: wake the supervisor loop (a byte on its pipe, no polling)."""
        self.stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")

    def start_worker(self, index: int) -> _Worker:
        process = self._context.Process(target=_worker_entry, name=f"voxloop-worker-{index}",
                                        args=(self.run_worker, worker_config(self.config, index, self.port), index,
                                              os.getpid()))
        process.start()
        log.info("worker %d started (pid %d)", index, process.pid)
        return _Worker(index, process, time.monotonic())

    def run(self) -> int:
        workers = [self.start_worker(i) for i in range(self.config.workers)]
        status = 0
        while not self.stopping:
            sentinels = {w.process.sentinel: w for w in workers}
            ready = multiprocessing.connection.wait([*sentinels, self._wake_read])
            for sentinel in ready:
                if sentinel == self._wake_read or self.stopping:
                    continue
                worker = sentinels[sentinel]
                worker.process.join()
                uptime = time.monotonic() - worker.started
                if uptime < WORKER_MIN_UPTIME_S:
                    log.error("worker %d (pid %d) exited with status %s %.1f s after it started: stopping every "
                              "worker (its log above says why)", worker.index, worker.process.pid,
                              worker.process.exitcode, uptime)
                    status = 1
                    self.stopping = True
                    break
                log.warning("worker %d (pid %d) exited with status %s after %.0f s; starting a new one",
                            worker.index, worker.process.pid, worker.process.exitcode, uptime)
                workers[workers.index(worker)] = self.start_worker(worker.index)
        self._stop(workers)
        os.close(self._wake_read)
        os.close(self._wake_write)
        return status

    def _stop(self, workers: list[_Worker]) -> None:
        alive = [w for w in workers if w.process.is_alive()]
        log.info("stopping %d workers (each drains its streams for up to %g s)", len(alive),
                 self.config.shutdown_grace_s)
        for worker in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace_s + WORKER_EXIT_MARGIN_S
        for worker in alive:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker %d (pid %d) did not stop in time: killing it", worker.index, worker.process.pid)
                worker.process.kill()
                worker.process.join()


def serve_workers(config: ServerConfig, run_worker: WorkerMain) -> int:
    """Run config.workers server processes on config.port until SIGTERM/SIGINT; returns the exit status.

    Raises OSError (naming the fix) when the port is taken, ValueError when the worker count or the
    metrics ports do not fit.
    """
    if sys.platform != "linux":
        raise ValueError("workers > 1 needs Linux (SO_REUSEPORT spreads connections over the workers there); "
                         "run one server per port and a proxy in front instead")
    if config.metrics_port and config.metrics_port + config.workers - 1 > 65535:
        raise ValueError(f"metrics ports {config.metrics_port}..{config.metrics_port + config.workers - 1} do not "
                         "fit: worker i serves metrics on metrics_port + i; lower metrics_port")
    reserved = reserve_port(config.host, config.port)
    port = reserved.getsockname()[1]
    supervisor = _Supervisor(config, run_worker, port)
    previous = {signum: signal.signal(signum, supervisor.request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("supervising %d workers on %s:%d (metrics on %s)", config.workers, config.host, port,
                 f"ports {config.metrics_port}..{config.metrics_port + config.workers - 1}"
                 if config.metrics_port else "no port")
        status = supervisor.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        reserved.close()
    log.info("all workers stopped")
    return status


__all__ = ["WORKER_MIN_UPTIME_S", "WorkerMain", "reserve_port", "serve_workers", "worker_config"]
