"""The durability window of finals (issue 14, defect 7): a final is sent once its utterance is queued for
the store, not once it is committed. The window is measured (voxloop_store_write_lag_seconds), a
crash inside it loses the utterance (its correction is NOT_FOUND after the restart), a graceful stop
writes it, and README and docs/operations.md say so.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from server_support import chunked, noise, pcm16
from voxloop.clients.client import RecognizerClient, VoxloopError, recognition_config
from voxloop.core.store import FeedbackStore
from voxloop.server.app import BackgroundServer
from voxloop.server.config import ServerConfig

pytestmark = pytest.mark.slow  # real servers

REPO = Path(__file__).resolve().parent.parent
LAG_METRIC = "voxloop_store_write_lag_seconds"


def config_for(registry: Path, data_dir: Path, **fields) -> ServerConfig:
    return ServerConfig(port=0, metrics_port=0, data_dir=data_dir, model_dir=registry, shutdown_grace_s=5.0,
                        model_watch_interval_s=3600.0, **fields)


def final_id(target: str, seed: int) -> str:
    with RecognizerClient(target, timeout=30) as client:
        finals = [r for response in client.streaming_recognize(chunked(pcm16(noise(0.8, seed=seed)), 3200),
                                                                recognition_config(16000, interim_results=False))
                  for r in response.results if r.is_final]
    return finals[0].utterance_id


def stored(data_dir: Path, utterance_id: str) -> bool:
    with FeedbackStore.sqlite(data_dir / "feedback.sqlite3") as store:
        try:
            store.get_utterance(utterance_id, tenant="default", with_audio=False)
        except LookupError:
            return False
    return True


def test_the_store_write_lag_metric_measures_each_finals_window(tiny_registry, tmp_path):
    before = REGISTRY.get_sample_value(f"{LAG_METRIC}_count") or 0.0
    with BackgroundServer(config_for(tiny_registry, tmp_path / "data")) as running:
        utterance_id = final_id(running.target, seed=1)
        assert running.server.writer.wait_written(utterance_id, 10.0)
    assert REGISTRY.get_sample_value(f"{LAG_METRIC}_count") == before + 1
    assert REGISTRY.get_sample_value(f"{LAG_METRIC}_bucket", {"le": "10.0"}) >= before + 1  # committed within 10 s
    assert stored(tmp_path / "data", utterance_id)


# A server whose store commits only after 60 s: every final it sends is inside the window.
SLOW_STORE_SERVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from voxloop.server.app import BackgroundServer
    from voxloop.server.config import ServerConfig
    from voxloop.core.store import FeedbackStore

    original = FeedbackStore.add_utterances
    def slow(self, records):
        time.sleep(60)
        return original(self, records)
    FeedbackStore.add_utterances = slow
    config = ServerConfig(port=0, metrics_port=0, data_dir=Path(sys.argv[2]), model_dir=Path(sys.argv[1]),
                          model_watch_interval_s=3600.0)
    running = BackgroundServer(config)
    print(running.target, flush=True)
    sys.stdin.read()
""")


def test_a_crash_inside_the_window_loses_the_utterance_and_a_graceful_stop_does_not(tiny_registry, tmp_path):
    data_dir = tmp_path / "data"
    child = subprocess.Popen([sys.executable, "-c", SLOW_STORE_SERVER, str(tiny_registry), str(data_dir)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        target = child.stdout.readline().strip()
        assert target, "the server did not start"
        lost = final_id(target, seed=2)  # the final arrived; its row waits for the slow commit
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not stored(data_dir, lost)
    with BackgroundServer(config_for(tiny_registry, data_dir, store_flush_wait_s=0.5)) as running:
        with RecognizerClient(running.target, timeout=10) as client, pytest.raises(VoxloopError) as raised:
            client.submit_correction(lost, "what was said")
        assert raised.value.code == "NOT_FOUND"
        kept = final_id(running.target, seed=3)
    assert stored(data_dir, kept)  # a graceful stop (SIGTERM, or stop()) writes every queued utterance


def test_the_docs_state_the_durability_window_of_finals():
    for doc in (REPO / "README.md", REPO / "docs" / "operations.md"):
        text = doc.read_text()
        assert LAG_METRIC in text, doc
        assert "SIGKILL" in text and "NOT_FOUND" in text, doc
    assert "Every final utterance is kept" not in (REPO / "README.md").read_text()
