"""The in-process trainer's settings from VOXLOOP_TRAINER_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest
from voxloop.clients.cli import main
from voxloop.trainer.config import config_from_env


def test_trainer_variables_set_fields_and_objective(tmp_path):
    env = {"VOXLOOP_TRAINER_MIN_FEEDBACK": "16", "VOXLOOP_TRAINER_MAX_WAIT_S": "2.5",
           "VOXLOOP_TRAINER_ADAPT_LEXICON": "off", "VOXLOOP_TRAINER_CORPUS_DIR": str(tmp_path / "c"),
           "VOXLOOP_TRAINER_OBJECTIVE": "sft"}
    config = config_from_env(env, data_dir=tmp_path)
    assert (config.min_feedback, config.max_wait_s, config.adapt_lexicon) == (16, 2.5, False)
    assert config.corpus_dir == Path(tmp_path / "c")
    assert config.ppo.objective == "sft"
    assert config.data_dir == tmp_path


def test_unset_variables_keep_the_defaults(tmp_path):
    config = config_from_env({}, data_dir=tmp_path)
    assert config.min_feedback == 64 and config.ppo.objective == "ppo+sft"


@pytest.mark.parametrize(("variable", "value"), [("VOXLOOP_TRAINER_MIN_FEEDBACK", "many"),
                                                 ("VOXLOOP_TRAINER_OBJECTIVE", "dpo")])
def test_bad_trainer_variable_is_a_one_line_error_naming_it(variable, value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("VOXLOOP_HOME", str(tmp_path))
    status = main(["serve", "--port", "0", "--metrics-port", "0"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("voxloop: error:") and (variable in err or "objective" in err)
    assert len(err.strip().splitlines()) == 1


def test_standalone_train_reads_the_same_variables_and_its_flags_win(tmp_path):
    from voxloop.clients.cli import build_parser
    from voxloop.trainer.cli import trainer_config_from_args

    env = {"VOXLOOP_TRAINER_HELDOUT_SHARE": "0", "VOXLOOP_TRAINER_MIN_FEEDBACK": "16",
           "VOXLOOP_TRAINER_OBJECTIVE": "sft"}
    args = build_parser().parse_args(["train", "--once", "--data-dir", str(tmp_path), "--min-feedback", "8"])
    config = trainer_config_from_args(args, env)
    assert (config.heldout_share, config.min_feedback, config.ppo.objective) == (0.0, 8, "sft")
    args = build_parser().parse_args(["train", "--objective", "ppo"])
    assert trainer_config_from_args(args, env).ppo.objective == "ppo"
