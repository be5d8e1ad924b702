"""Client audio -> the model's 16 kHz float samples: LINEAR16 decoding, downmixing, streaming resampling.

Pure numpy, no gRPC: the stream feeds it whatever byte chunks the client sends.

Streaming resampling (`StreamingResampler`, resample.py) applies torchaudio's windowed-sinc filter,
so a stream resampled chunk by chunk gives the same samples as resampled whole (no clicks at chunk
boundaries), at a cost bounded for every rate in MIN_SAMPLE_RATE_HZ..MAX_SAMPLE_RATE_HZ; it holds
back at most one block of the reduced rate ratio (10 ms at 44.1 kHz, 40 ms at 11.025 kHz, under
1 ms at 8 or 48 kHz; never more than 62 ms) until more audio or `flush()` at the end of the stream.
"""

from __future__ import annotations

import numpy as np

from ..core.pcm import pcm16_to_float
from .resample import StreamingResampler

MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 48000
MAX_CHANNELS = 8


def validate_sample_rate(sample_rate_hz: int) -> int:
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise ValueError(
            f"sample_rate_hz must be {MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} (got {sample_rate_hz}); "
            "set it to the rate of the audio you send, or resample the audio into that range"
        )
    return sample_rate_hz


def validate_channels(channels: int) -> int:
    if not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"audio_channel_count must be 1..{MAX_CHANNELS} (0 means 1; got {channels})")
    return channels


def decode_linear16(data: bytes, channels: int = 1) -> np.ndarray:
    """Little-endian int16 PCM, `channels` interleaved -> mono float32 (S,) in [-1, 1).

    Every message must hold whole frames (one int16 sample per channel), so the interleave never
    shifts between messages.
    """
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        if len(data) % 2:
            raise ValueError(
                f"LINEAR16 audio must have an even number of bytes (whole 16-bit samples); got {len(data)} bytes"
            )
        raise ValueError(
            f"LINEAR16 audio with {channels} channels must come in whole frames of {frame_bytes} bytes "
            f"(one sample per channel); got {len(data)} bytes"
        )
    samples = pcm16_to_float(data)  # (S * C,)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)  # (S,)
    return samples


class SampleBuffer:
    """A growable float32 buffer of samples, indexed by absolute sample position in the stream."""

    def __init__(self, start: int = 0):
        self._data = np.zeros(0, dtype=np.float32)
        self._start = start  # absolute index of _data[0]
        self._length = 0

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        """One past the last absolute index held."""
        return self._start + self._length

    def append(self, samples: np.ndarray) -> None:
        needed = self._length + len(samples)
        if needed > len(self._data):
            grown = np.zeros(max(needed, 2 * len(self._data), 4096), dtype=np.float32)
            grown[: self._length] = self._data[: self._length]
            self._data = grown
        self._data[self._length : needed] = samples
        self._length = needed

    def view(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end) in absolute positions (a view: copy it to keep it)."""
        if not self._start <= start <= end <= self.end:
            raise IndexError(f"[{start}, {end}) is outside the buffer [{self._start}, {self.end})")
        return self._data[start - self._start : end - self._start]

    def drop_before(self, position: int) -> None:
        """Forget the samples before absolute `position`."""
        position = min(max(position, self._start), self.end)
        offset = position - self._start
        remaining = self._length - offset
        self._data[:remaining] = self._data[offset : self._length]
        self._length = remaining
        self._start = position

__all__ = ["SampleBuffer", "StreamingResampler", "decode_linear16", "validate_channels",
           "validate_sample_rate"]
