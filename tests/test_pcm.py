"""core/pcm.py: the one int16 <-> float conversion and the one WAV reader that server, store and trainer use."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from voxloop.core.pcm import float_to_int16, float_to_pcm16, int16_to_float, pcm16_to_float, read_wav


def test_int16_to_float_to_int16_is_lossless_over_the_whole_range():
    every_value = np.arange(-32768, 32768, dtype=np.int16)
    floats = int16_to_float(every_value)
    assert floats.dtype == np.float32 and floats.min() == -1.0 and floats.max() < 1.0
    np.testing.assert_array_equal(float_to_int16(floats), every_value)
    np.testing.assert_array_equal(pcm16_to_float(every_value.astype("<i2").tobytes()), floats)


def test_float_to_int16_clips_out_of_range_samples_and_rounds_half_to_even():
    samples = np.array([-1.5, -1.0, 0.5 / 32768, 1.5 / 32768, 0.99999, 1.0, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(float_to_int16(samples), [-32768, -32768, 0, 2, 32767, 32767, 32767])
    assert float_to_pcm16(samples) == float_to_int16(samples).astype("<i2").tobytes()


def test_float_to_pcm16_interleaves_channels_of_a_2d_array():
    stereo = np.array([[0.5, -0.5], [0.25, -0.25]], dtype=np.float32)  # (S, C)
    assert np.frombuffer(float_to_pcm16(stereo), "<i2").tolist() == [16384, -16384, 8192, -8192]


def test_read_wav_gives_mono_float32_or_int16_and_refuses_another_rate(tmp_path):
    left = np.array([1000, -2000, 3000], dtype=np.int16)
    sf.write(tmp_path / "mono.wav", left, 16000, subtype="PCM_16")
    sf.write(tmp_path / "stereo.wav", np.stack([left, -left], axis=1), 16000, subtype="PCM_16")
    sf.write(tmp_path / "fast.wav", left, 44100, subtype="PCM_16")
    np.testing.assert_array_equal(read_wav(tmp_path / "mono.wav", 16000), int16_to_float(left))
    np.testing.assert_array_equal(read_wav(tmp_path / "mono.wav", 16000, dtype="int16"), left)
    np.testing.assert_array_equal(read_wav(tmp_path / "stereo.wav", 16000), np.zeros(3, np.float32))
    assert read_wav(tmp_path / "stereo.wav", 16000).dtype == np.float32
    with pytest.raises(ValueError, match="44100 Hz audio; expected 16000 Hz"):
        read_wav(tmp_path / "fast.wav", 16000)
