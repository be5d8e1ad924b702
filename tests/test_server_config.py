"""ServerConfig: defaults, precedence (flags > environment > TOML > defaults), errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from voxloop.server.config import ServerConfig, load_config


def test_defaults_are_the_documented_ones():
    config = load_config(None, env={}, overrides={})
    assert (config.host, config.port, config.metrics_port) == ("127.0.0.1", 50051, 9400)
    assert config.data_dir == Path("~/.local/share/voxloop").expanduser()
    assert config.registry_dir == config.data_dir / "registry"
    assert (config.trailing_silence_before_speech_s, config.trailing_silence_after_speech_s,
            config.max_utterance_s) == (2.4, 1.2, 20.0)
    assert config.max_stream_duration_s == 3600 and config.max_message_bytes == 1 << 20
    assert config.interim_interval_s == 0.2


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path):
    toml = tmp_path / "voxloop.toml"
    toml.write_text('port = 6000\nhost = "0.0.0.0"\nidle_timeout_s = 5\nmax_utterance_s = 12.5\n')
    env = {"VOXLOOP_PORT": "7000", "VOXLOOP_IDLE_TIMEOUT_S": "7.5", "VOXLOOP_SERVER": "ignored:1"}
    config = load_config(toml, env=env, overrides={"port": 8000, "metrics_port": None})

    assert config.port == 8000  # flag
    assert config.idle_timeout_s == 7.5  # environment over file
    assert (config.host, config.max_utterance_s) == ("0.0.0.0", 12.5)  # file
    assert config.metrics_port == 9400  # a flag that was not given leaves the default


def test_voxloop_home_sets_the_data_dir_and_the_registry_under_it(tmp_path):
    config = load_config(None, env={"VOXLOOP_HOME": str(tmp_path)})
    assert config.data_dir == tmp_path
    assert config.registry_dir == tmp_path / "registry"
    assert load_config(None, env={}, overrides={"model_dir": tmp_path / "r"}).registry_dir == tmp_path / "r"


def test_unknown_setting_in_the_file_is_an_error_listing_the_known_ones(tmp_path):
    toml = tmp_path / "voxloop.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ValueError, match=r"unknown setting 'prot'.*known settings: host, port"):
        load_config(toml, env={})


def test_malformed_environment_value_names_the_variable():
    with pytest.raises(ValueError, match=r"port from \$VOXLOOP_PORT: 'fifty' is not a valid int"):
        load_config(None, env={"VOXLOOP_PORT": "fifty"})


def test_out_of_range_value_says_where_to_fix_it():
    with pytest.raises(ValueError, match=r"port must be 0\.\.65535.*VOXLOOP_PORT or --port"):
        ServerConfig(port=70000)
    with pytest.raises(ValueError, match="max_concurrent_streams must be >= 1"):
        load_config(None, env={}, overrides={"max_concurrent_streams": 0})
    with pytest.raises(ValueError, match="idle_timeout_s must be > 0 seconds"):
        ServerConfig(idle_timeout_s=0)
    with pytest.raises(ValueError, match="max_utterance_s must be at most 300 s"):
        ServerConfig(max_utterance_s=3600)


def test_invalid_toml_is_a_value_error_naming_the_file(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("port = \n")
    with pytest.raises(ValueError, match="bad.toml is not valid TOML"):
        load_config(toml, env={})


def test_config_errors_name_only_flags_that_exist():
    with pytest.raises(ValueError) as raised:
        ServerConfig(tls_cert_file=Path("cert.pem"))
    assert "VOXLOOP_TLS_KEY_FILE" in str(raised.value) and "--tls-key-file" not in str(raised.value)
    with pytest.raises(ValueError) as raised:
        ServerConfig(tls_cert_file=Path("cert.pem"), tls_key_file=Path("key.pem"))
    assert "VOXLOOP_TOKENS_FILE" in str(raised.value) and "--tokens-file" not in str(raised.value)
    with pytest.raises(ValueError, match="VOXLOOP_METRICS_PORT or --metrics-port"):
        ServerConfig(metrics_port=-1)


def test_the_fields_with_flags_are_the_serve_commands_flags():
    from voxloop.clients.cli import SERVE_FLAGS
    from voxloop.server.config import FLAG_FIELDS, flag_name
    assert {field for _, field, _, _ in SERVE_FLAGS} == FLAG_FIELDS
    assert all(flag_name(field) == flag for flag, field, _, _ in SERVE_FLAGS)
