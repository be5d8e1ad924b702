"""Client audio handling: LINEAR16 decoding and downmixing, rate checks, streaming resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio
from server_support import pcm16
from voxloop.server.audio import (
    SampleBuffer,
    StreamingResampler,
    decode_linear16,
    float_to_int16,
    validate_sample_rate,
)


def test_linear16_decodes_to_float_and_back_exactly():
    samples = np.array([0, 1, -1, 32767, -32768], dtype="<i2")
    decoded = decode_linear16(samples.tobytes())
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(float_to_int16(decoded), samples)


def test_odd_byte_count_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="even number of bytes"):
        decode_linear16(b"\x00\x01\x02")


def test_stereo_is_downmixed_and_must_come_in_whole_frames():
    left, right = np.full(4, 0.5, np.float32), np.full(4, -0.25, np.float32)
    decoded = decode_linear16(pcm16(np.stack([left, right], axis=1)), channels=2)
    np.testing.assert_allclose(decoded, np.full(4, 0.125), atol=1e-4)
    with pytest.raises(ValueError, match="whole frames of 4 bytes"):
        decode_linear16(b"\x00" * 6, channels=2)


@pytest.mark.parametrize("rate", [7999, 48001, 0])
def test_sample_rate_outside_8k_48k_is_rejected_with_the_allowed_range(rate):
    with pytest.raises(ValueError, match=r"sample_rate_hz must be 8000\.\.48000"):
        validate_sample_rate(rate)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_chunked_resampling_equals_resampling_the_whole_signal(rate):
    rng = np.random.default_rng(rate)
    signal = (0.3 * rng.standard_normal(rate + 123)).astype(np.float32)  # (S,), about 1 s
    whole = torchaudio.functional.resample(torch.from_numpy(signal), rate, 16000).numpy()

    resampler, pieces, start = StreamingResampler(rate, 16000), [], 0
    for size in rng.integers(1, rate // 10, size=1000):  # chunks of 1 sample .. 100 ms
        pieces.append(resampler.process(signal[start : start + size]))
        start += size
        if start >= len(signal):
            break
    pieces.append(resampler.flush())
    chunked = np.concatenate(pieces)

    assert chunked.shape == whole.shape
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


def test_16k_audio_passes_through_unchanged():
    samples = np.arange(5, dtype=np.float32)
    resampler = StreamingResampler(16000, 16000)
    assert resampler.process(samples) is samples
    assert len(resampler.flush()) == 0


def test_sample_buffer_keeps_absolute_positions_across_drops():
    buffer = SampleBuffer()
    buffer.append(np.arange(10, dtype=np.float32))
    buffer.drop_before(4)
    buffer.append(np.arange(10, 20, dtype=np.float32))
    assert (buffer.start, buffer.end) == (4, 20)
    np.testing.assert_array_equal(buffer.view(8, 12), [8, 9, 10, 11])
    with pytest.raises(IndexError):
        buffer.view(2, 6)
