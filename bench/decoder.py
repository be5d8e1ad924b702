"""Decoding cost per chunk and per final: greedy vs the version's lexicon + LM beam search.

    .venv/bin/python bench/decoder.py --version-dir models/base --manifest corpus/dev.jsonl --limit 200

The model's log-probs of each utterance are computed first (not timed); then each decoder is fed
them in the server's chunks (chunk_frames frames per feed, as RecognitionStream does), asked for the
interim hypothesis after each, and closed with final_hypotheses(max_alternatives). Reported per
decoder: feed + interim time per chunk (p50/p95),
time of the final (p50/p95), and the total decode time per second of audio. One thread, on the
machine as it is: other load shows in the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from voxloop.core.decoder import CtcGreedyDecoder
from voxloop.core.lm_decoder import decoder_factory_from_card
from voxloop.core.model import OnnxModel
from voxloop.core.registry import CARD_FILE, MODEL_FILE
from voxloop.trainer.data import read_manifest
from voxloop.trainer.evaluate import load_samples, onnx_log_probs


def measure(make_decoder, utterances: list[np.ndarray], chunk_frames: int, frame_shift_s: float,
            max_alternatives: int) -> dict:
    chunk_ms, final_ms, total_s = [], [], 0.0
    for log_probs in utterances:
        decoder = make_decoder()
        for start in range(0, len(log_probs), chunk_frames):
            began = time.perf_counter()
            decoder.feed(log_probs[start : start + chunk_frames], start * frame_shift_s)
            decoder.hypothesis()  # the interim result the server sends after every chunk (interim_results)
            chunk_ms.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        decoder.final_hypotheses(max_alternatives)
        final_ms.append((time.perf_counter() - began) * 1000)
    total_s = (sum(chunk_ms) + sum(final_ms)) / 1000
    audio_s = sum(len(u) for u in utterances) * frame_shift_s
    return {
        "chunk_ms_p50": float(np.percentile(chunk_ms, 50)), "chunk_ms_p95": float(np.percentile(chunk_ms, 95)),
        "chunk_ms_mean": float(np.mean(chunk_ms)),
        "final_ms_p50": float(np.percentile(final_ms, 50)), "final_ms_p95": float(np.percentile(final_ms, 95)),
        "decode_s_per_audio_s": total_s / audio_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version-dir", type=Path, default=Path("models/base"))
    parser.add_argument("--manifest", type=Path, default=Path("corpus/dev.jsonl"))
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--max-alternatives", type=int, default=3)
    args = parser.parse_args()
    card = json.loads((args.version_dir / CARD_FILE).read_text())
    spec = OnnxModel(args.version_dir / MODEL_FILE).spec
    forward, _ = onnx_log_probs(args.version_dir / MODEL_FILE)
    rows = read_manifest(args.manifest)[: args.limit]
    utterances = [forward(load_samples(args.manifest.parent / r["path"])) for r in rows]
    lm_factory = decoder_factory_from_card(card, args.version_dir, spec.vocabulary, spec.frame_shift_s)
    if lm_factory is None:
        raise SystemExit(f"{args.version_dir} has no card['decoder']; nothing to compare greedy with")
    decoders = {
        "greedy": lambda: CtcGreedyDecoder(spec.vocabulary, spec.frame_shift_s),
        f"lexicon-lm (beam {card['decoder'].get('beam_size')})": lm_factory,
    }
    print(f"{len(utterances)} utterances of {args.manifest}, {spec.chunk_frames} frames "
          f"({spec.chunk_s * 1000:.0f} ms) per chunk, max_alternatives {args.max_alternatives}")
    print("| decoder | chunk p50 ms | chunk p95 ms | final p50 ms | final p95 ms | decode s / audio s |")
    print("|---|---|---|---|---|---|")
    for name, make in decoders.items():
        r = measure(make, utterances, spec.chunk_frames, spec.frame_shift_s, args.max_alternatives)
        print(f"| {name} | {r['chunk_ms_p50']:.3f} | {r['chunk_ms_p95']:.3f} | {r['final_ms_p50']:.2f} | "
              f"{r['final_ms_p95']:.2f} | {r['decode_s_per_audio_s']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
