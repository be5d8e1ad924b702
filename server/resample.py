"""Streaming windowed-sinc resampling with a cost bounded for every rate (8000..48000 Hz -> 16 kHz).

The filter is torchaudio's (`torchaudio.functional.resample`, method "sinc_interp_hann", 6 zero
crossings, rolloff 0.99): output sample n sits at input position c_n = n * orig / new (orig, new:
the gcd-reduced rates), and only the 2 * width input samples around it have a non-zero weight, which
depends only on where c_n falls between two input samples.

torchaudio builds one dense (new, orig + 2 * width) kernel per rate pair: for 8001 Hz (16000 / gcd =
16000 phases) a 16000 x 8015 table of float64, gigabytes built in one go (issue 14). Here the layout
depends on the rate, and every table is bounded:
- "block": the dense kernel when it has at most DENSE_KERNEL_MAX_ENTRIES entries (every common rate:
  8000, 11025, 12000, 22050, 24000, 32000, 44100, 48000 Hz). A whole block of `orig` input samples
  becomes `new` output samples in one matrix product (torch's, on the server's one thread), the
  fastest layout; a block waits for its last input, so up to 1 / gcd seconds are held back (10 ms at
  44.1 kHz, 40 ms at 11.025 kHz, never more than 62 ms under this bound);
- "phases": the band alone, one row of 2 * width taps per phase, when there are at most
  MAX_EXACT_PHASES phases but the dense kernel would be bigger;
- "interpolated": otherwise (8001, 8002, 47981 Hz...) MAX_EXACT_PHASES + 1 rows on a fixed grid of
  phases, each output's weights linearly interpolated between the two rows around its phase (error
  ~3e-7 of full scale; tests compare it with the formula evaluated directly).
In "block" and "phases" the samples are torchaudio's, exactly. Output positions are exact integer
arithmetic in every layout (no drift), resampling a stream chunk by chunk gives the same samples as
resampling it whole, and the shared cache of kernels is bounded in bytes (KERNEL_CACHE_BYTES). In
"phases" and "interpolated" each output is emitted as soon as its band's last input arrived (under
1 ms held back).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

LOWPASS_FILTER_WIDTH = 6
"""Zero crossings of the sinc on each side of an output sample (torchaudio's default)."""
ROLLOFF = 0.99
"""Cut-off as a share of the lower rate's Nyquist frequency (torchaudio's default): anti-aliasing."""
DENSE_KERNEL_MAX_ENTRIES = 1 << 19
"""Largest dense kernel (new x (orig + 2 * width) float32: 2 MiB) used as such ("block" layout)."""
MAX_EXACT_PHASES = 1024
"""Most phases tabulated one row each ("phases"); a ratio with more is interpolated on this many."""
KERNEL_CACHE_BYTES = 32 << 20
"""Most bytes of kernels kept for reuse across streams (least recently used go first)."""
OUTPUTS_PER_STEP = 4096
"""Most output samples ("phases", "interpolated") computed in one vectorized step: bounds the temporaries."""


@dataclass(frozen=True)
class ResampleKernel:
    """The windowed-sinc weights of one rate pair, in the layout its size allows."""

    orig: int
    """Input samples per `new` output samples (the gcd-reduced rates)."""
    new: int
    width: int
    """Input samples taken on each side of an output's position."""
    layout: str
    """block, phases or interpolated (module docstring)."""
    phases: int = 0
    """phases, interpolated: table row k holds phase k / phases."""
    table: np.ndarray | None = field(default=None, repr=False)
    """phases, interpolated: float32 (phases + 1, 2 * width); table[k, m] weighs input
    floor(c_n) - width + 1 + m when c_n's phase is k / phases."""
    dense: torch.Tensor | None = field(default=None, repr=False)
    """block: float32 (orig + 2 * width, new), torchaudio's kernel transposed: input block (padded by width
    on each side) @ dense = the block's outputs."""

    @property
    def taps(self) -> int:
        """Input samples one output ("phases", "interpolated") or one block ("block") reads."""
        return self.dense.shape[0] if self.dense is not None else self.table.shape[1]

    @property
    def nbytes(self) -> int:
        return self.dense.nelement() * 4 if self.dense is not None else self.table.nbytes


def kernel_width(orig: int, new: int) -> int:
    """torchaudio's half-width in input samples (computed the same way, so the kernels match)."""
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
    if new * (orig + 2 * width) <= DENSE_KERNEL_MAX_ENTRIES:
        # Column c of block b's window is input b * orig + c - width; output b * new + j sits at
        # input position b * orig + j * orig / new.
        offsets = (np.arange(orig + 2 * width, dtype=np.float64)[:, None] - width
                   - np.arange(new, dtype=np.float64)[None, :] * orig / new)  # (taps, new)
        dense = torch.from_numpy(sinc_weights(offsets, orig, new).astype(np.float32))
        return ResampleKernel(orig, new, width, "block", dense=dense)
    layout = "phases" if new <= MAX_EXACT_PHASES else "interpolated"
    phases = new if layout == "phases" else MAX_EXACT_PHASES
    phase = np.arange(phases + 1, dtype=np.float64)[:, None] / phases  # (P + 1, 1), in input samples
    offsets = np.arange(2 * width, dtype=np.float64)[None, :] - (width - 1) - phase  # (P + 1, 2 * width)
    return ResampleKernel(orig, new, width, layout, phases, table=sinc_weights(offsets, orig, new).astype(np.float32))


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
        kernel = build_kernel(orig_hz, new_hz)  # outside the lock: at most a few ms (the kernel is bounded)
        with self._lock:
            if key not in self._kernels:
                self._kernels[key] = kernel
                self.nbytes += kernel.nbytes
            while self.nbytes > self.max_bytes and len(self._kernels) > 1:
                _, evicted = self._kernels.popitem(last=False)
                self.nbytes -= evicted.nbytes
        return kernel

    def kernels(self) -> list[ResampleKernel]:
        with self._lock:
            return list(self._kernels.values())

    def __len__(self) -> int:
        return len(self._kernels)

    def clear(self) -> None:
        with self._lock:
            self._kernels.clear()
            self.nbytes = 0


KERNELS = _KernelCache(KERNEL_CACHE_BYTES)


class StreamingResampler:
    """Resample a stream from `orig_hz` to `new_hz` chunk by chunk, equal to resampling it whole.

    The arithmetic runs in numpy's elementwise loops and torch's matmul, never numpy's BLAS: the
    server runs torch on one thread, while OpenBLAS starts threads of its own that spin beside the
    event loop (measured: half again the server's CPU per audio second).
    """

    def __init__(self, orig_hz: int, new_hz: int):
        self.orig_hz, self.new_hz = orig_hz, new_hz
        self._identity = orig_hz == new_hz
        if self._identity:
            return
        self.kernel = KERNELS.get(orig_hz, new_hz)
        width = self.kernel.width
        # Input held from absolute index _pending_start on; before the stream's start come zeros, as in the
        # whole-signal resampler (a block window starts `width` before its block, an output's band width - 1).
        lead = width if self.kernel.layout == "block" else width - 1
        self._pending = np.zeros(lead, dtype=np.float32)
        self._pending_start = -lead
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
        if kernel.layout == "block":
            return self._emit_blocks()
        # Output n is final once input floor(c_n) + width has arrived: n < (received - width) * new / orig.
        return self._emit_samples(-(-(self._samples_in - kernel.width) * kernel.new // kernel.orig))

    def flush(self) -> np.ndarray:
        """The end of the stream: zeros after it, as the whole-signal resampler has; emit the rest."""
        if self._identity or self._flushed:
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        kernel = self.kernel
        total = -(-self._samples_in * kernel.new // kernel.orig)  # ceil(new * S / orig), as torchaudio
        if total <= self._samples_out:
            return np.zeros(0, dtype=np.float32)
        if kernel.layout == "block":
            self._pending = np.concatenate([self._pending, np.zeros(kernel.width + kernel.orig, dtype=np.float32)])
            emitted_before = self._samples_out
            return self._emit_blocks()[: total - emitted_before]
        last_needed = (total - 1) * kernel.orig // kernel.new + kernel.width  # absolute input index
        missing = last_needed + 1 - (self._pending_start + len(self._pending))
        if missing > 0:
            self._pending = np.concatenate([self._pending, np.zeros(missing, dtype=np.float32)])
        return self._emit_samples(total)

    def _emit_blocks(self) -> np.ndarray:
        """"block": every whole block in the pending input -> its `new` outputs."""
        kernel = self.kernel
        blocks = (len(self._pending) - kernel.taps) // kernel.orig + 1
        if blocks <= 0:
            return np.zeros(0, dtype=np.float32)
        used = (blocks - 1) * kernel.orig + kernel.taps
        windows = np.lib.stride_tricks.sliding_window_view(self._pending[:used], kernel.taps)[:: kernel.orig]
        with torch.no_grad():  # (blocks, taps) @ (taps, new) -> (blocks * new,)
            out = (torch.from_numpy(windows.copy()) @ kernel.dense).reshape(-1).numpy()
        self._pending = self._pending[blocks * kernel.orig :]
        self._pending_start += blocks * kernel.orig
        self._samples_out += len(out)
        return out

    def _emit_samples(self, end: int) -> np.ndarray:
        """"phases", "interpolated": outputs [_samples_out, end); drops the input no later output needs."""
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
        position = np.arange(start, end, dtype=np.int64) * kernel.orig  # c_n * new, exact
        first = position // kernel.new - (kernel.width - 1) - self._pending_start  # (N,) into _pending
        phase = position % kernel.new  # (N,) c_n's phase, in 1 / new
        if kernel.layout == "phases":
            weights = kernel.table[phase]  # (N, taps)
        else:
            scaled = phase * kernel.phases
            row = scaled // kernel.new
            fraction = ((scaled % kernel.new) / kernel.new).astype(np.float32)[:, None]  # (N, 1)
            below = kernel.table[row]
            weights = below + fraction * (kernel.table[row + 1] - below)  # (N, taps)
        windows = np.lib.stride_tricks.sliding_window_view(self._pending, kernel.taps)[first]  # (N, taps)
        return np.einsum("nt,nt->n", windows, weights)


__all__ = ["KERNELS", "KERNEL_CACHE_BYTES", "MAX_EXACT_PHASES", "ResampleKernel", "StreamingResampler",
           "build_kernel", "kernel_width", "sinc_weights"]
