"""16-bit PCM and WAV files: the one conversion between int16 samples and the model's float32 samples.

Every model takes float32 samples in [-1, 1) at MODEL_SAMPLE_RATE_HZ; the store keeps audio as
little-endian int16 PCM, corpora and probes are 16-bit WAV files. The scale is 32768 (soundfile's
and the LINEAR16 convention), so int16 -> float -> int16 is lossless, and float -> int16 clips to
[-1, 32767/32768] before rounding (half to even, as numpy and torch round).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

INT16_SCALE = 32768.0
"""int16 sample / INT16_SCALE = float sample in [-1, 1)."""
PCM16_BYTES_PER_SAMPLE = 2
_MAX_FLOAT = (INT16_SCALE - 1) / INT16_SCALE  # the float of int16 32767


def int16_to_float(samples: np.ndarray) -> np.ndarray:
    """int16 samples (any shape) -> float32 in [-1, 1)."""
    return np.asarray(samples).astype(np.float32) / INT16_SCALE


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] (any shape) -> int16, clipped, rounded: the inverse of int16_to_float."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, _MAX_FLOAT)
    return np.round(clipped * INT16_SCALE).astype(np.int16)


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian int16 PCM bytes -> float32 (S,) in [-1, 1)."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / INT16_SCALE


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float samples in [-1, 1], shape (S,) -> little-endian int16 PCM bytes (what the store keeps)."""
    return float_to_int16(samples).astype("<i2").tobytes()


def read_wav(path: Path | str, sample_rate_hz: int, *, dtype: str = "float32") -> np.ndarray:
    """A sound file (WAV, FLAC: anything libsndfile reads) as mono (S,) float32 in [-1, 1), or int16 with
    dtype="int16" (half the memory: training corpora); channels are averaged.

    Raises ValueError naming the file when it is at another rate than `sample_rate_hz` (resample it
    first); soundfile's RuntimeError or OSError when it cannot be read.
    """
    audio, rate_hz = sf.read(str(path), dtype=dtype, always_2d=True)  # (S, C)
    if rate_hz != sample_rate_hz:
        raise ValueError(f"{path}: {rate_hz} Hz audio; expected {sample_rate_hz} Hz (resample it)")
    if audio.shape[1] == 1:
        return audio[:, 0]
    mono = audio.mean(axis=1)  # (S,)
    return mono.astype(np.float32) if dtype == "float32" else np.round(mono).astype(audio.dtype)


__all__ = ["INT16_SCALE", "PCM16_BYTES_PER_SAMPLE", "float_to_int16", "float_to_pcm16", "int16_to_float",
           "pcm16_to_float", "read_wav"]
