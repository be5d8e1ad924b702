"""Tune the beam search's lm_weight / word_score / beam_size on a dev manifest (never on a test split).

    python -m voxloop.trainer.lm_tune models/base --manifest corpus/dev.jsonl [--write]

The model's log-probs are computed once per utterance; each grid point re-decodes them. `--write`
stores the best point in the version's card["decoder"] (and leaves the files untouched, so the
card's sha256 entries stay right).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

from ..core.lm_decoder import LexiconLmDecoderFactory, lm_decoder_paths
from ..core.model import OnnxModel
from ..core.registry import CARD_FILE, MODEL_FILE
from .data import read_manifest
from .evaluate import error_rates, load_samples, onnx_log_probs

log = logging.getLogger(__name__)

LM_WEIGHTS = (0.8, 1.2, 1.6, 2.0, 2.5)
WORD_SCORES = (-3.0, -2.0, -1.0, 0.0, 1.0)
BEAM_SIZES = (16,)


def tune(version_dir: Path, manifest: Path, *, lm_weights=LM_WEIGHTS, word_scores=WORD_SCORES,
         beam_sizes=BEAM_SIZES, limit: int | None = None) -> list[dict]:
    """WER/CER and decode time of every grid point on `manifest`, best (lowest WER, then CER) first."""
    card = json.loads((version_dir / CARD_FILE).read_text())
    spec = OnnxModel(version_dir / MODEL_FILE).spec
    forward, _ = onnx_log_probs(version_dir / MODEL_FILE)
    rows = read_manifest(manifest)[:limit]
    log_probs = [forward(load_samples(manifest.parent / r["path"])) for r in rows]
    references = [r["text"] for r in rows]
    results = []
    for lm_weight, word_score, beam_size in itertools.product(lm_weights, word_scores, beam_sizes):
        point = {"lm_weight": lm_weight, "word_score": word_score, "beam_size": beam_size}
        lexicon, lm, settings = lm_decoder_paths(card, version_dir, overrides=point)
        factory = LexiconLmDecoderFactory(spec.vocabulary, spec.frame_shift_s, lexicon, lm, settings)
        started = time.perf_counter()
        hypotheses = []
        for utterance in log_probs:
            decoder = factory()
            decoder.feed(utterance, 0.0)
            hypotheses.append(decoder.final_hypotheses(1)[0].transcript)
        elapsed_ms = (time.perf_counter() - started) * 1000 / max(1, len(rows))
        summary = error_rates(references, hypotheses)
        results.append({**point, "wer": summary.wer, "cer": summary.cer, "decode_ms_per_utterance": elapsed_ms})
        log.info("%s: WER %.3f CER %.3f (%.1f ms/utt)", point, summary.wer, summary.cer, elapsed_ms)
    return sorted(results, key=lambda r: (r["wer"], r["cer"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="a version directory with card['decoder'] and its files")
    parser.add_argument("--manifest", type=Path, required=True, help="the dev manifest (not a test split)")
    parser.add_argument("--limit", type=int, default=None, help="first N utterances only")
    parser.add_argument("--write", action="store_true", help="store the best point in the card's decoder section")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = tune(args.version_dir, args.manifest, limit=args.limit)
    for r in results:
        print(json.dumps(r))
    if args.write:
        card_path = args.version_dir / CARD_FILE
        card = json.loads(card_path.read_text())
        best = results[0]
        card["decoder"].update({k: best[k] for k in ("lm_weight", "word_score", "beam_size")},
                               tuned_on=f"{args.manifest.name}: WER {best['wer']:.4f} CER {best['cer']:.4f}")
        card_path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
