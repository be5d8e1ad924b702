"""The `voxloop` command line: exit codes, one-line errors, and transcription against a real server.

The real server is started in-process on 127.0.0.1 (port 0) with `create_server`, serving the tiny
random-weight model from conftest: its transcripts are gibberish, but ids, versions and latencies are real.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import TINY_VERSION
from voxloop.clients.cli import main

JSON_KEYS = {"file", "utterance_id", "transcript", "model_version", "first_partial_ms", "final_ms"}


def write_speechy_wav(path, seconds: float = 1.5, rate: int = 16000, channels: int = 1):
    """Voiced-sounding audio (a harmonic tone with syllable-like envelope) so the endpointer sees speech."""
    t = np.arange(int(seconds * rate)) / rate
    voiced = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    signal = (0.2 * voiced * np.sin(np.pi * 4 * t) ** 2).astype(np.float32)  # (S,)
    data = np.stack([signal] * channels, axis=1) if channels > 1 else signal
    sf.write(path, data, rate, subtype="PCM_16")
    return path


# --- exit codes without a server -----------------------------------------------------------------

def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_transcribe_without_files_is_a_usage_error(capsys):
    assert main(["transcribe"]) == 2
    assert "FILE" in capsys.readouterr().err


def test_malformed_server_address_is_a_usage_error(tmp_path, capsys):
    assert main(["transcribe", "--server", "localhost", str(write_speechy_wav(tmp_path / "a.wav"))]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_malformed_server_in_the_environment_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VOXLOOP_SERVER", "no-port-here")
    assert main(["models", "current"]) == 2
    assert "no-port-here" in capsys.readouterr().err


def test_missing_file_exits_1_with_one_error_line(tmp_path, unused_port, capsys):
    assert main(["transcribe", "--server", f"127.0.0.1:{unused_port}", str(tmp_path / "missing.wav")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("voxloop: error: ") and "missing.wav: no such file" in err


def test_unreadable_file_exits_1_with_one_error_line(tmp_path, unused_port, capsys):
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"\x00\x01 definitely not flac")
    assert main(["transcribe", "--server", f"127.0.0.1:{unused_port}", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.flac: not a readable audio file" in err


def test_unreachable_server_exits_1_with_one_line_and_no_traceback(tmp_path, unused_port):
    wav = write_speechy_wav(tmp_path / "a.wav")
    run = subprocess.run([sys.executable, "-m", "voxloop.clients.cli", "transcribe", "--server",
                          f"127.0.0.1:{unused_port}", str(wav)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"voxloop: error: cannot reach the voxloop server at 127.0.0.1:{unused_port}")
    assert "Traceback" not in run.stderr


def test_models_current_against_unreachable_server_exits_1(unused_port, capsys):
    assert main(["models", "current", "--server", f"127.0.0.1:{unused_port}"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "transcribe" in out and "serve" in out


# --- against a real server -----------------------------------------------------------------------

@pytest.fixture
def server_config(tiny_registry, tmp_path):
    from voxloop.server.config import load_config

    return load_config(None, {}, {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "model_dir": tiny_registry,
                                  "data_dir": tmp_path / "data"})


@pytest.fixture
def server(server_config):
    """HOST:PORT of a real voxloop server on 127.0.0.1 serving the tiny model."""
    from voxloop.server.app import BackgroundServer

    with BackgroundServer(server_config) as running:
        yield running.target


@pytest.mark.slow
def test_transcribe_json_prints_one_object_per_file_with_the_serving_version(server, tmp_path, capsys):
    files = [write_speechy_wav(tmp_path / "a.wav"), write_speechy_wav(tmp_path / "b.wav", seconds=0.7)]
    assert main(["models", "current", "--server", server]) == 0
    serving_version = capsys.readouterr().out.strip()

    assert main(["transcribe", "--json", "--server", server, *map(str, files)]) == 0
    captured = capsys.readouterr()

    objects = [json.loads(line) for line in captured.out.splitlines()]
    assert captured.err == ""
    assert serving_version == TINY_VERSION
    assert [o["file"] for o in objects] == [str(f) for f in files]
    for o in objects:
        assert set(o) >= JSON_KEYS
        assert o["model_version"] == serving_version
        assert o["utterance_id"]
        assert o["final_ms"] is not None and o["final_ms"] >= 0
        assert all(u["model_version"] == serving_version for u in o["utterances"])
    assert objects[0]["utterance_id"] != objects[1]["utterance_id"]


@pytest.mark.slow
def test_transcribe_prints_file_and_transcript_per_file(server, tmp_path, capsys):
    wav = write_speechy_wav(tmp_path / "hello.wav")
    assert main(["transcribe", "--server", server, str(wav)]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{wav}: ")


@pytest.mark.slow
def test_stereo_44100_file_is_accepted(server, tmp_path, capsys):
    wav = write_speechy_wav(tmp_path / "stereo.wav", seconds=1.0, rate=44100, channels=2)
    assert main(["transcribe", "--json", "--server", server, str(wav)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_version"] == TINY_VERSION
    assert result["audio_duration_s"] == pytest.approx(1.0)


@pytest.mark.slow
def test_bad_file_among_good_ones_fails_alone_with_exit_1(server, tmp_path, capsys):
    good = write_speechy_wav(tmp_path / "good.wav", seconds=0.5)
    assert main(["transcribe", "--server", server, str(tmp_path / "gone.wav"), str(good)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}: ")
    assert captured.err.count("\n") == 1 and "gone.wav: no such file" in captured.err


@pytest.mark.slow
def test_models_current_json_has_version_and_load_time(server, capsys):
    assert main(["models", "current", "--json", "--server", server]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == TINY_VERSION and info["loaded_at"] and info["sample_rate_hz"] == 16000


@pytest.mark.slow
def test_library_clients_against_the_real_server(server, tmp_path):
    from voxloop.clients.client import AsyncRecognizerClient, RecognizerClient, recognition_config

    wav = write_speechy_wav(tmp_path / "a.wav", seconds=1.0)
    pcm = (np.sin(np.linspace(0, 3000, 16000)) * 3000).astype("<i2").tobytes()
    with RecognizerClient(server) as client:
        response = client.recognize(pcm, recognition_config(16000))
        streamed = list(client.streaming_recognize([pcm[i:i + 3200] for i in range(0, len(pcm), 3200)],
                                                   recognition_config(16000)))

    async def transcribe():
        async with AsyncRecognizerClient(server) as client:
            return await client.transcribe_file(wav)

    result = asyncio.run(transcribe())
    assert response.total_audio_seconds == pytest.approx(1.0)
    assert all(r.model_version == TINY_VERSION for r in response.results)
    assert streamed[-1].results[-1].is_final
    assert max(r.audio_processed for resp in streamed for r in resp.results) == pytest.approx(1.0, abs=0.01)
    assert result.model_version == TINY_VERSION and result.utterances


@pytest.mark.slow
def test_serve_maps_its_flags_to_the_config_and_stops_cleanly_on_sigterm(tiny_registry, tmp_path, unused_port):
    from voxloop.clients.client import RecognizerClient, VoxloopError

    process = subprocess.Popen(
        [sys.executable, "-m", "voxloop.clients.cli", "serve", "--host", "127.0.0.1", "--port", str(unused_port),
         "--metrics-port", "0", "--model-dir", str(tiny_registry), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with RecognizerClient(f"127.0.0.1:{unused_port}", timeout=2) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    assert client.get_model_info().version == TINY_VERSION
                    break
                except VoxloopError:
                    assert process.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (tmp_path / "data").is_dir()


def test_serve_with_an_invalid_flag_value_is_a_usage_error_naming_the_fix(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "port must be 0..65535" in err


def test_serve_without_a_model_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VOXLOOP_SHIPPED_MODEL_DIR", str(tmp_path / "no-shipped-model"))
    assert main(["serve", "--port", "0", "--metrics-port", "0", "--model-dir", str(tmp_path / "empty-registry"),
                 "--data-dir", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model to serve" in err


CLIENT_ONLY = ("import sys\n"
               "for name in ('torch', 'onnxruntime', 'voxloop.server', 'voxloop.trainer'):\n"
               "    sys.modules[name] = None  # as if not installed: importing it raises ImportError\n"
               "from voxloop.clients.cli import main\n"
               "sys.exit(main(sys.argv[1:]))\n")


def test_client_only_install_has_a_working_cli_without_trainer_commands():
    run = subprocess.run([sys.executable, "-c", CLIENT_ONLY, "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "transcribe" in run.stdout and "pretrain" not in run.stdout


def test_serve_without_the_server_installed_says_what_to_install():
    run = subprocess.run([sys.executable, "-c", CLIENT_ONLY, "serve"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "pip install 'voxloop[server]'" in run.stderr
