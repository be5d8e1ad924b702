"""Decoder files of a registry version: a word lexicon and an n-gram language model, built from text.

A version that decodes with a lexicon and a word LM (core/lm_decoder.py) carries three files beside
model.onnx, listed (sha256) in its card's "files" and described by card["decoder"]:

    lexicon.txt      one word a line, then its spelling: "hello h e l l o |" ("|" ends a word)
    lm.arpa          the n-gram LM in ARPA format (KenLM, inside flashlight-text, reads it)
    lm_counts.tsv.gz what the LM was estimated from: "count<TAB>sentence" per distinct sentence

The sentence counts are kept so that a child version can re-estimate the LM from the parent's text
plus new text (corrections): `adapt_decoder_files` is the text-side adaptation that teaches the
decoder new words, versioned with the model like its weights.

Smoothing: interpolated modified Kneser-Ney, written in ARPA's backoff form (as KenLM's lmplz and
SRILM's -kndiscount -interpolate write it): Chen & Goodman (1998), "An Empirical Study of Smoothing
Techniques for Language Modeling", TR-10-98, sections 2.7 and 3 (https://dash.harvard.edu/handle/1/25104739).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.lm_decoder import BeamSettings
from ..core.registry import CARD_FILE, version_file, write_card
from ..core.text import normalize_text

log = logging.getLogger(__name__)

LEXICON_FILE = "lexicon.txt"
LM_FILE = "lm.arpa"
COUNTS_FILE = "lm_counts.tsv.gz"
DECODER_TYPE = "lexicon-lm"
WORD_END = "|"
"""The lexicon's word-boundary token: the model's word separator (" " in its vocabulary)."""
SENTENCE_START, SENTENCE_END, UNKNOWN_WORD = "<s>", "</s>", "<unk>"
NO_PROBABILITY_LOG10 = -99.0
"""ARPA's log10 probability of <s>: a context, never predicted."""
_DISCOUNT_FALLBACK = (0.5, 1.0, 1.5)
"""D1, D2, D3+ when an order's count-of-counts cannot estimate them (tiny texts: some n_k is 0)."""


@dataclass(frozen=True)
class DecoderSettings(BeamSettings):
    """card["decoder"]: the server's beam-search knobs (tuned on corpus/dev) plus how the LM is estimated."""

    order: int = 2
    """n of the n-gram LM."""
    adapt_count_weight: int = 5
    """Each sentence of adaptation text (corrections) counts this many times when a child re-estimates."""

    def __post_init__(self) -> None:
        if self.order < 1:
            raise ValueError(f"order must be >= 1 (got {self.order}); 2 or 3 fit a few thousand sentences")
        if self.beam_size < 1 or self.beam_size_token < 1:
            raise ValueError("beam_size and beam_size_token must be >= 1")
        if self.adapt_count_weight < 1:
            raise ValueError(f"adapt_count_weight must be >= 1 (got {self.adapt_count_weight})")


# --- counting and estimation -------------------------------------------------------------------


def sentence_counts(texts: Iterable[str], weight: int = 1) -> Counter[str]:
    """Normalized, non-empty sentences -> how often each occurs (times `weight`)."""
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = normalize_text(text)
        if normalized:
            counts[normalized] += weight
    return counts


def _ngram_counts(sentences: Counter[str], order: int) -> list[Counter[tuple[str, ...]]]:
    """Raw counts of every n-gram, n = 1..order, over "<s> words </s>" (index n-1 holds order n)."""
    counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order)]
    for sentence, count in sentences.items():
        words = (SENTENCE_START, *sentence.split(), SENTENCE_END)
        for n in range(1, order + 1):
            for i in range(len(words) - n + 1):
                counts[n - 1][words[i : i + n]] += count
    return counts


def _adjusted_counts(raw: list[Counter[tuple[str, ...]]]) -> list[Counter[tuple[str, ...]]]:
    """Kneser-Ney's counts: the highest order keeps raw counts; a lower-order n-gram counts the distinct
    words seen before it (its continuation count), unless it starts with <s> (nothing can precede it)."""
    order = len(raw)
    adjusted = [Counter() for _ in range(order)]
    adjusted[-1] = Counter(raw[-1])
    for n in range(order - 1, 0, -1):
        for gram in raw[n]:
            adjusted[n - 1][gram[1:]] += 1
        for gram, count in raw[n - 1].items():
            if gram[0] == SENTENCE_START:
                adjusted[n - 1][gram] = count
    del adjusted[0][(SENTENCE_START,)]  # <s> is never predicted
    return adjusted


