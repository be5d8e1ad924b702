"""`voxloop serve --workers N`: processes sharing one port, metrics per worker, one trainer, supervision."""

from __future__ import annotations

import errno
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY_VERSION
from support import free_port, wait_for
from voxloop.clients.client import RecognizerClient
from voxloop.server.config import ServerConfig
from voxloop.server.workers import reserve_port, worker_config

OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
WORKER_PID = re.compile(r"worker (\d) started \(pid (\d+)\)")
SUPERVISOR = """
import sys
import voxloop.server.workers as workers
workers.WORKER_MIN_UPTIME_S = float(sys.argv[1])  # the tests' crash-loop window, not 10 s
from voxloop.clients.cli import main
sys.exit(main(sys.argv[2:]))
"""


def free_port_pair() -> int:
    """A port p with p + 1 free too (worker 1's metrics).

    Free means bindable: a port held by an outgoing connection or in TIME_WAIT refuses connections yet cannot be
    bound, so probing by connecting is not enough.
    """
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except (OSError, OverflowError):
                continue
            return port
    raise AssertionError("no two consecutive free ports")


def metric_total(port: int, prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def refuses_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


class Supervised:
    """`voxloop serve --workers N` in a subprocess, its output in a log file."""

    def __init__(self, registry: Path, data_dir: Path, *, workers: int = 2, port: int | None = None,
                 metrics_port: int = 0, min_uptime_s: float = 10.0, trainer: bool = False):
        self.port = port or free_port()
        self.metrics_port = metrics_port
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        command = [sys.executable, "-c", SUPERVISOR, str(min_uptime_s), "serve", "--workers", str(workers),
                   "--port", str(self.port), "--metrics-port", str(metrics_port), "--model-dir", str(registry),
                   "--data-dir", str(data_dir)]
        if not trainer:
            command.append("--no-trainer")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> dict[int, int]:
        """index -> pid of the latest worker started in each slot."""
        return {int(i): int(pid) for i, pid in WORKER_PID.findall(self.log())}

    def wait_listening(self, workers: int, timeout_s: float = 120) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"the supervisor exited: {self.log()[-3000:]}"
            return self.log().count(f"listening on 127.0.0.1:{self.port}") >= workers

        wait_for(ready, timeout_s, f"{workers} workers to listen")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def test_worker_configs_share_the_port_and_take_consecutive_metrics_ports():
    config = ServerConfig(port=0, metrics_port=9400, workers=3)
    assert [(worker_config(config, i, 5000).port, worker_config(config, i, 5000).metrics_port)
            for i in range(3)] == [(5000, 9400), (5000, 9401), (5000, 9402)]
    assert worker_config(ServerConfig(metrics_port=0, workers=2), 1, 5000).metrics_port == 0
    # One process binds the web page's port: worker 0 serves the page, the others none.
    assert [worker_config(ServerConfig(web_port=8080, workers=3), i, 5000).web_port for i in range(3)] == [8080, 0, 0]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ServerConfig(workers=0)


def test_a_port_something_already_serves_is_refused_naming_the_fix():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="already accepts connections there.*--port"):
            reserve_port("127.0.0.1", taken.getsockname()[1])
    reserved = reserve_port("127.0.0.1", 0)  # port 0: one free port for every worker
    try:
        assert reserved.getsockname()[1] > 0
    finally:
        reserved.close()


@pytest.mark.slow
def test_workers_share_one_port_their_metrics_add_up_and_only_one_runs_the_trainer(tiny_registry, tmp_path):
    metrics_port = free_port_pair()
    server = Supervised(tiny_registry, tmp_path / "data", metrics_port=metrics_port, trainer=True)
    try:
        server.wait_listening(2)
        calls = 40
        for _ in range(calls):  # separate connections, as separate applications: the kernel spreads them
            with RecognizerClient(f"127.0.0.1:{server.port}", timeout=10, options=OWN_CONNECTION) as client:
                assert client.get_model_info().version == TINY_VERSION
        per_worker = [metric_total(metrics_port + i, 'voxloop_rpcs_total{code="OK",method="/voxloop.v1.Recognizer/'
                                                     'GetModelInfo"}') for i in range(2)]
        assert sum(per_worker) == calls and min(per_worker) > 0  # the documented scrape: sum over workers
        assert server.log().count("trainer loop: min_feedback") == 1  # the in-process trainer: worker 0 only
        # A second server cannot take the port, with or without workers of its own.
        for extra in ([], ["--workers", "2"]):
            second = subprocess.run([sys.executable, "-m", "voxloop.clients.cli", "serve", "--no-trainer", "--port",
                                     str(server.port), "--metrics-port", "0", "--model-dir", str(tiny_registry),
                                     "--data-dir", str(tmp_path / "second"), *extra],
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 1 and "cannot listen on 127.0.0.1" in second.stderr, second.stderr
    finally:
        status = server.stop()
    assert status == 0, server.log()[-3000:]
    assert "all workers stopped" in server.log() and refuses_connections(server.port)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(tiny_registry, tmp_path):
    server = Supervised(tiny_registry, tmp_path / "data", min_uptime_s=1.0)
    try:
        server.wait_listening(2)
        time.sleep(1.0)  # past the crash-loop window
        killed = server.worker_pids()[1]
        subprocess.run(["kill", "-9", str(killed)], check=True)
        wait_for(lambda: server.worker_pids()[1] != killed, 30, "a new worker 1")
        server.wait_listening(3)  # the replacement listens on the same port
        assert f"worker 1 (pid {killed}) exited with status -9" in server.log()
        for _ in range(10):
            with RecognizerClient(f"127.0.0.1:{server.port}", timeout=10, options=OWN_CONNECTION) as client:
                assert client.get_model_info().version == TINY_VERSION
    finally:
        assert server.stop() == 0, server.log()[-3000:]


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_supervisor_with_status_1(tiny_registry, tmp_path):
    metrics_port = free_port_pair()
    with socket.socket() as taken:  # worker 1's metrics port
        taken.bind(("127.0.0.1", metrics_port + 1))
        taken.listen()
        server = Supervised(tiny_registry, tmp_path / "data", metrics_port=metrics_port)
        try:
            assert server.process.wait(120) == 1
        finally:
            server.stop()
    log = server.log()
    assert "cannot serve metrics on 127.0.0.1" in log and "stopping every worker" in log
    assert refuses_connections(server.port)
