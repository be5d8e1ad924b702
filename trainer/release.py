"""Turn a trained checkpoint into a registry version: ONNX export, parity, evaluation, model card.

`voxloop export` runs `build_release`; the shipped base model in `models/base/` is its output.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from ..core.registry import MODEL_FILE, write_card
from .data import read_manifest
from .evaluate import evaluate, onnx_transcriber
from .hf_import import HfCtcPolicy
from .policies import (
    Policy,
    check_policy_parity,
    export_policy,
    load_policy_dir,
    policy_card,
    policy_format,
    save_policy,
)

log = logging.getLogger(__name__)

POLICY_DIR = "policy"  # the torch weights the trainer starts from (save_pretrained layout)
EVAL_SPLITS = ("test", "test_heldout_espeak", "test_heldout_flite")


def evaluate_splits(onnx_path: Path, corpus_dir: Path, splits=EVAL_SPLITS, limit: int | None = None) -> dict:
    """WER/CER of the exported model on each test split present in the corpus, overall and per voice."""
    transcribe = onnx_transcriber(onnx_path)
    figures = {}
    for split in splits:
        manifest = corpus_dir / f"{split}.jsonl"
        if not manifest.exists():
            continue
        rows = read_manifest(manifest)[:limit]
        overall, per_voice, _ = evaluate(transcribe, rows, corpus_dir)
        figures[split] = {**overall.as_dict(), "per_voice": {v: s.as_dict() for v, s in per_voice.items()}}
        log.info("%s: WER %.3f CER %.3f (%d utterances)", split, overall.wer, overall.cer, overall.utterances)
    return figures


REBUILD_COMMANDS = (
    "voxloop pretrain corpus --out corpus --seed 0",
    "voxloop pretrain train --corpus corpus --out runs/base --epochs 10 --max-minutes 95 --threads 2",
    "voxloop export --checkpoint runs/base/best --out models/base --version VERSION --corpus corpus",
)


def training_summary(checkpoint_dir: Path) -> dict | None:
    """The run's config and per-epoch dev figures, when the checkpoint sits in a pretraining run dir."""
    run_dir = Path(checkpoint_dir).parent
    history, config = run_dir / "history.jsonl", run_dir / "pretrain_config.json"
    if not history.exists():
        return None
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    epochs = [r for r in rows if "epoch" in r]
    return {
        "config": json.loads(config.read_text()) if config.exists() else None,
        "steps": rows[-1].get("step") if rows else 0,
        "minutes": round(max((r.get("elapsed_s", 0) for r in rows), default=0) / 60, 1),
        "dev_curve": epochs,
    }


def build_release(
    checkpoint_dir: Path,
    out_dir: Path,
    version: str,
    *,
    corpus_dir: Path | None = None,
    parent_version: str | None = None,
    extra_card: dict | None = None,
    eval_limit: int | None = None,
) -> dict:
    """Export `checkpoint_dir` into `out_dir` as a complete version (model.onnx, policy/, card.json).

    Raises ParityError (and writes nothing) if the ONNX graph does not match torch.
    """
    model = load_policy_dir(checkpoint_dir).eval()
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        onnx_path = export_policy(model, staging / MODEL_FILE, version)
        parity = check_policy_parity(model, onnx_path)
        save_policy(model, staging / POLICY_DIR)
        card = {
            "version": version,
            "parent_version": parent_version,
            "format": policy_format(model),
            "model": policy_card(model),
            "parity": parity.as_dict(),
            "rebuild": ([f"voxloop export --checkpoint {checkpoint_dir} --out OUT --version {version}"]
                        if isinstance(model, HfCtcPolicy) else list(REBUILD_COMMANDS)),
            **(extra_card or {}),
        }
        if (training := training_summary(checkpoint_dir)) is not None:
            card["training"] = training
        if corpus_dir is not None:
            summary = corpus_dir / "corpus.json"
            if summary.exists():
                card["corpus"] = json.loads(summary.read_text())
            card["evaluation"] = evaluate_splits(onnx_path, corpus_dir, limit=eval_limit)
        card = write_card(staging, card, indent=2)  # the shipped models/base/card.json is indented by 2
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(staging, out_dir)
    log.info("release %s written to %s", version, out_dir)
    return card


def load_policy(version_dir: Path) -> Policy:
    """The torch policy of a registry version (what PPO fine-tunes and uses as its frozen reference)."""
    policy = version_dir / POLICY_DIR
    if not policy.is_dir():
        raise FileNotFoundError(f"{version_dir} has no {POLICY_DIR}/ (torch weights); re-export it")
    return load_policy_dir(policy)
