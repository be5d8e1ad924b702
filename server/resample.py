"""Streaming windowed-sinc resampling with a cost bounded for every rate (8000..48000 Hz -> 16 kHz).

The filter is torchaudio's (`torchaudio.functional.resample`, method "sinc_interp_hann", 6 zero
crossings, rolloff 0.99), but held as a band: output sample n sits at input position
c_n = n * orig / new, and only the 2 * width input samples around it have a non-zero weight. The
weights depend only on where c_n falls between two input samples (its phase, c_n - floor(c_n)).

torchaudio builds a (new, orig + 2 * width) kernel for the gcd-reduced rates, which for a rate like
8001 Hz (16000 / gcd = 16000) is a 16000 x 8015 table of float64: gigabytes, built synchronously.
Here the phases are tabulated instead:
- when the reduced ratio has at most MAX_EXACT_PHASES distinct phases (every common rate: 8000,
  11025, 22050, 32000, 44100, 48000 Hz...), one row per phase: the result is torchaudio's, exactly;
- otherwise (8001, 8002, 47981 Hz...) a fixed grid of MAX_EXACT_PHASES phases and linear interpolation
  between the two rows around each output's phase (error below 1e-5 of full scale: the kernel is
  smooth at that spacing; tests compare it with the formula evaluated directly).
So a table has at most MAX_EXACT_PHASES + 1 rows of at most 2 * MAX_WIDTH taps (about 160 KB), and
the shared cache of tables is bounded in bytes (KERNEL_CACHE_BYTES). Output positions are computed
in exact integer arithmetic, so the output rate is exact (no drift) and resampling a stream chunk by
chunk gives the same samples as resampling it whole.

Each output sample is emitted as soon as the input its band reaches has arrived: the resampler holds
back at most `width` input samples (under 0.5 ms at 48 kHz, 1 ms at 8 kHz), whatever the rate.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

LOWPASS_FILTER_WIDTH = 6
"""Zero crossings of the sinc on each side of an output sample (torchaudio's default)."""
ROLLOFF = 0.99
"""Cut-off as a share of the lower rate's Nyquist frequency (torchaudio's default): anti-aliasing."""
MAX_EXACT_PHASES = 1024
"""Most phases tabulated per rate pair; a ratio with more (e.g. 8001 -> 16000: 16000) is interpolated."""
KERNEL_CACHE_BYTES = 16 << 20
"""Most bytes of phase tables kept for reuse across streams (least recently used go first)."""
OUTPUTS_PER_STEP = 4096
"""Most output samples computed in one vectorized step (256 ms at 16 kHz): bounds the temporaries."""


@dataclass(frozen=True)
class ResampleKernel:
    """The band of windowed-sinc weights of one rate pair, one row per tabulated phase."""

    orig: int
    """Input samples per `new` output samples (the gcd-reduced rates)."""
    new: int
    width: int
    """Input samples taken on each side of an output's position: a row has 2 * width taps."""
    phases: int
    """Rows are phases k / phases, k = 0..phases (the last one only for interpolation)."""
    exact: bool
    """phases == new: every output's phase is a row (no interpolation)."""
    table: np.ndarray = field(repr=False)
    """float32 (phases + 1, 2 * width): table[k, m] weighs input floor(c_n) - width + 1 + m at phase k / phases."""
    tiled_weights: np.ndarray | None = field(default=None, repr=False)
    """Exact kernels: float32 (new + OUTPUTS_PER_STEP, taps), row i = the weights of output i (period new),
    so the weights of any OUTPUTS_PER_STEP consecutive outputs are one slice (no gather)."""
    tiled_floor: np.ndarray | None = field(default=None, repr=False)
    """Exact kernels: int64 (new + OUTPUTS_PER_STEP,), floor(i * orig / new)."""

    @property
    def taps(self) -> int:
        return self.table.shape[1]

    @property
    def nbytes(self) -> int:
        tiled = 0 if self.tiled_weights is None else self.tiled_weights.nbytes + self.tiled_floor.nbytes
        return self.table.nbytes + tiled


def kernel_width(orig: int, new: int) -> int:
    """torchaudio's half-width in input samples (computed the same way, so the bands match)."""
    base_freq = min(orig, new) * ROLLOFF
    return math.ceil(LOWPASS_FILTER_WIDTH * orig / base_freq)


def sinc_weights(offsets: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Weight of an input sample `offsets` input samples away from an output's position (float64, any shape).

    torchaudio's "sinc_interp_hann": a sinc low-passed at ROLLOFF of the lower Nyquist frequency,
    Hann-windowed over LOWPASS_FILTER_WIDTH zero crossings each side, scaled for unit DC gain.
    """
    scale = ROLLOFF * min(orig, new) / orig
    t = np.clip(offsets * scale, -LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = np.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    return np.sinc(t) * window * scale  # np.sinc(t) = sin(pi t) / (pi t)


def build_kernel(orig_hz: int, new_hz: int) -> ResampleKernel:
    gcd = math.gcd(orig_hz, new_hz)
    orig, new = orig_hz // gcd, new_hz // gcd
    width = kernel_width(orig, new)
    exact = new <= MAX_EXACT_PHASES
    phases = new if exact else MAX_EXACT_PHASES
    phase = np.arange(phases + 1, dtype=np.float64)[:, None] / phases  # (P + 1, 1), in input samples
    offsets = np.arange(2 * width, dtype=np.float64)[None, :] - (width - 1) - phase  # (P + 1, 2 * width)
    table = sinc_weights(offsets, orig, new).astype(np.float32)
    if not exact:
        return ResampleKernel(orig, new, width, phases, exact, table)
    position = np.arange(new + OUTPUTS_PER_STEP, dtype=np.int64) * orig  # output i at input position / new
    return ResampleKernel(orig, new, width, phases, exact, table, tiled_weights=table[position % new],
                          tiled_floor=position // new)


class _KernelCache:
    """Kernels by rate pair, least recently used evicted past `max_bytes` (shared by every stream)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._kernels: OrderedDict[tuple[int, int], ResampleKernel] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def get(self, orig_hz: int, new_hz: int) -> ResampleKernel:
        key = (orig_hz, new_hz)
        with self._lock:
            kernel = self._kernels.get(key)
            if kernel is not None:
                self._kernels.move_to_end(key)
                return kernel
        kernel = build_kernel(orig_hz, new_hz)  # outside the lock: a few ms at most, bounded by the table size
        with self._lock:
            if key not in self._kernels:
                self._kernels[key] = kernel
                self.nbytes += kernel.nbytes
            while self.nbytes > self.max_bytes and len(self._kernels) > 1:
                _, evicted = self._kernels.popitem(last=False)
                self.nbytes -= evicted.nbytes
        return kernel

    def __len__(self) -> int:
        return len(self._kernels)

    def clear(self) -> None:
        with self._lock:
            self._kernels.clear()
            self.nbytes = 0


KERNELS = _KernelCache(KERNEL_CACHE_BYTES)


class StreamingResampler:
    """Resample a stream from `orig_hz` to `new_hz` chunk by chunk, equal to resampling it whole.

    Output n is the dot product of input [floor(c_n) - width + 1, floor(c_n) + width] (zeros before
    the start and after the end of the stream) with its phase's row; c_n = n * orig / new.
    Vectorized per call: one gather of the (N, taps) input windows, one of their weights, a row-wise
    dot product (numpy elementwise work, no BLAS: OpenBLAS's threads spin beside the event loop).
    """

    def __init__(self, orig_hz: int, new_hz: int):
        self.orig_hz, self.new_hz = orig_hz, new_hz
        self._identity = orig_hz == new_hz
        if self._identity:
            return
        self.kernel = KERNELS.get(orig_hz, new_hz)
        width = self.kernel.width
        # Input held from absolute index _pending_start on; the first output reaches width - 1 samples
        # before the stream's start, which are zeros (as in the whole-signal resampler).
        self._pending = np.zeros(width - 1, dtype=np.float32)
        self._pending_start = -(width - 1)
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
        kernel = self.kernel
        # Output n is final once input floor(c_n) + width has arrived: n < (received - width) * new / orig.
        ready = -(-(self._samples_in - kernel.width) * kernel.new // kernel.orig)
        return self._emit(ready)

    def flush(self) -> np.ndarray:
        """The end of the stream: zeros after it, as the whole-signal resampler has; emit the rest."""
        if self._identity or self._flushed:
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        kernel = self.kernel
        total = -(-self._samples_in * kernel.new // kernel.orig)  # ceil(new * S / orig), as torchaudio
        if total <= self._samples_out:
            return np.zeros(0, dtype=np.float32)
        last_needed = (total - 1) * kernel.orig // kernel.new + kernel.width  # absolute input index
        missing = last_needed + 1 - (self._pending_start + len(self._pending))
        if missing > 0:
            self._pending = np.concatenate([self._pending, np.zeros(missing, dtype=np.float32)])
        return self._emit(total)

    def _emit(self, end: int) -> np.ndarray:
        """Outputs [_samples_out, end) from the pending input; drops the input no later output needs."""
        if end <= self._samples_out:
            return np.zeros(0, dtype=np.float32)
        pieces = []
        while self._samples_out < end:
            step_end = min(end, self._samples_out + OUTPUTS_PER_STEP)
            pieces.append(self._outputs(self._samples_out, step_end))
            self._samples_out = step_end
        kernel = self.kernel
        next_first = end * kernel.orig // kernel.new - (kernel.width - 1)
        drop = next_first - self._pending_start
        if drop > 0:
            self._pending = self._pending[drop:]
            self._pending_start = next_first
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _outputs(self, start: int, end: int) -> np.ndarray:
        """Outputs [start, end), at most OUTPUTS_PER_STEP of them: (N,) float32."""
        kernel = self.kernel
        count = end - start
        if kernel.exact:  # the pattern repeats every `new` outputs: slices of the tiled period
            periods, offset = divmod(start, kernel.new)
            base = periods * kernel.orig - (kernel.width - 1) - self._pending_start
            first = kernel.tiled_floor[offset : offset + count] + base  # (N,) into _pending
            weights = kernel.tiled_weights[offset : offset + count]  # (N, taps), a view
        else:
            position = np.arange(start, end, dtype=np.int64) * kernel.orig  # c_n * new, exact
            first = position // kernel.new - (kernel.width - 1) - self._pending_start  # (N,)
            scaled = (position % kernel.new) * kernel.phases  # c_n's phase, in 1 / (new * phases)
            row = scaled // kernel.new
            fraction = ((scaled % kernel.new) / kernel.new).astype(np.float32)[:, None]  # (N, 1)
            below = kernel.table[row]
            weights = below + fraction * (kernel.table[row + 1] - below)  # (N, taps)
        windows = np.lib.stride_tricks.sliding_window_view(self._pending, kernel.taps)[first]  # (N, taps)
        return np.einsum("nt,nt->n", windows, weights)


__all__ = ["KERNELS", "KERNEL_CACHE_BYTES", "MAX_EXACT_PHASES", "ResampleKernel", "StreamingResampler",
           "build_kernel", "sinc_weights"]
