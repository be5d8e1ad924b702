"""The scaled-out shape as processes: `voxloop serve` replicas and HAProxy running deploy/haproxy/haproxy.cfg.

    replicas = [Replica(f"replica{i}", registry, tmp / f"r{i}", store_url) for i in (1, 2)]
    proxy = Proxy(tmp / "proxy", [r.address for r in replicas])
    proxy.wait_state("replica1", "UP")

A replica keeps its port across restarts (the proxy's config names it); its log is appended to
`<data_dir>/server.log`. The proxy is the shipped config, unchanged: only the addresses come from
the environment, as in deploy/compose.yaml. A missing haproxy fails with the fix in the message.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


def health_status(address: str, timeout_s: float = 1.0) -> str | None:
    """The replica's overall gRPC health ("SERVING", "NOT_SERVING"), or None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                  timeout=timeout_s)
        except grpc.RpcError:
            return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class Replica:
    """One `voxloop serve` process (no in-process trainer) on a fixed loopback port."""

    def __init__(self, name: str, registry: Path, data_dir: Path, store_url: str, *,
                 env: dict[str, str] | None = None):
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir / "server.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._command = [sys.executable, "-m", "voxloop.clients.cli", "serve", "--no-trainer", "--host", "127.0.0.1",
                         "--port", str(self.port), "--metrics-port", "0", "--model-dir", str(registry),
                         "--data-dir", str(data_dir)]
        self._env = {**os.environ, "VOXLOOP_STORE_PATH": store_url, "VOXLOOP_MODEL_WATCH_INTERVAL_S": "0.25",
                     "VOXLOOP_ONNX_INTRA_OP_THREADS": "1", "VOXLOOP_SHUTDOWN_GRACE_S": "20",
                     **(env or {})}
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT, env=self._env)

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        def serving() -> bool:
            assert self.process.poll() is None, f"{self.name} exited: {self.log_tail()}"
            return health_status(self.address) == "SERVING"

        wait_for(serving, timeout_s, f"{self.name} to serve", interval_s=0.05)

    def terminate(self) -> int:
        """SIGTERM (graceful: drains) and wait; returns the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL: no drain, nothing flushed."""
        self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)

    def restart(self) -> None:
        if self.process.poll() is None:
            self.terminate()
        self.start()
        self.wait_serving()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate()
            if self.process.poll() is None:
                self.kill()


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).is_file()), None)
    if found is None:
        raise RuntimeError("haproxy is not installed: run `bash scripts/setup.sh` (Debian's haproxy package)")
    return found


class Proxy:
    """HAProxy with the shipped config in the foreground; `address` is where clients connect."""

    def __init__(self, work_dir: Path, replicas: list[str]):
        work_dir.mkdir(parents=True, exist_ok=True)
        if len(replicas) != 2:
            raise ValueError("deploy/haproxy/haproxy.cfg names two replicas")
        self.port, self.stats_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = work_dir / "haproxy.log"
        env = {**os.environ, "VOXLOOP_PROXY_BIND": self.address,
               "VOXLOOP_PROXY_STATS_BIND": f"127.0.0.1:{self.stats_port}",
               "VOXLOOP_REPLICA_1": replicas[0], "VOXLOOP_REPLICA_2": replicas[1]}
        binary = haproxy_binary()
        check = subprocess.run([binary, "-c", "-f", str(HAPROXY_CONFIG)], env=env, capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects {HAPROXY_CONFIG}: {check.stderr or check.stdout}")
        with self.log_path.open("ab") as log:
            # -db: foreground, no daemon; -W: master-worker, so SIGTERM stops everything.
            self.process = subprocess.Popen([binary, "-W", "-db", "-f", str(HAPROXY_CONFIG)], env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_for(lambda: self._stats() is not None, 30, "haproxy's stats page", interval_s=0.05)

    def _stats(self) -> list[dict[str, str]] | None:
        assert self.process.poll() is None, f"haproxy exited: {self.log_path.read_text(errors='replace')[-2000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        return list(csv.DictReader(io.StringIO(text.lstrip("# "))))

    def server_state(self, name: str) -> str:
        """UP, DOWN, ... of a server line of the backend, as HAProxy's checks see it."""
        rows = self._stats() or []
        return next(r["status"] for r in rows if r["pxname"] == "replicas" and r["svname"] == name)

    def wait_state(self, name: str, state: str, timeout_s: float = 30.0) -> None:
        wait_for(lambda: self.server_state(name).startswith(state), timeout_s, f"haproxy to see {name} {state}",
                 interval_s=0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
