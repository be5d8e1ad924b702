"""Client audio -> the model's 16 kHz float samples: LINEAR16 decoding, downmixing, streaming resampling.

Pure numpy/torch, no gRPC: the stream feeds it whatever byte chunks the client sends.

Streaming resampling is exact: `StreamingResampler` applies torchaudio's windowed-sinc kernel (the one
`torchaudio.functional.resample` builds) block by block, keeping the input history the next block's
filter taps reach back into, so resampling a stream chunk by chunk gives the same samples as
resampling it whole (no clicks at chunk boundaries). It holds back at most one block of the reduced
rate ratio plus the filter's half-width (under 1 ms at 8 or 48 kHz, 10 ms at 44.1 kHz, 40 ms at
11.025 kHz) until more audio or `flush()` at the end of the stream.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torchaudio

MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 48000
MAX_CHANNELS = 8
INT16_SCALE = 32768.0  # int16 -> [-1, 1)


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
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / INT16_SCALE  # (S * C,)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)  # (S,)
    return samples


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] (S,) -> int16 (S,), the inverse of decode_linear16 for mono audio."""
    clipped = np.clip(samples, -1.0, (INT16_SCALE - 1) / INT16_SCALE)
    return np.round(clipped * INT16_SCALE).astype(np.int16)


@functools.lru_cache(maxsize=64)
def _resample_transform(orig_hz: int, new_hz: int) -> torchaudio.transforms.Resample:
    """One kernel per rate pair, shared by every stream (read-only after construction)."""
    return torchaudio.transforms.Resample(orig_hz, new_hz)


class StreamingResampler:
    """Resample a stream from `orig_hz` to `new_hz` chunk by chunk, equal to resampling it whole.

    torchaudio's resampler reduces the rates by their gcd to `orig` -> `new` samples per block; output
    block b is a strided convolution of the input (zero-padded by `width` on the left) at
    [b * orig, b * orig + orig + 2 * width). We keep the input from the next block's start on.
    The convolution runs as one matrix product of the blocks' input windows with torchaudio's kernel:
    the same sums at a third of the cost of torch's conv1d on 100 ms chunks, which matters because it
    runs on the event loop for every chunk of every stream whose rate is not 16 kHz. (torch's matmul,
    not numpy's: the server runs torch on one thread, while numpy's OpenBLAS starts threads of its own
    that spin beside the event loop and raised the server's CPU per audio second by half.)
    """

    def __init__(self, orig_hz: int, new_hz: int):
        self.orig_hz, self.new_hz = orig_hz, new_hz
        self._identity = orig_hz == new_hz
        if self._identity:
            return
        transform = _resample_transform(orig_hz, new_hz)
        gcd = math.gcd(orig_hz, new_hz)
        self._orig, self._new = orig_hz // gcd, new_hz // gcd  # samples per block in and out
        self._width = transform.width
        self._kernel_t = transform.kernel[:, 0, :].T.contiguous()  # (taps, new)
        self._taps = self._kernel_t.shape[0]  # orig + 2 * width
        self._pending = np.zeros(self._width, dtype=np.float32)  # the left zero padding of the whole signal
        self._samples_in = 0
        self._samples_out = 0
        self._flushed = False

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Input samples (S,) -> the output samples that are now final (about S * new / orig)."""
        if self._identity:
            return samples
        if self._flushed:
            raise RuntimeError("StreamingResampler.process after flush()")
        self._samples_in += len(samples)
        self._pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        return self._emit()

    def flush(self) -> np.ndarray:
        """The end of the stream: pad with zeros as the whole-signal resampler does and emit the rest."""
        if self._identity or self._flushed:
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        self._pending = np.concatenate([self._pending, np.zeros(self._width + self._orig, dtype=np.float32)])
        emitted_before = self._samples_out
        out = self._emit()
        # The whole-signal resampler returns ceil(new * S / orig) samples in all.
        keep = max(0, -(-self.new_hz * self._samples_in // self.orig_hz) - emitted_before)
        self._samples_out = emitted_before + min(keep, len(out))
        return out[:keep]

    def _emit(self) -> np.ndarray:
        blocks = (len(self._pending) - self._taps) // self._orig + 1
        if blocks <= 0:
            return np.zeros(0, dtype=np.float32)
        used = (blocks - 1) * self._orig + self._taps
        windows = np.lib.stride_tricks.sliding_window_view(self._pending[:used], self._taps)[:: self._orig]
        with torch.no_grad():  # (blocks, taps) @ (taps, new) -> (blocks * new,)
            samples = (torch.from_numpy(np.ascontiguousarray(windows)) @ self._kernel_t).reshape(-1).numpy()
        self._pending = self._pending[blocks * self._orig :]
        self._samples_out += len(samples)
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