def _discounts(counts: Counter[tuple[str, ...]]) -> tuple[float, float, float]:
    """Modified KN discounts D1, D2, D3+ from the count-of-counts n1..n4 (Chen & Goodman eq. 26)."""
    n = Counter(min(c, 5) for c in counts.values())
    try:
        y = n[1] / (n[1] + 2 * n[2])
        d = (1 - 2 * y * n[2] / n[1], 2 - 3 * y * n[3] / n[2], 3 - 4 * y * n[4] / n[3])
    except ZeroDivisionError:
        return _DISCOUNT_FALLBACK
    if not all(0 < dk < k for k, dk in enumerate(d, start=1)):
        return _DISCOUNT_FALLBACK
    return d


@dataclass(frozen=True)
class NgramLM:
    """An estimated LM: per order, n-gram -> (log10 probability, log10 backoff weight)."""

    orders: list[dict[tuple[str, ...], tuple[float, float]]]

    def to_arpa(self) -> str:
        out = io.StringIO()
        out.write("\\data\\\n")
        for n, grams in enumerate(self.orders, start=1):
            out.write(f"ngram {n}={len(grams)}\n")
        for n, grams in enumerate(self.orders, start=1):
            out.write(f"\n\\{n}-grams:\n")
            highest = n == len(self.orders)
            for gram in sorted(grams):
                logp, bow = grams[gram]
                line = f"{logp:.6f}\t{' '.join(gram)}"
                out.write(line + "\n" if highest else f"{line}\t{bow:.6f}\n")
        out.write("\n\\end\\\n")
        return out.getvalue()


def estimate_lm(sentences: Counter[str], order: int) -> NgramLM:
    """Interpolated modified Kneser-Ney over sentence counts, in backoff form.

    p(w|h) = (a(hw) - D(a(hw))) / a(h•) + gamma(h) p(w|h'),  gamma(h) = sum_k D_k N_k(h•) / a(h•)
    with a the adjusted counts, h' h without its first word, and the unigrams interpolated with the
    uniform distribution over the vocabulary (<unk> included). A seen n-gram stores the interpolated
    p(w|h); an unseen one backs off through gamma(h), which is exactly the interpolated value.
    """
    if not sentences:
        raise ValueError("no text to estimate a language model from; pass at least one non-empty sentence")
    adjusted = _adjusted_counts(_ngram_counts(sentences, order))
    vocabulary = {g[0] for g in adjusted[0]} | {UNKNOWN_WORD}
    probabilities: list[dict[tuple[str, ...], float]] = []
    backoffs: list[dict[tuple[str, ...], float]] = [{} for _ in range(order)]
    for n in range(1, order + 1):
        counts = adjusted[n - 1]
        d1, d2, d3 = _discounts(counts)
        context_total: defaultdict[tuple[str, ...], float] = defaultdict(float)
        context_types: defaultdict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0, 0])
        for gram, count in counts.items():
            context_total[gram[:-1]] += count
            context_types[gram[:-1]][min(count, 3) - 1] += 1
        gamma = {h: (d1 * k[0] + d2 * k[1] + d3 * k[2]) / context_total[h] for h, k in context_types.items()}
        probs: dict[tuple[str, ...], float] = {}
        for gram, count in counts.items():
            h = gram[:-1]
            discounted = (count - (d1, d2, d3)[min(count, 3) - 1]) / context_total[h]
            lower = 1.0 / len(vocabulary) if n == 1 else _backed_off(probabilities, backoffs, gram[1:])
            probs[gram] = discounted + gamma[h] * lower
        if n == 1:
            probs[(UNKNOWN_WORD,)] = probs.get((UNKNOWN_WORD,), 0.0) + gamma[()] / len(vocabulary)
        probabilities.append(probs)
        if n > 1:
            backoffs[n - 2] = dict(gamma)
    orders = []
    for n in range(1, order + 1):
        grams = {g: (math.log10(p), math.log10(backoffs[n - 1].get(g, 1.0)) if n < order else 0.0)
                 for g, p in probabilities[n - 1].items()}
        if n == 1:
            grams[(SENTENCE_START,)] = (NO_PROBABILITY_LOG10, math.log10(backoffs[0].get((SENTENCE_START,), 1.0))
                                        if order > 1 else 0.0)
        orders.append(grams)
    return NgramLM(orders)


def _backed_off(probabilities: list[dict], backoffs: list[dict], gram: tuple[str, ...]) -> float:
    """p(w|h) from the orders estimated so far: the stored value, or gamma(h) * p(w|h') when unseen."""
    weight = 1.0
    while gram:
        p = probabilities[len(gram) - 1].get(gram)
        if p is not None:
            return weight * p
        weight *= backoffs[len(gram) - 2].get(gram[:-1], 1.0) if len(gram) > 1 else 1.0
        gram = gram[1:]
    return weight * probabilities[0][(UNKNOWN_WORD,)]


# --- files -------------------------------------------------------------------------------------


def lexicon_text(words: Iterable[str]) -> str:
    """One word a line with its spelling, characters then the word boundary: "it's i t ' s |"."""
    return "".join(f"{w} {' '.join(w)} {WORD_END}\n" for w in sorted(set(words)))


