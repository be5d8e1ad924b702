"""Contextual biasing of Whisper's second pass: general WER and a domain's target words per bonus pair.

    .venv/bin/python bench/context_bias.py --version-dir DIR --scenario runs/scenario --corpus corpus \
        [--bonuses 0:0,2:4,2:6,2:8,3:6] [--split test] [--utterances 80] [--dev-utterances 60]

DIR is a built Whisper version (e.g. <data_dir>/shipped/whisper-tiny.en-v1). The context words are the
scenario's target words (trainer/scenario.py) that Whisper spells with several tokens -- the ones the
trainer would add once corrected --, all of them, as if every one had been corrected: an upper bound of
what the trainer's context words can do. For each start:continue bonus pair the version's card is
changed in memory (second_pass.context_words and the bonuses) and every utterance is decoded as the
server decodes finals; WER and target-word accuracy are scored as bench/adaptation.py scores them
(clients.demo.score: voxloop's normalizer on both sides, target words by alignment). Prints a markdown table:
dev WER (the base corpus's dev split: general sentences, where the bias must not hurt) and the
scenario split's WER and target-word accuracy. Choose bonuses on the feedback split, report on test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer
from voxloop.clients.demo import score
from voxloop.core.pcm import read_wav
from voxloop.core.text import normalize_text
from voxloop.core.whisper_decoder import SECOND_PASS_KEY, WhisperSecondPass
from voxloop.trainer.corpus import load_manifest

SAMPLE_RATE_HZ = 16000


def _utterances(manifest: Path, count: int) -> list[tuple[object, str]]:
    rows = load_manifest(manifest)[:count]
    return [(read_wav(manifest.parent / row.path, SAMPLE_RATE_HZ), normalize_text(row.text)) for row in rows]


def _decode(second_pass: WhisperSecondPass, utterances) -> tuple[list[str], list[str]]:
    return [second_pass.transcribe(audio)[0].transcript for audio, _ in utterances], [ref for _, ref in utterances]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--scenario", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--bonuses", default="0:0,2:4,2:6,2:8,3:6", help="start:continue pairs, nats")
    parser.add_argument("--split", default="test", choices=("feedback", "test"))
    parser.add_argument("--utterances", type=int, default=80)
    parser.add_argument("--dev-utterances", type=int, default=60)
    args = parser.parse_args()

    card = json.loads((args.version_dir / "card.json").read_text())
    targets = json.loads((args.scenario / "scenario.json").read_text())["target_words"]
    tokenizer = Tokenizer.from_file(str(args.version_dir / card[SECOND_PASS_KEY]["tokenizer"]))
    context = [w for w in targets if len(tokenizer.encode(f" {w}", add_special_tokens=False).ids) > 1]
    dev = _utterances(args.corpus / "dev.jsonl", args.dev_utterances)
    domain = _utterances(args.scenario / f"{args.split}.jsonl", args.utterances)
    print(f"{len(context)} of {len(targets)} target words are context words: {' '.join(context)}")
    print(f"| start / continue bonus (nats) | dev WER ({len(dev)}) | {args.split} WER ({len(domain)}) | target words |")
    print("|---|---|---|---|")
    for pair in args.bonuses.split(","):
        start, cont = (float(x) for x in pair.split(":"))
        section = {**card[SECOND_PASS_KEY], "context_words": context, "context_start_bonus": start,
                   "context_continue_bonus": cont}
        second_pass = WhisperSecondPass.from_card({**card, SECOND_PASS_KEY: section}, args.version_dir)
        dev_scores = score(*reversed(_decode(second_pass, dev)))
        domain_scores = score(*reversed(_decode(second_pass, domain)))
        print(f"| {start:g} / {cont:g} | {100 * dev_scores.wer:.1f} | {100 * domain_scores.wer:.1f} | "
              f"{100 * domain_scores.target_accuracy:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
