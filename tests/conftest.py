"""Shared fixtures: real (tiny, random-weight) models exported with the project's own code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_VERSION = "tiny-0001"


def build_tiny_version(out_dir: Path, version: str, seed: int = 0) -> Path:
    """Export a tiny random-weight policy and publish it as `version` in a registry at out_dir."""
    import torch
    from voxloop.server.registry import Registry
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
def postgres_server():
    """A throwaway PostgreSQL server for the session (tests/postgres_support.py); fails if none can start."""
    from postgres_support import PostgresServer

    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A fresh, empty feedback store on each engine: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "data" / "feedback.sqlite")
    return request.getfixturevalue("postgres_server").create_database()
