"""Audio files to LINEAR16 chunks: what the client streams.

WAV, FLAC (anything libsndfile reads) at any rate the API accepts, mono or stereo. Channels are
downmixed here and the audio stays at the file's own rate: the server resamples, so the client needs
no DSP beyond a mean over channels. Pacing (`--realtime`) is the caller's business; this module
only reads and chunks.

numpy and soundfile are imported by the file-reading helpers when they run, so importing the client
library costs neither (an application that streams its own PCM never loads them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

CHUNK_DURATION_MS = 100
"""Audio per StreamingRecognize message: small enough for live partials, large enough to be cheap."""

MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 48000
"""The API's accepted range (RecognitionConfig.sample_rate_hz); checked here so a bad file fails
before a connection is opened."""

BYTES_PER_SAMPLE = 2  # LINEAR16


@dataclass(frozen=True)
class AudioFile:
    """One file's audio as mono LINEAR16 (signed 16-bit little-endian) at the file's own rate."""

    path: Path
    sample_rate_hz: int
    pcm: bytes
    """Mono int16 little-endian samples."""
    source_channels: int
    """Channels in the file before the downmix."""

    @property
    def num_samples(self) -> int:
        return len(self.pcm) // BYTES_PER_SAMPLE

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate_hz

    def chunks(self, chunk_ms: int = CHUNK_DURATION_MS) -> Iterator[bytes]:
        """The audio in consecutive `chunk_ms` pieces; the last one may be shorter."""
        return chunk_pcm(self.pcm, self.sample_rate_hz, chunk_ms)


def chunk_samples(sample_rate_hz: int, chunk_ms: int = CHUNK_DURATION_MS) -> int:
    """Samples per chunk of `chunk_ms` at `sample_rate_hz` (44.1 kHz, 100 ms -> 4410)."""
    if chunk_ms <= 0:
        raise ValueError(f"chunk_ms must be positive, got {chunk_ms}")
    return max(1, round(sample_rate_hz * chunk_ms / 1000))


def chunk_pcm(pcm: bytes, sample_rate_hz: int, chunk_ms: int = CHUNK_DURATION_MS) -> Iterator[bytes]:
    """Split mono LINEAR16 `pcm` into `chunk_ms` pieces; the last one holds the remainder."""
    step_bytes = chunk_samples(sample_rate_hz, chunk_ms) * BYTES_PER_SAMPLE
    for start in range(0, len(pcm), step_bytes):
        yield pcm[start : start + step_bytes]


def float_to_linear16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] (any shape (S,) or (S, C); channels are averaged) to mono LINEAR16."""
    from voxloop.core.pcm import float_to_pcm16  # numpy; the conversion the server and the store use

    mono = samples.mean(axis=1) if samples.ndim == 2 else samples  # (S,)
    return float_to_pcm16(mono)


def read_audio_file(path: str | Path) -> AudioFile:
    """Read `path` (WAV/FLAC, mono or stereo, 8-48 kHz) and downmix it to mono LINEAR16.

    Raises ValueError, with the file's name and what to do, when the file is missing, unreadable,
    empty, or at a sample rate the API does not accept.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        samples, sample_rate_hz = sf.read(str(path), dtype="float32", always_2d=True)  # (S, C)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable audio file ({reason}); use WAV or FLAC") from e
    if samples.shape[0] == 0:
        raise ValueError(f"{path}: the file holds no audio samples")
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise ValueError(
            f"{path}: sample rate {sample_rate_hz} Hz is outside {MIN_SAMPLE_RATE_HZ}..{MAX_SAMPLE_RATE_HZ} Hz; "
            f"resample the file (e.g. `sox in.wav -r 16000 out.wav`)"
        )
    return AudioFile(path=path, sample_rate_hz=int(sample_rate_hz), pcm=float_to_linear16(samples),
                     source_channels=samples.shape[1])
