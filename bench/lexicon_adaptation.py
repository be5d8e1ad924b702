"""Text-side adaptation on and off: what the decoder gains from corrections' texts (adapt_decoder_files).

    .venv/bin/python bench/lexicon_adaptation.py --version-dir models/base --corpus corpus --corrected 100

Simulates users correcting the first `--corrected` utterances of corpus/test (their reference texts
become the corrections), adapts the version's lexicon + LM with them (trainer.lm.adapt_decoder_files,
as the trainer does when it publishes), and decodes, with the parent's decoder files and with the
adapted ones:
- the same sentences read by the held-out flite voice (a corrected phrase said again by someone else);
- the remaining test sentences, never corrected (adaptation must not hurt them);
- words of the corrected sentences missing from the parent lexicon: how many are now recognized.
The acoustic model is the same throughout: only the decoder files change.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from voxloop.core.lm_decoder import LexiconLmDecoderFactory, lm_decoder_paths
from voxloop.core.model import OnnxModel
from voxloop.core.registry import CARD_FILE, MODEL_FILE
from voxloop.trainer.config import DEFAULT_CORPUS_DIR
from voxloop.trainer.data import read_manifest
from voxloop.trainer.evaluate import error_rates, load_samples, onnx_log_probs
from voxloop.trainer.lm import LEXICON_FILE, LM_FILE, adapt_decoder_files


def decode_all(factory: LexiconLmDecoderFactory, utterances: list[np.ndarray]) -> list[str]:
    transcripts = []
    for log_probs in utterances:
        decoder = factory()
        decoder.feed(log_probs, 0.0)
        transcripts.append(decoder.final_hypotheses(1)[0].transcript)
    return transcripts


def new_word_recall(references: list[str], hypotheses: list[str], new_words: set[str]) -> tuple[int, int]:
    """(occurrences of new words recognized, occurrences in the references), bag-of-words per utterance."""
    found = total = 0
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        said = hypothesis.split()
        for word in reference.split():
            if word in new_words:
                total += 1
                if word in said:
                    found += 1
                    said.remove(word)
    return found, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version-dir", type=Path, default=Path("models/base"))
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS_DIR)
    parser.add_argument("--corrected", type=int, default=100, help="test sentences whose text becomes corrections")
    parser.add_argument("--uncorrected", type=int, default=200, help="other test sentences decoded as a control")
    args = parser.parse_args()
    card = json.loads((args.version_dir / CARD_FILE).read_text())
    spec = OnnxModel(args.version_dir / MODEL_FILE).spec
    forward, _ = onnx_log_probs(args.version_dir / MODEL_FILE)
    test = read_manifest(args.corpus / "test.jsonl")
    corrected = test[: args.corrected]
    texts = {r["text"] for r in corrected}
    heard_again = [r for r in read_manifest(args.corpus / "test_heldout_flite.jsonl") if r["text"] in texts]
    control = [r for r in test[args.corrected :] if r["text"] not in texts][: args.uncorrected]
    sets = {"corrected sentences, held-out flite voice": heard_again, "uncorrected test sentences": control}
    log_probs = {name: [forward(load_samples(args.corpus / r["path"])) for r in rows] for name, rows in sets.items()}
    parent_lexicon = {line.split()[0] for line in (args.version_dir / LEXICON_FILE).read_text().splitlines()}
    new_words = {w for t in texts for w in t.split()} - parent_lexicon
    with tempfile.TemporaryDirectory() as tmp:
        adapted = adapt_decoder_files(args.version_dir, [r["text"] for r in corrected], Path(tmp))
        _, _, settings = lm_decoder_paths(card, args.version_dir)
        factories = {
            "off (parent's decoder files)": LexiconLmDecoderFactory(
                spec.vocabulary, spec.frame_shift_s, args.version_dir / LEXICON_FILE, args.version_dir / LM_FILE,
                settings),
            "on (adapted with the corrections)": LexiconLmDecoderFactory(
                spec.vocabulary, spec.frame_shift_s, adapted[LEXICON_FILE], adapted[LM_FILE], settings),
        }
        print(f"{len(corrected)} corrected test sentences ({len(new_words)} words new to the lexicon); "
              f"decoder settings {settings}")
        print("| adaptation | set | utterances | WER | CER | new words recognized |")
        print("|---|---|---|---|---|---|")
        for adaptation, factory in factories.items():
            for name, rows in sets.items():
                hypotheses = decode_all(factory, log_probs[name])
                references = [r["text"] for r in rows]
                summary = error_rates(references, hypotheses)
                found, total = new_word_recall(references, hypotheses, new_words)
                print(f"| {adaptation} | {name} | {summary.utterances} | {summary.wer:.1%} | {summary.cer:.1%} | "
                      f"{found}/{total} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
