"""Helpers every kind of test uses: a free local port, waiting for a condition with a deadline, the
tokens file of two tenants' users, and speech synthesized by espeak-ng."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A 127.0.0.1 TCP port nothing listens on (bound, then closed again: start the server on it soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition", *, interval_s: float = 0.02):
    """Poll `predicate` until it returns a truthy value, and return that; fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


TWO_TENANTS_TOKENS = """
[[tokens]]
token = "tok-alice"
tenant = "acme"
user = "alice"

[[tokens]]
token = "tok-bob"
tenant = "globex"
user = "bob"
"""
"""A tokens file (TOML): alice of tenant acme and bob of tenant globex, both role user."""


def espeak_speech(text: str, *, voice: str = "en", rate_hz: int = 16000):
    """`text` spoken by espeak-ng (scripts/setup.sh installs it), as float32 (S,) samples at `rate_hz`."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), "--", text], check=True, capture_output=True)
        audio, espeak_rate_hz = sf.read(wav, dtype="float32")
    return AF.resample(torch.from_numpy(audio), espeak_rate_hz, rate_hz).numpy()


__all__ = ["TWO_TENANTS_TOKENS", "espeak_speech", "free_port", "wait_for"]
