"""Shared fixtures: real (tiny, random-weight) models exported with the project's own code, toy data, ports.

Session-scoped fixtures are built once and read only; a test that changes one copies it first (tiny_registry).
Helpers that are not fixtures live in tests/support.py (free_port, wait_for) and the *_support.py modules.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

TINY_VERSION = "tiny-0001"
BASE_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "base"


@pytest.fixture(autouse=True, scope="session")
def _ctc_base_model_seeds_empty_registries():
    """A `voxloop serve` the tests start on an empty registry seeds it with the small CTC model (models/base):
    building the Whisper default costs a minute, so only the tests of that default (test_whisper_*) build it."""
    patch = pytest.MonkeyPatch()
    patch.setenv("VOXLOOP_SHIPPED_MODEL_DIR", str(BASE_MODEL_DIR))
    yield
    patch.undo()


def build_tiny_version(out_dir: Path, version: str, seed: int = 0) -> Path:
    """Export a tiny random-weight policy and publish it as `version` in a registry at out_dir."""
    import torch
    from voxloop.core.registry import Registry
    from voxloop.trainer.export import check_parity, export_onnx
    from voxloop.trainer.model import VoxloopCTCConfig, VoxloopForCTC

    torch.manual_seed(seed)
    model = VoxloopForCTC(VoxloopCTCConfig(num_layers=2, d_model=64, num_heads=2, ff_multiplier=2)).eval()
    onnx_path = export_onnx(model, out_dir / f".export-{version}" / "model.onnx", version)
    parity = check_parity(model, onnx_path)
    Registry(out_dir).publish(
        version,
        {"model.onnx": onnx_path},
        {"parent_version": None, "description": "tiny random-weight test model", "parity": parity.as_dict()},
    )
    shutil.rmtree(onnx_path.parent)
    return out_dir


@pytest.fixture(scope="session")
def tiny_registry_template(tmp_path_factory) -> Path:
    return build_tiny_version(tmp_path_factory.mktemp("registry-template"), TINY_VERSION)


@pytest.fixture
def tiny_registry(tiny_registry_template, tmp_path) -> Path:
    """A fresh registry (CURRENT = tiny-0001) that a test may modify."""
    root = tmp_path / "registry"
    shutil.copytree(tiny_registry_template, root)
    return root


@pytest.fixture(scope="session")
def voice_registry(tmp_path_factory) -> Path:
    """A registry serving a tiny policy that hears voiced sound as "a" and silence as the blank (server_support):
    speech and pauses the endpointer can see. Read only."""
    from server_support import build_voice_activity_version

    return build_voice_activity_version(tmp_path_factory.mktemp("voice-registry"))


@pytest.fixture(scope="session")
def tiny_version_dir(tmp_path_factory) -> Path:
    """A complete version directory (model.onnx, policy/, card.json) of a tiny random policy: one the trainer can
    start from (seed a registry with it). Read only."""
    from trainer_support import tiny_version

    return tiny_version(tmp_path_factory.mktemp("tiny") / TINY_VERSION, TINY_VERSION)


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> Path:
    """A base corpus of six tone "utterances" of the words a, b, c (trainer_support.tone): the trainer's replay
    pool (train) and anchor set (dev). Read only."""
    from trainer_support import tone, write_corpus

    rows = [(w, tone(w, seed=i)) for i, w in enumerate("abcabc")]
    return write_corpus(tmp_path_factory.mktemp("toy-corpus"), {"train": rows, "dev": rows[:3]})


@pytest.fixture(scope="module")
def bench(request):
    """The bench/ script the test module names in its BENCH_PATH, loaded as a module."""
    path = request.module.BENCH_PATH
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def whisper_version_dir(tmp_path_factory) -> Path:
    """The shipped Whisper default (whisper-tiny.en), built once per session the way `voxloop serve` builds it
    on first start: from the pinned package, the committed CTC head, export, parity and probe."""
    from voxloop.server.config import SHIPPED_MODEL_DIR
    from voxloop.trainer.whisper_import import shipped_version_dir

    return shipped_version_dir(SHIPPED_MODEL_DIR, tmp_path_factory.mktemp("whisper-shipped"), show_progress=False)


@pytest.fixture
def whisper_registry(whisper_version_dir, tmp_path) -> Path:
    """A fresh registry (CURRENT = the Whisper default) that a test may modify."""
    from voxloop.core.registry import Registry

    registry = Registry(tmp_path / "registry")
    registry.seed_from(whisper_version_dir)
    return registry.root


@pytest.fixture
def unused_port() -> int:
    """A local port nothing listens on (a server that is not there)."""
    from support import free_port

    return free_port()


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the session (tests/postgres_support.py); fails if none can start."""
    from postgres_support import PostgresServer

    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])  # a PostgreSQL server
def store_url(request, tmp_path) -> str:
    """A fresh, empty feedback store on each engine: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "data" / "feedback.sqlite")
    return request.getfixturevalue("postgres_server").create_database()
