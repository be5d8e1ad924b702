"""bench/feedback.py: its bounds, its report, and one tiny run against real servers."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH_PATH = Path(__file__).resolve().parent.parent / "bench" / "feedback.py"


def test_client_and_correction_counts_are_bounded(bench):
    with pytest.raises(ValueError, match="--clients must be 1..64"):
        bench.FeedbackBenchConfig(clients=1000)
    with pytest.raises(ValueError, match="--corrections must be"):
        bench.FeedbackBenchConfig(corrections=10**6)
    with pytest.raises(ValueError, match="--streams must be"):
        bench.FeedbackBenchConfig(streams=10_000)


def test_p95_change_is_relative_to_storage_off(bench):
    def run(p95):
        return bench.RunSummary(streams=64, partial_lag_ms=(100.0, p95), final_latency_ms=None,
                                server_cpu_per_audio_s=None, client_cpu_per_audio_s=0.0, failed=0, errors={},
                                uncovered_chunks=0)

    assert bench.p95_change(run(200.0), run(230.0)) == pytest.approx(0.15)
    assert bench.p95_change(run(200.0), run(190.0)) == pytest.approx(-0.05)


@pytest.mark.slow
def test_bench_reports_corrections_and_partial_lag_with_and_without_storage(bench, tiny_registry, capsys):
    status = bench.main(["--model-dir", str(tiny_registry), "--clients", "2", "--corrections", "3",
                         "--utterances", "2", "--streams", "2", "--duration-s", "1"])
    out = capsys.readouterr().out

    table = out[out.index("For docs/benchmarks.md"):]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith("| ") and "streams" not in line and "clients" not in line]
    assert status == 0
    assert "note:" not in out  # every acked correction is in the store once; every chunk was covered
    (clients, utterances, acked, per_s, p50, p99, failed), off, on = rows
    assert (clients, acked, failed) == ("2", "6", "0")
    assert int(utterances) >= 2 and float(per_s) > 0
    assert 0 < float(p50) <= float(p99) < 5000
    assert [off[0], on[0]] == ["off", "on"]
    for _, streams, lag_p50, lag_p95, *_, row_failed in (off, on):
        assert streams == "2" and row_failed == "0"
        assert 0 <= float(lag_p50) <= float(lag_p95) < 1500
    assert "partial-lag p95 change with storage on vs off:" in table