def write_counts(sentences: Counter[str], path: Path) -> None:
    """"count<TAB>sentence" lines, most frequent first; gzip without a timestamp, so equal text hashes equal."""
    body = "".join(f"{c}\t{s}\n" for s, c in sorted(sentences.items(), key=lambda x: (-x[1], x[0])))
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(body.encode())


def read_counts(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    with gzip.open(path, "rt") as f:
        for line_number, line in enumerate(f, start=1):
            count, _, sentence = line.rstrip("\n").partition("\t")
            if not sentence or not count.isdigit():
                raise ValueError(f"{path}:{line_number}: expected 'count<TAB>sentence'")
            counts[sentence] += int(count)
    return counts


def write_decoder_files(sentences: Counter[str], out_dir: Path, order: int) -> dict[str, Path]:
    """lexicon.txt, lm.arpa and lm_counts.tsv.gz for `sentences` in out_dir; name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lm = estimate_lm(sentences, order)
    words = [g[0] for g in lm.orders[0] if g[0] not in (SENTENCE_START, SENTENCE_END, UNKNOWN_WORD)]
    files = {LEXICON_FILE: out_dir / LEXICON_FILE, LM_FILE: out_dir / LM_FILE, COUNTS_FILE: out_dir / COUNTS_FILE}
    files[LEXICON_FILE].write_text(lexicon_text(words))
    files[LM_FILE].write_text(lm.to_arpa())
    write_counts(sentences, files[COUNTS_FILE])
    log.info("decoder files in %s: %d words, %s n-grams", out_dir, len(words),
             "/".join(str(len(g)) for g in lm.orders))
    return files


def decoder_section(settings: DecoderSettings, **extra) -> dict:
    """card["decoder"] for files written by write_decoder_files with `settings`."""
    return {"type": DECODER_TYPE, "lexicon": LEXICON_FILE, "lm": LM_FILE, "counts": COUNTS_FILE,
            **asdict(settings), **extra}


def decoder_card(parent_card: dict) -> dict | None:
    """The "decoder" section a child version copies from its parent (None: the parent decodes greedily)."""
    section = parent_card.get("decoder")
    if not section:
        return None
    # Provenance that describes the parent's files, not the child's, stays behind.
    child = {k: v for k, v in section.items() if k not in ("adapted_sentences", "source", "rebuild", "evaluation_note")}
    child["source"] = f"adapted from {parent_card.get('version', 'the parent')}"
    return child


def adapt_decoder_files(parent_version_dir: Path, texts: list[str], out_dir: Path) -> dict[str, Path]:
    """The parent's lexicon and LM re-estimated with `texts` added: the child version's decoder files.

    Each text counts DecoderSettings.adapt_count_weight times (the card's value). Words new to the
    lexicon become transcribable. Returns name -> path under out_dir; {} when the parent has no decoder.
    """
    parent_version_dir = Path(parent_version_dir)
    card = json.loads((parent_version_dir / CARD_FILE).read_text())
    section = card.get("decoder")
    if not section:
        return {}
    if section.get("type") != DECODER_TYPE:
        raise ValueError(f"{parent_version_dir}: decoder type {section.get('type')!r} cannot be adapted; "
                         f"only {DECODER_TYPE!r}")
    counts = read_counts(version_file(parent_version_dir, card, section.get("counts", COUNTS_FILE)))
    weight = int(section.get("adapt_count_weight", DecoderSettings.adapt_count_weight))
    counts.update(sentence_counts(texts, weight))
    return write_decoder_files(counts, Path(out_dir), int(section.get("order", DecoderSettings.order)))


def add_decoder_to_version(version_dir: Path, texts: Iterable[str], settings: DecoderSettings,
                           source: str) -> dict:
    """Build decoder files for a version directory in place and record them in its card (files + decoder)."""
    version_dir = Path(version_dir)
    card = json.loads((version_dir / CARD_FILE).read_text())
    write_decoder_files(sentence_counts(texts), version_dir, settings.order)
    card["decoder"] = decoder_section(settings, source=source)
    return write_card(version_dir, card, indent=2)  # re-hashes the directory, the new files with the rest


def manifest_texts(manifest: Path) -> list[str]:
    """The "text" of every row of a JSON-lines manifest."""
    return [json.loads(line)["text"] for line in manifest.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """python -m voxloop.trainer.lm VERSION_DIR --manifest corpus/train.jsonl: add decoder files to a version."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--manifest", type=Path, required=True, help="JSON-lines manifest whose texts train the LM")
    defaults = DecoderSettings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = DecoderSettings(**{name: getattr(args, name) for name in asdict(defaults)})
    card = add_decoder_to_version(args.version_dir, manifest_texts(args.manifest), settings,
                                  source=f"{args.manifest.name} transcripts")
    print(json.dumps(card["decoder"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
