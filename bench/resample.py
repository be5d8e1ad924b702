"""Streaming resampler cost per rate: kernel build time and size, and CPU per 100 ms chunk.

    .venv/bin/python bench/resample.py [--rates 8000,11025,22050,44100,48000,8001,8002,47981] [--seconds 20]

For each client rate it builds a `StreamingResampler(rate, 16000)` from an empty kernel cache, then
feeds `--seconds` of noise in 100 ms chunks (what a real-time client sends) and reports the build
time, the kernel's bytes (when the resampler exposes them) and the mean microseconds per chunk. The
resampler runs on the server's event loop for every chunk of every stream whose rate is not 16 kHz,
so at 100 streams a chunk costing C microseconds takes 100 * 10 * C microseconds per second of the
loop. One torch thread, as the server runs. It only imports `voxloop.server.audio`, so the same
script measures an older checkout (run it with that checkout's interpreter, common rates only: before
issue 14, 8001 Hz took gigabytes).
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

DEFAULT_RATES = (8000, 11025, 22050, 44100, 48000, 8001, 8002, 44056, 47981)


def measure(rate: int, seconds: float) -> tuple[float, int | None, float]:
    """(build ms, kernel bytes or None, microseconds per 100 ms chunk) for one rate."""
    from voxloop.server import audio

    cache = getattr(audio, "_resample_transform", None)  # the cache before issue 14
    if cache is not None:
        cache.cache_clear()
    try:
        from voxloop.server.resample import KERNELS
        KERNELS.clear()
    except ImportError:
        pass
    signal = (0.1 * np.random.default_rng(rate).standard_normal(int(rate * seconds))).astype(np.float32)
    chunk = rate // 10
    chunks = [signal[i : i + chunk] for i in range(0, len(signal), chunk)]
    gc.collect()
    began = time.perf_counter()
    resampler = audio.StreamingResampler(rate, 16000)
    build_ms = (time.perf_counter() - began) * 1e3
    kernel = getattr(resampler, "kernel", None)
    began = time.perf_counter()
    for piece in chunks:
        resampler.process(piece)
    resampler.flush()
    per_chunk_us = (time.perf_counter() - began) / len(chunks) * 1e6
    return build_ms, (kernel.nbytes if kernel is not None else None), per_chunk_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)), help="comma-separated client rates")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per rate (default 20 s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per rate; the fastest is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| rate (Hz) | kernel build (ms) | kernel (KB) | per 100 ms chunk (µs) |")
    print("|---|---|---|---|")
    for rate in (int(r) for r in args.rates.split(",")):
        runs = [measure(rate, args.seconds) for _ in range(args.repeats)]
        build_ms = min(r[0] for r in runs)
        nbytes = runs[0][1]
        per_chunk = min(r[2] for r in runs)
        size = f"{nbytes / 1024:.1f}" if nbytes is not None else "-"
        print(f"| {rate} | {build_ms:.1f} | {size} | {per_chunk:.0f} |", flush=True)


if __name__ == "__main__":
    main()
