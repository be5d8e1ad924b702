"""`voxloop demo`: the loop end to end (serve, stream, correct, train, hot-swap, re-measure) on a small set."""

from __future__ import annotations

import re

import pytest
from voxloop.clients import cli
from voxloop.clients.demo import DemoConfig, Scores, gate_refusal, score
from voxloop.core.data_dir import STORE_FILE
from voxloop.core.store import FeedbackStore


def test_demo_sizes_and_trainer_mode_are_checked():
    with pytest.raises(ValueError, match="trainer must be 'inprocess' or 'once'"):
        DemoConfig(trainer="later")
    with pytest.raises(ValueError, match="--feedback and --test must be 12..1000"):
        DemoConfig(feedback=4)


def test_score_counts_word_errors_and_target_words():
    scores = score(["send two crates of brixa to ulmoor", "check the stock"],
                   ["send two crates of brixa to olmore", "check the stock"])

    assert scores == Scores(utterances=2, wer=pytest.approx(1 / 10), target_accuracy=pytest.approx(2 / 3))
    assert score(["check the stock"], ["check the stock"]).target_accuracy is None


def test_a_refused_cycle_is_explained_from_the_servers_store(tmp_path):
    store = FeedbackStore.open(tmp_path / STORE_FILE)
    try:
        assert gate_refusal(tmp_path) is None  # no cycle yet
        store.record_cycle([], "published", "v-c0001", {"gate": {"passed": True, "reasons": []}})
        assert gate_refusal(tmp_path) is None
        store.record_cycle([], "gated", None, {"gate": {
            "passed": False, "reasons": ["anchor WER 0.3098 is more than 0.0100 above the base version's 0.2989"],
            "heldout_utterances": 11, "heldout_wer_serving": 0.7745, "heldout_wer_candidate": 0.6275,
            "anchor_wer_serving": 0.2989, "anchor_wer_candidate": 0.3098}})
    finally:
        store.close()

    assert gate_refusal(tmp_path) == ("anchor WER 0.3098 is more than 0.0100 above the base version's 0.2989 "
                                      "(held-out WER 77.5% -> 62.7% on 11 utterances; anchor WER 29.9% -> 31.0%)")


@pytest.mark.slow
def test_demo_corrects_trains_swaps_and_prints_before_and_after(tmp_path, capsys):
    status = cli.main(["demo", "--home", str(tmp_path / "home"), "--feedback", "24", "--test", "12",
                       "--trainer", "once"])
    out, err = capsys.readouterr()

    assert status == 0, out + err
    version = re.search(r"model version: (\S+) -> (\S+)", out)
    assert version is not None, out
    before_version, after_version = version.groups()
    assert before_version == "base-20261125"
    assert after_version != before_version, out  # the cycle published and the server swapped it in
    rows = {m.group(1): m.groups() for m in re.finditer(r"^\| (before|after) \| (\S+) \| ([\d.]+)% \| ([\d.]+)% \|$",
                                                         out, re.MULTILINE)}
    assert set(rows) == {"before", "after"}, out
    assert rows["before"][1] == before_version and rows["after"][1] == after_version
    assert 0 < float(rows["before"][2]) <= 200 and 0 <= float(rows["after"][2]) <= 200
    assert (tmp_path / "home" / "scenario" / "scenario.json").is_file()
    assert (tmp_path / "home" / "server" / "registry" / "versions" / after_version).is_dir()
