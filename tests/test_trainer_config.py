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


def _subparser(*path: str):
    from voxloop.clients.cli import build_parser

    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")  # no public API
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize(("command", "config_class", "flags"), [
    (("pretrain", "corpus"), "CorpusConfig", "CORPUS_FLAGS"),
    (("pretrain", "train"), "PretrainConfig", "PRETRAIN_FLAGS"),
    (("train",), "TrainerConfig", "TRAIN_FLAGS"),
])
def test_every_config_flag_takes_its_default_type_and_help_from_its_field(command, config_class, flags):
    from voxloop.core.attribute_docs import attribute_docs
    from voxloop.trainer import cli, config
    from voxloop.trainer.config_flags import field_info

    parser = _subparser(*command)
    actions = {a.dest: a for a in parser._actions}
    for flag in getattr(cli, flags):
        info = field_info(getattr(config, config_class), flag.field)
        action = actions[flag.dest]
        assert info.doc and info.doc == attribute_docs(info.owner)[info.name]
        assert info.doc in action.help.replace("%%", "%"), flag.flag
        default = flag.default if flag.default is not None else info.default
        if default is not None and info.kind is not bool:
            assert f"(default: {default})" in action.help, flag.flag
        if command != ("train",):  # the pretraining commands build their config from the flags alone
            assert action.default == default, flag.flag


def test_pretraining_flags_build_the_config_with_the_fields_defaults_elsewhere(tmp_path):
    from voxloop.trainer import cli
    from voxloop.trainer.config import CorpusConfig, PretrainConfig
    from voxloop.trainer.config_flags import build_config, flag_values

    args = _subparser("pretrain", "train").parse_args(["--epochs", "3", "--out", str(tmp_path)])
    config = build_config(PretrainConfig, flag_values(args, cli.PRETRAIN_FLAGS))
    assert config == PretrainConfig(corpus_dir=Path("corpus"), out_dir=tmp_path, epochs=3)
    args = _subparser("pretrain", "corpus").parse_args(["--sentences", "40"])
    assert build_config(CorpusConfig, flag_values(args, cli.CORPUS_FLAGS)) == \
        CorpusConfig(out_dir=Path("corpus"), num_sentences=40)


def test_train_flags_reach_nested_and_boolean_fields(tmp_path):
    from voxloop.clients.cli import build_parser
    from voxloop.trainer.cli import trainer_config_from_args

    args = build_parser().parse_args(["train", "--no-adapt-lexicon", "--gradient-accumulation-steps", "3",
                                      "--store", "postgresql+psycopg://db/voxloop"])
    config = trainer_config_from_args(args, {"VOXLOOP_HOME": str(tmp_path)})
    assert (config.adapt_lexicon, config.ppo.gradient_accumulation_steps) == (False, 3)
    assert (config.store_url, config.data_dir) == ("postgresql+psycopg://db/voxloop", tmp_path)
    untouched = trainer_config_from_args(build_parser().parse_args(["train"]), {})
    assert untouched == type(untouched)()
