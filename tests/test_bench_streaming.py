"""bench/streaming.py: its audio, its measurements, its bounds."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCH_PATH = Path(__file__).resolve().parent.parent / "bench" / "streaming.py"


def test_synthetic_audio_has_the_duration_asked_and_speech_and_pauses(bench):
    audio = bench.speech_like_audio(6.0, 16000, seed=1)  # (S,)
    frame_rms = np.sqrt((audio[: len(audio) // 160 * 160].reshape(-1, 160) ** 2).mean(axis=1))  # 10 ms frames

    assert audio.shape == (96000,) and audio.dtype == np.float32
    assert np.abs(audio).max() <= 1.0
    assert (frame_rms > 0.03).mean() > 0.3  # voiced a good part of the time
    assert (frame_rms < 0.005).mean() > 0.1  # and silent between words and phrases


def test_synthetic_audio_is_reproducible_from_its_seed(bench):
    assert np.array_equal(bench.speech_like_audio(1.0, seed=3), bench.speech_like_audio(1.0, seed=3))


def test_server_cpu_is_read_from_proc(bench):
    before = bench.process_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    assert bench.process_cpu_seconds(os.getpid()) - before >= 0.1


def test_server_cpu_counts_live_child_processes_too(bench):
    import subprocess

    busy = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', "
                                                     f"{busy!r}])"])
    try:
        deadline = time.monotonic() + 20
        while bench.process_cpu_seconds(parent.pid) < 0.4:  # the busy grandchild's seconds, while it lives
            assert time.monotonic() < deadline, "the child's CPU time was not counted"
            time.sleep(0.05)
    finally:
        for child in bench._children(parent.pid):
            os.kill(child, 9)
        parent.kill()
        parent.wait()


def test_load_goes_only_to_loopback(bench):
    with pytest.raises(ValueError, match="not a loopback address"):
        bench.BenchConfig(server="192.0.2.1:50051")
    assert bench.BenchConfig(server="localhost:50051").server == "localhost:50051"


def test_stream_count_and_duration_are_bounded(bench):
    with pytest.raises(ValueError, match="--streams must be 1..512"):
        bench.BenchConfig(streams=(1, 10_000))
    with pytest.raises(ValueError, match="--duration-s"):
        bench.BenchConfig(duration_s=3600)


def test_table_row_reports_percentiles_and_failures_by_status(bench):
    summary = bench.RunSummary(streams=16, partial_lag_ms=(101.4, 180.6), final_latency_ms=None,
                               server_cpu_per_audio_s=0.01234, client_cpu_per_audio_s=0.002, failed=2,
                               errors={"RESOURCE_EXHAUSTED": 2}, uncovered_chunks=0)
    assert bench.table_row(summary) == ("| 16 | 101 | 181 | n/a | n/a | n/a / n/a | 0.0123 | 0.0020 | "
                                          "2 (RESOURCE_EXHAUSTED: 2) |")
    assert bench.table_row(summary).count("|") == bench.TABLE_HEADER.count("|")


@pytest.mark.slow
def test_bench_against_a_real_server_reports_every_stream_count_without_failures(bench, tiny_registry, tmp_path,
                                                                                   capsys):
    from voxloop.server.app import BackgroundServer
    from voxloop.server.config import load_config

    config = load_config(None, {}, {"host": "127.0.0.1", "port": 0, "metrics_port": 0,
                                    "model_dir": tiny_registry, "data_dir": tmp_path / "data"})
    with BackgroundServer(config) as running:
        status = bench.main(["--server", running.target, "--server-pid", str(os.getpid()),
                             "--streams", "1,4", "--duration-s", "1.5"])
    out = capsys.readouterr().out

    table = out[out.index("For docs/benchmarks.md"):]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "streams" not in line]
    assert status == 0
    assert [int(r[0]) for r in rows] == [1, 4]
    for row in rows:
        lag_p50, lag_p95, final_p50, final_p95, endpoint_final, server_cpu, _, failed = (c.strip() for c in row[1:])
        assert 0 <= float(lag_p50) <= float(lag_p95) < 1500
        assert 0 <= float(final_p50) <= float(final_p95) < 1500
        if endpoint_final != "n/a / n/a":  # only streams whose audio paused have endpoint finals
            endpoint_p50, endpoint_p95 = (float(x) for x in endpoint_final.split(" / "))
            assert 0 <= endpoint_p50 <= endpoint_p95 < 1500
        assert float(server_cpu) > 0
        assert failed == "0"
    assert "never reported processed" not in out
