"""Real human speech check: 21 recordings of people from Debian packages, for evaluation only.

    .venv/bin/python bench/real_speech.py --fetch data/real-speech          # apt-get download + dpkg -x
    .venv/bin/python bench/real_speech.py --data data/real-speech --server 127.0.0.1:50051   # via a server
    .venv/bin/python bench/real_speech.py --data data/real-speech --version-dir DIR          # offline

The clips (never trained on: the trainer reads only the synthetic corpus and user feedback):
- `alsa-utils`: /usr/share/sounds/alsa/{Front,Rear,Side}_{Left,Right,Center}.wav (8 clips, one speaker);
- `pocketsphinx-testdata`: five LibriVox "Sense and Sensibility" sentences, five playing-card commands,
  "go forward ten meters", "go somewhere and do something" and a TIDIGITS digit string (their
  references from the package's transcription files, pocketsphinx's own tests for the two commands).

`--server` streams each clip as `voxloop transcribe` does (RecognizerClient.transcribe_file) and
scores the finals; `--version-dir` decodes each clip offline as the server decodes finals
(evaluate.version_transcriber). Both use voxloop's normalizer on reference and hypothesis alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jiwer
import numpy as np
import soundfile as sf

PACKAGES = ("alsa-utils", "pocketsphinx-testdata")
ALSA_CLIPS = {f"{side}_{where}": f"{side.lower()} {where.lower()}"
              for side in ("Front", "Rear", "Side") for where in ("Left", "Right", "Center")
              if (side, where) != ("Side", "Center")}
POCKETSPHINX = "usr/share/pocketsphinx/test/data"
RAW_CLIPS = {"goforward.raw": "go forward ten meters", "something.raw": "go somewhere and do something",
             "tidigits/dhd.2934z.raw": "two nine three four zero"}


def _transcriptions(path: Path) -> dict[str, str]:
    """pocketsphinx's "<s> text </s> (id)" lines -> {id: text}."""
    out = {}
    for line in path.read_text().splitlines():
        text, _, clip = line.rpartition("(")
        out[clip.strip().rstrip(")")] = text.replace("<s>", "").replace("</s>", "").strip()
    return out


def fetch(out: Path) -> Path:
    """Download the two packages (without installing them), extract the clips as 16-bit WAVs, write manifest.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True, capture_output=True)
        tree = Path(tmp) / "tree"
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True)
        rows = []
        for name, text in ALSA_CLIPS.items():
            shutil.copyfile(tree / "usr/share/sounds/alsa" / f"{name}.wav", out / f"{name}.wav")
            rows.append((name, text))
        data = tree / POCKETSPHINX
        for folder, prefix in (("librivox", ""), ("cards", "card")):
            for clip, text in _transcriptions(data / folder / (
                    "transcription" if folder == "librivox" else "cards.transcription")).items():
                shutil.copyfile(data / folder / f"{clip}.wav", out / f"{prefix}{clip}.wav")
                rows.append((f"{prefix}{clip}", text))
        for raw, text in RAW_CLIPS.items():
            name = Path(raw).stem.split(".")[0]
            sf.write(out / f"{name}.wav", np.fromfile(data / raw, dtype="<i2"), 16000, subtype="PCM_16")
            rows.append((name, text))
    with (out / "manifest.jsonl").open("w") as f:
        for name, text in rows:
            f.write(json.dumps({"id": name, "path": f"{name}.wav", "text": text, "voice": "human"}) + "\n")
    print(f"{len(rows)} clips in {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch", type=Path, metavar="DIR", help="download and extract the clips into DIR")
    parser.add_argument("--data", type=Path, help="a directory --fetch made")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--server", help="HOST:PORT of a running voxloop server")
    source.add_argument("--version-dir", type=Path, help="a version directory to decode offline")
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    if args.fetch:
        fetch(args.fetch)
        if not (args.server or args.version_dir):
            return 0
    data = args.data or args.fetch
    if data is None or not (args.server or args.version_dir):
        parser.error("give --data (or --fetch) and --server or --version-dir")
    from voxloop.core.text import normalize_text

    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    if args.server:
        from voxloop.clients.client import RecognizerClient

        with RecognizerClient(args.server, token=args.token) as client:
            hypotheses = [client.transcribe_file(data / r["path"]).transcript for r in rows]
    else:
        from voxloop.trainer.evaluate import load_samples, version_transcriber

        transcribe = version_transcriber(args.version_dir)
        hypotheses = []
        for r in rows:
            hypotheses.append(transcribe(load_samples(data / r["path"])))
    references = [normalize_text(r["text"]) for r in rows]
    hypotheses = [normalize_text(h) for h in hypotheses]
    for r, ref, hyp in zip(rows, references, hypotheses, strict=True):
        mark = " " if ref == hyp else "x"
        print(f"{mark} {r['id']:<45} {hyp!r}" + ("" if ref == hyp else f"  (said: {ref!r})"))
    words = sum(len(r.split()) for r in references)
    print(f"WER {jiwer.wer(references, hypotheses):.1%} over {len(rows)} clips, {words} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
