"""bench/adaptation.py: arm names, and the report it prints for docs/benchmarks.md."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

BENCH_PATH = Path(__file__).resolve().parent.parent / "bench" / "adaptation.py"


def test_arms_name_an_objective_and_optionally_a_feedback_kind(bench):
    assert bench.Arm.parse("ppo+sft") == bench.Arm("correct", "ppo+sft")
    assert bench.Arm.parse("reject:ppo") == bench.Arm("reject", "ppo")
    assert bench.Arm.parse("choice:ppo").name == "choice:ppo"
    for bad in ("dpo", "shout:ppo", "choice:"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected OBJECTIVE or KIND:OBJECTIVE"):
            bench.Arm.parse(bad)


def test_report_gives_relative_domain_change_and_absolute_anchor_change(bench):
    def point(feedback, domain_wer, anchor_wer):
        return bench.Point(feedback, "v", bench.Scores(80, domain_wer, 0.5), bench.Scores(60, anchor_wer, None))

    result = bench.ArmResult("ppo+sft", [point(0, 0.60, 0.46), point(128, 0.30, 0.465)],
                             [{"outcome": "published", "trainer_s": 40.0, "process_s": 60.0, "peak_rss_mib": 1500.0},
                              {"outcome": "gated", "trainer_s": 20.0, "process_s": 40.0, "peak_rss_mib": 1600.0}],
                             server_peak_rss_mib=900.0)
    lines = bench.tables([result], (0, 128))

    assert "| ppo+sft | 60.0% / 50.0% / 46.0% | 30.0% / 50.0% / 46.5% |" in lines
    summary = next(line for line in lines if line.startswith("| ppo+sft | -50.0% relative"))
    assert "+0.5 points" in summary and "| 1/1 |" in summary and "| 30 / 50 |" in summary
    assert "1600 MiB" in summary and "900 MiB" in summary


def test_results_json_round_trips_for_merging_runs(bench, tmp_path):
    import dataclasses
    import json

    point = bench.Point(16, "v-c0001", bench.Scores(80, 0.4, 0.3), bench.Scores(60, 0.46, None))
    result = bench.ArmResult("reject:ppo", [point], [{"outcome": "published"}], 700.0, 3)
    path = tmp_path / "results.json"
    path.write_text(json.dumps([dataclasses.asdict(result)]))

    assert bench.load_results(path) == [result]


def test_voice_scenario_splits_the_held_out_voice_by_sentence_and_anchors_on_other_sentences(bench, tmp_path):
    import json

    for split, voice in (("test_heldout_flite", "flite:rms"), ("test", "espeak-ng:en")):
        with (tmp_path / f"{split}.jsonl").open("w") as f:
            for i in range(bench.VOICE_ANCHOR_FROM + 10):
                f.write(json.dumps({"id": f"{split}-{i}", "path": f"{split}/{i}.wav", "text": f"sentence {i}",
                                    "raw_text": f"Sentence {i}.", "voice": voice, "duration_s": 1.0,
                                    "split": split}) + "\n")
    scenario = bench.voice_scenario(tmp_path, feedback=6, test=4, anchor=5)
    texts = {name: {u.text for u in getattr(scenario, name)} for name in ("feedback", "test", "anchor")}
    assert [len(t) for t in texts.values()] == [6, 4, 5]
    assert not texts["feedback"] & texts["test"] and not (texts["feedback"] | texts["test"]) & texts["anchor"]
    assert {u.voice for u in scenario.feedback + scenario.test} == {"flite:rms"}
    assert scenario.target_words == frozenset()
    with pytest.raises(ValueError, match="too small"):
        bench.voice_scenario(tmp_path, feedback=6, test=4, anchor=50)


def test_report_prints_n_a_where_a_scenario_has_no_target_words(bench):
    point = bench.Point(0, "v", bench.Scores(80, 0.6, None), bench.Scores(60, 0.46, None))
    lines = bench.tables([bench.ArmResult("choice:ppo", [point], [])], (0,))
    assert "| choice:ppo | 60.0% / n/a / 46.0% |" in lines
