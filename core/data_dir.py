"""Where voxloop keeps its state: one data directory that `voxloop serve` and the trainer share.

    <data_dir>/feedback.sqlite3     the feedback store (STORE_FILE), unless store_path / store_url names another
    <data_dir>/registry/            the model registry (REGISTRY_SUBDIR), unless model_dir / registry_dir does
    <data_dir>/trainer/             the trainer's checkpoint, intent file and fallback corpus (TRAINER_SUBDIR)

ServerConfig.data_dir and TrainerConfig.data_dir default to DEFAULT_DATA_DIR; $VOXLOOP_HOME sets both.
"""

from __future__ import annotations

from pathlib import Path

HOME_ENV = "VOXLOOP_HOME"
DEFAULT_DATA_DIR = Path("~/.local/share/voxloop")
STORE_FILE = "feedback.sqlite3"
REGISTRY_SUBDIR = "registry"
TRAINER_SUBDIR = "trainer"

__all__ = ["DEFAULT_DATA_DIR", "HOME_ENV", "REGISTRY_SUBDIR", "STORE_FILE", "TRAINER_SUBDIR"]
