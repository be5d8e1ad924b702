"""Client audio handling: LINEAR16 decoding and downmixing, rate checks, streaming resampling."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torchaudio
from hypothesis import given, settings
from hypothesis import strategies as st
from server_support import pcm16
from voxloop.core.pcm import float_to_int16
from voxloop.server import resample
from voxloop.server.audio import (
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    SampleBuffer,
    StreamingResampler,
    decode_linear16,
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


# Rates whose gcd with 16000 is small: torchaudio's kernel for them is (16000 / gcd) x (rate / gcd) taps,
# gigabytes of float64 built in one go (issue 14: 8002 Hz stalled the server 8.5 s, 8001 Hz took 4.25 GB).
ADVERSARIAL_RATES = (8001, 8002, 11111, 44056, 47981)
MAX_KERNEL_BYTES = max(4 * resample.DENSE_KERNEL_MAX_ENTRIES, (resample.MAX_EXACT_PHASES + 1) * 2 * 19 * 4)
"""Largest kernel a rate pair may hold, whatever the rate: a 2 MiB dense kernel, or ~160 KB of phases."""


@pytest.mark.parametrize("rate", ADVERSARIAL_RATES)
def test_resampling_an_awkward_rate_costs_milliseconds_and_a_bounded_kernel(rate):
    resample.KERNELS.clear()
    signal = (0.3 * np.random.default_rng(rate).standard_normal(rate)).astype(np.float32)  # 1 s
    began = time.perf_counter()
    resampler = StreamingResampler(rate, 16000)
    out = np.concatenate([resampler.process(signal[i : i + rate // 10]) for i in range(0, rate, rate // 10)]
                         + [resampler.flush()])
    elapsed_s = time.perf_counter() - began
    assert len(out) == 16000
    assert elapsed_s < 0.5, f"{rate} Hz: building the kernel and resampling 1 s took {elapsed_s:.2f} s"
    assert resampler.kernel.nbytes <= MAX_KERNEL_BYTES


def reference_resample(signal: np.ndarray, orig_hz: int, outputs: np.ndarray) -> np.ndarray:
    """Output samples `outputs` of resampling to 16 kHz, the windowed-sinc sum evaluated directly (float64)."""
    orig, new = orig_hz // math.gcd(orig_hz, 16000), 16000 // math.gcd(orig_hz, 16000)
    width = resample.kernel_width(orig, new)
    padded = np.concatenate([np.zeros(2 * width), signal.astype(np.float64), np.zeros(2 * width)])
    values = []
    for n in outputs:
        centre = n * orig / new
        inputs = np.arange(math.floor(centre) - width + 1, math.floor(centre) + width + 1)
        values.append(padded[inputs + 2 * width] @ resample.sinc_weights(inputs - centre, orig, new))
    return np.array(values)


@pytest.mark.parametrize("rate", ADVERSARIAL_RATES)
def test_interpolated_phases_match_the_windowed_sinc_evaluated_directly(rate):
    rng = np.random.default_rng(rate)
    signal = (0.3 * rng.standard_normal(rate // 2)).astype(np.float32)
    resampler = StreamingResampler(rate, 16000)
    assert resampler.kernel.layout == "interpolated"  # more phases than tabulated
    out = np.concatenate([resampler.process(signal), resampler.flush()])
    picked = rng.integers(0, len(out), 200)
    np.testing.assert_allclose(out[picked], reference_resample(signal, rate, picked), atol=2e-6)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(rate=st.integers(MIN_SAMPLE_RATE_HZ, MAX_SAMPLE_RATE_HZ), seed=st.integers(0, 2**16))
def test_every_rate_resamples_chunked_like_whole_with_a_bounded_kernel_and_exact_length(rate, seed):
    rng = np.random.default_rng(seed)
    signal = (0.3 * rng.standard_normal(int(rng.integers(1, rate // 2)))).astype(np.float32)
    whole = StreamingResampler(rate, 16000)
    expected = np.concatenate([whole.process(signal), whole.flush()])
    chunked, pieces, start = StreamingResampler(rate, 16000), [], 0
    while start < len(signal):
        size = int(rng.integers(1, rate // 20 + 2))
        pieces.append(chunked.process(signal[start : start + size]))
        start += size
    pieces.append(chunked.flush())
    assert len(expected) == math.ceil(16000 * len(signal) / rate)
    np.testing.assert_allclose(np.concatenate(pieces), expected, atol=1e-6)  # the same sums, rounded alike or nearly
    assert whole.kernel.nbytes <= MAX_KERNEL_BYTES
    picked = rng.integers(0, len(expected), 5)
    np.testing.assert_allclose(expected[picked], reference_resample(signal, rate, picked), atol=2e-6)


@pytest.mark.parametrize("rate", [8000, 11025, 44100, 48000, 8001, 40016, 47981])
def test_resampler_holds_back_a_block_or_the_filter_half_width(rate):
    resampler = StreamingResampler(rate, 16000)
    kernel = resampler.kernel
    emitted = len(resampler.process(np.zeros(rate // 10, dtype=np.float32)))  # 100 ms
    held_back_s = 0.1 - emitted / 16000
    if kernel.layout == "block":  # whole blocks of orig input samples: 1 / gcd seconds, at most 62 ms
        assert held_back_s <= (kernel.orig + kernel.width) / rate + 1 / 16000 and kernel.orig / rate <= 0.0625
    else:
        assert held_back_s <= (kernel.width + 1) / rate + 1 / 16000


def test_every_layout_is_used_and_matches_torchaudio_where_exact():
    layouts = {rate: StreamingResampler(rate, 16000).kernel.layout for rate in (8000, 11025, 44100, 48000, 40016,
                                                                                8001)}
    assert layouts == {8000: "block", 11025: "block", 44100: "block", 48000: "block", 40016: "phases",
                       8001: "interpolated"}
    rng = np.random.default_rng(0)
    signal = (0.3 * rng.standard_normal(40016 // 2)).astype(np.float32)
    whole = torchaudio.functional.resample(torch.from_numpy(signal), 40016, 16000).numpy()
    resampler = StreamingResampler(40016, 16000)
    chunked = np.concatenate([resampler.process(signal[i : i + 997]) for i in range(0, len(signal), 997)]
                             + [resampler.flush()])
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


def test_the_kernel_cache_is_bounded_in_bytes():
    resample.KERNELS.clear()
    built_bytes, rates = 0, iter(range(8016, 48000, 16))  # multiples of 16: exact kernels, the largest
    while built_bytes <= 2 * resample.KERNEL_CACHE_BYTES:
        built_bytes += StreamingResampler(next(rates), 16000).kernel.nbytes
    assert resample.KERNELS.nbytes <= resample.KERNEL_CACHE_BYTES
    assert resample.KERNELS.nbytes == sum(k.nbytes for k in resample.KERNELS._kernels.values())


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
