"""Two `voxloop serve` processes watching one registry directory converge, and neither serves a refused version."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_VERSION
from support import wait_for
from swap_support import publish_copy
from voxloop.clients.client import RecognizerClient
from voxloop.core.registry import MODEL_FILE, Registry

WATCH_INTERVAL_S = 0.25
START_TIMEOUT_S = 120.0
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def start_replica(registry: Path, data_dir: Path) -> tuple[subprocess.Popen, Path]:
    data_dir.mkdir(parents=True)
    log_path = data_dir / "server.log"
    env = {**os.environ, "VOXLOOP_MODEL_WATCH_INTERVAL_S": str(WATCH_INTERVAL_S),
           "VOXLOOP_ONNX_INTRA_OP_THREADS": "1"}
    command = [sys.executable, "-m", "voxloop.clients.cli", "serve", "--port", "0", "--metrics-port", "0",
               "--model-dir", str(registry), "--data-dir", str(data_dir)]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return process, log_path


def target_of(process: subprocess.Popen, log_path: Path) -> str:
    """The replica's address, from its "listening on" log line (it binds port 0)."""
    def port() -> str | None:
        assert process.poll() is None, f"the replica exited: {log_path.read_text(errors='replace')[-2000:]}"
        found = LISTENING.search(log_path.read_text(errors="replace"))
        return found.group(1) if found else None

    return f"127.0.0.1:{wait_for(port, timeout_s=START_TIMEOUT_S, interval_s=0.1, what='the replica to listen')}"


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_two_replicas_converge_on_a_new_version_and_neither_serves_a_refused_one(tiny_registry, tmp_path):
    replicas = [start_replica(tiny_registry, tmp_path / f"replica-{i}") for i in range(2)]
    try:
        targets = [target_of(process, log_path) for process, log_path in replicas]
        clients = [RecognizerClient(target, timeout=10) for target in targets]

        def serving() -> list[str]:
            return [client.get_model_info().version for client in clients]

        assert serving() == [TINY_VERSION, TINY_VERSION]
        publish_copy(tiny_registry, TINY_VERSION, "tiny-0002")
        published = time.monotonic()
        wait_for(lambda: serving() == ["tiny-0002", "tiny-0002"], timeout_s=30, interval_s=0.02,
                 what="both replicas to serve tiny-0002")
        # Within the watch interval, plus loading and warming a (tiny) model on a loaded 2-core machine.
        assert time.monotonic() - published < WATCH_INTERVAL_S + 5.0

        garbage = tmp_path / "garbage.onnx"
        garbage.write_bytes(b"not a graph" * 64)
        publish_copy(tiny_registry, TINY_VERSION, "tiny-0003-broken", replace={MODEL_FILE: garbage})
        registry = Registry(tiny_registry)
        wait_for(lambda: registry.refusal("tiny-0003-broken") is not None, timeout_s=30, what="the refusal")
        deadline = time.monotonic() + 4 * WATCH_INTERVAL_S
        while time.monotonic() < deadline:  # several watch rounds: still no replica serves it
            assert serving() == ["tiny-0002", "tiny-0002"]
            time.sleep(0.05)

        # A version one replica refuses is refused for both: mark the serving version bad by hand
        # (as a replica whose warm-up failed would) and both go back to the last good version.
        registry.refuse("tiny-0002", "warmup", "failed on another replica")
        wait_for(lambda: serving() == [TINY_VERSION, TINY_VERSION], timeout_s=30, interval_s=0.02,
                 what="both replicas to leave the refused version")
        for client in clients:
            client.close()
    finally:
        for process, _ in replicas:
            stop(process)
    for process, log_path in replicas:
        assert process.returncode == 0, log_path.read_text(errors="replace")[-2000:]
