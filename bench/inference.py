"""Inference speed of the policy: onnxruntime vs torch eager, whole utterances and chunk by chunk.

    .venv/bin/python bench/inference.py                       # the shipped base model
    .venv/bin/python bench/inference.py --version-dir DIR --threads 1

Prints the median of `--repeats` runs for 1 s, 5 s and 20 s of audio, the ratio torch/onnx measured in
the same run, and the real-time factor (compute seconds per audio second). Also the cost of one
streaming chunk through the caches, batched over 1 and 64 streams, which is what the server pays.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from voxloop.core.model import OnnxModel
from voxloop.core.registry import MODEL_FILE
from voxloop.trainer.model import VoxloopForCTC
from voxloop.trainer.release import POLICY_DIR

DEFAULT_VERSION_DIR = Path(__file__).resolve().parent.parent / "models" / "base"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, default=DEFAULT_VERSION_DIR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = VoxloopForCTC.from_pretrained(args.version_dir / POLICY_DIR).eval()
    graph = OnnxModel(args.version_dir / MODEL_FILE, intra_op_threads=args.threads)  # as the server opens it
    c = model.config
    rng = np.random.default_rng(0)

    def audio(batch: int, samples: int) -> np.ndarray:
        return (0.1 * rng.standard_normal((batch, samples))).astype(np.float32)

    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"threads={args.threads} repeats={args.repeats} params={params_m:.2f}M")
    print("| audio | torch eager (s) | onnxruntime (s) | torch/onnx | RTF torch | RTF onnx |")
    print("|---|---|---|---|---|---|")
    for seconds in (1, 5, 20):
        samples, state = audio(1, seconds * c.sample_rate_hz), graph.initial_state(1)
        wave = torch.from_numpy(samples)
        with torch.no_grad():
            t_torch = median_seconds(lambda wave=wave: model(wave), args.repeats)
        t_onnx = median_seconds(lambda samples=samples, state=state: graph.run(samples, state), args.repeats)
        print(f"| {seconds} s | {t_torch:.4f} | {t_onnx:.4f} | {t_torch / t_onnx:.2f} | "
              f"{t_torch / seconds:.4f} | {t_onnx / seconds:.4f} |")
    chunk_s = c.chunk_samples / c.sample_rate_hz
    print(f"\n| streaming chunk ({chunk_s * 1000:.0f} ms) | onnxruntime per call (ms) | per stream-chunk (ms) | RTF |")
    print("|---|---|---|---|")
    for batch in (1, 16, 64):
        samples, state = audio(batch, c.chunk_samples + c.lookback_samples), graph.initial_state(batch)
        t = median_seconds(lambda samples=samples, state=state: graph.run(samples, state), args.repeats)
        print(f"| batch {batch} | {t * 1000:.2f} | {t * 1000 / batch:.3f} | {t / batch / chunk_s:.4f} |")


if __name__ == "__main__":
    main()
