"""A real Prometheus scrapes a real `voxloop serve`: the counters it stores move when audio is streamed.

`voxloop serve` runs as a subprocess (the CLI path operators use: the metrics endpoint, JSON logs,
signals), on 127.0.0.1 with the tiny test model. Debian's `prometheus` (scripts/setup.sh installs it)
scrapes it every second with the shipped alert rules loaded; the test streams audio, corrects a
result, then asks Prometheus's HTTP API. A missing prometheus binary fails the test.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import TINY_VERSION
from server_support import chunked, noise, pcm16
from support import free_port
from voxloop.clients.client import RecognizerClient, VoxloopError, recognition_config

pytestmark = pytest.mark.slow  # two real servers

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
CHUNK_100MS = 3200
STARTUP_TIMEOUT_S = 90.0
STREAMING = "/voxloop.v1.Recognizer/StreamingRecognize"


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("prometheus is not installed: run `bash scripts/setup.sh` (Debian package prometheus)")
    return path


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, promql: str) -> float | None:
        """The query's single value, None when it has no result."""
        result = self.get("/api/v1/query", query=promql)["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, check, timeout_s: float = 20.0) -> float | None:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.value(promql)
            if value is not None and check(value):
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"{promql} = {value} after {timeout_s:g} s")
            time.sleep(0.25)


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)


@pytest.fixture
def voxloop_serve(tiny_registry, tmp_path):
    """`voxloop serve` with JSON logs on a free gRPC port (read from its log) and a free metrics port."""
    metrics_port = free_port()
    env = {**os.environ, "VOXLOOP_LOG_FORMAT": "json", "VOXLOOP_TRAINER": "off", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "voxloop"), "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", str(metrics_port), "--data-dir", str(tmp_path / "data"),
               "--model-dir", str(tiny_registry)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stderr, lines), daemon=True).start()
    log: list[dict] = []
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        port = None
        while port is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"voxloop serve did not start in {STARTUP_TIMEOUT_S:g} s; log: {log}")
            entry = json.loads(line)  # every line is JSON with log_format = json
            log.append(entry)
            if entry["message"].startswith("voxloop listening on"):
                port = entry["port"]
        yield {"target": f"127.0.0.1:{port}", "metrics_port": metrics_port, "process": process, "lines": lines}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def prometheus(voxloop_serve, tmp_path):
    """Prometheus scraping the server every second, with the shipped alert rules loaded."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "voxloop-server",
                            "static_configs": [{"targets": [f"127.0.0.1:{voxloop_serve['metrics_port']}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [prometheus_binary(), f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not become ready: {process.stderr.read() if process.poll() else ''}")
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_prometheus_scrapes_the_server_and_sees_streams_feedback_and_errors(voxloop_serve, prometheus):
    prometheus.wait_for('up{job="voxloop-server"}', lambda v: v == 1)
    assert prometheus.value('voxloop_active_streams{job="voxloop-server"}') == 0
    assert prometheus.value(f'voxloop_model_info{{version="{TINY_VERSION}"}}') == 1

    with RecognizerClient(voxloop_serve["target"], timeout=30) as client:
        finals = []
        for seed in range(3):
            audio = chunked(pcm16(noise(1.5, seed=seed)), CHUNK_100MS)
            responses = client.streaming_recognize(audio, recognition_config(16000, interim_results=True))
            finals += [r for response in responses for r in response.results if r.is_final]
        assert len(finals) == 3 and all(f.model_version == TINY_VERSION for f in finals)
        client.submit_correction(finals[0].utterance_id, "what was said")
        client.accept_transcript(finals[1].utterance_id)
        with pytest.raises(VoxloopError) as bad:
            list(client.streaming_recognize([pcm16(noise(0.1))], recognition_config(1234)))
        assert bad.value.code == "INVALID_ARGUMENT"

    ok = f'voxloop_rpcs_total{{job="voxloop-server",method="{STREAMING}",code="OK"}}'
    prometheus.wait_for(ok, lambda v: v == 3)
    assert prometheus.value(f'voxloop_rpcs_total{{method="{STREAMING}",code="INVALID_ARGUMENT"}}') == 1
    assert prometheus.value('voxloop_rpcs_total{method="/voxloop.v1.Feedback/SubmitCorrection",code="OK"}') == 1
    assert prometheus.value('voxloop_feedback_received_total{kind="correction"}') == 1
    assert prometheus.value('voxloop_feedback_received_total{kind="acceptance"}') == 1
    assert prometheus.value("voxloop_audio_processed_seconds_total") == pytest.approx(4.5, abs=0.01)
    assert prometheus.value("voxloop_final_latency_seconds_count") == 3
    assert prometheus.value("voxloop_partial_lag_seconds_count") > 0
    assert prometheus.value("voxloop_inference_seconds_count") > 0
    assert 0 < prometheus.value("voxloop_real_time_factor") < 10
    assert prometheus.value("voxloop_store_writes_dropped_total") == 0
    p99 = prometheus.value("histogram_quantile(0.99, sum by (le) (voxloop_final_latency_seconds_bucket))")
    assert 0 < p99 <= 10

    # The shipped alert rules load and evaluate against the real series without errors, and none fires.
    deadline = time.monotonic() + 15
    while True:
        rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
        if all(r["health"] == "ok" for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert len(rules) >= 10 and {r["health"] for r in rules} == {"ok"}, [(r["name"], r.get("lastError")) for r in rules]
    assert prometheus.get("/api/v1/alerts")["alerts"] == []

    # SIGTERM: a graceful stop (exit 0) that logged its shutdown as JSON.
    process = voxloop_serve["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    messages = []
    while not voxloop_serve["lines"].empty():
        messages.append(json.loads(voxloop_serve["lines"].get())["message"])
    assert "stopped" in messages
