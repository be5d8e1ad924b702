"""Audio files to LINEAR16 chunks: rates, channels, chunking, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from voxloop.clients.audio_files import chunk_pcm, read_audio_file
from voxloop.core.pcm import pcm16_to_float


def tone(seconds: float, rate: int, hz: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_wav_is_chunked_into_100_ms_pieces_at_its_own_rate(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(1.05, 16000), 16000, subtype="PCM_16")

    audio = read_audio_file(path)
    chunks = list(audio.chunks())

    assert audio.sample_rate_hz == 16000
    assert [len(c) for c in chunks] == [1600 * 2] * 10 + [800 * 2]  # ten 100 ms chunks and the 50 ms rest
    assert b"".join(chunks) == audio.pcm
    assert audio.duration_s == pytest.approx(1.05)


def test_stereo_44100_flac_is_downmixed_to_mono_at_44100(tmp_path):
    path = tmp_path / "stereo.flac"
    left, right = tone(0.5, 44100, 440), tone(0.5, 44100, 660, amplitude=0.25)
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")

    audio = read_audio_file(path)
    samples = pcm16_to_float(audio.pcm)

    assert (audio.sample_rate_hz, audio.source_channels) == (44100, 2)
    assert len(next(audio.chunks())) == 4410 * 2
    np.testing.assert_allclose(samples, (left + right) / 2, atol=2 / 32768)


def test_16_bit_samples_survive_the_round_trip_exactly(tmp_path):
    path = tmp_path / "pcm.wav"
    original = np.array([0, 1, -1, 32767, -32768, 12345, -54], dtype=np.int16)
    sf.write(path, original, 8000, subtype="PCM_16")

    assert np.array_equal(np.frombuffer(read_audio_file(path).pcm, dtype="<i2"), original)


def test_chunk_pcm_keeps_every_byte_and_never_splits_a_sample():
    pcm = np.arange(2205, dtype="<i2").tobytes()  # 100 ms at 22.05 kHz
    chunks = list(chunk_pcm(pcm, 22050, chunk_ms=40))

    assert b"".join(chunks) == pcm
    assert all(len(c) % 2 == 0 for c in chunks)
    assert len(chunks[0]) == 882 * 2


def test_missing_file_is_a_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nope.wav: no such file"):
        read_audio_file(tmp_path / "nope.wav")


def test_non_audio_file_is_a_value_error_that_says_what_to_use(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio")
    with pytest.raises(ValueError, match="not a readable audio file.*WAV or FLAC"):
        read_audio_file(path)


def test_empty_wav_is_a_value_error(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    with pytest.raises(ValueError, match="no audio samples"):
        read_audio_file(path)


def test_sample_rate_outside_the_api_range_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "hifi.wav"
    sf.write(path, tone(0.1, 96000), 96000, subtype="PCM_16")
    with pytest.raises(ValueError, match="96000 Hz is outside 8000..48000 Hz; resample"):
        read_audio_file(path)
