"""The model registry: a directory of immutable versions and a CURRENT pointer (docs/model-format.md).

Shared by the server (reads, verifies, seeds) and the trainer (publishes). Every write that another
process may read is atomic: write a temporary file, fsync, rename, fsync the directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
CARD_FILE = "card.json"
MODEL_FILE = "model.onnx"
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HASH_BLOCK_BYTES = 1 << 20


class RegistryError(RuntimeError):
    """The registry is missing, inconsistent, or a version fails verification."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def validate_version(version: str) -> str:
    if not VERSION_PATTERN.match(version):
        raise RegistryError(
            f"invalid version id {version!r}: use 1-128 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return version


class Registry:
    """A registry rooted at `root`: `versions/<v>/{model.onnx, card.json}` and `CURRENT`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def versions_root(self) -> Path:
        return self.root / VERSIONS_DIR

    def version_dir(self, version: str) -> Path:
        return self.versions_root / validate_version(version)

    def versions(self) -> list[str]:
        """Published versions, oldest first (by the card's created_at)."""
        if not self.versions_root.is_dir():
            return []
        found = [p.name for p in self.versions_root.iterdir() if (p / CARD_FILE).is_file()]
        return sorted(found, key=lambda v: (self.load_card(v).get("created_at", ""), v))

    def current_version(self) -> str | None:
        try:
            text = (self.root / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return validate_version(text) if text else None

    def load_card(self, version: str) -> dict:
        path = self.version_dir(version) / CARD_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as e:
            raise RegistryError(f"version {version!r} has no {CARD_FILE} in {self.versions_root}") from e
        except json.JSONDecodeError as e:
            raise RegistryError(f"{path} is not valid JSON: {e}") from e

    def verify(self, version: str) -> dict:
        """Check every file the card lists against its sha256; return the card."""
        card = self.load_card(version)
        files = card.get("files") or {}
        if MODEL_FILE not in files:
            raise RegistryError(f"card of {version!r} lists no {MODEL_FILE}")
        for name, expected in files.items():
            path = self.version_dir(version) / name
            if not path.is_file():
                raise RegistryError(f"version {version!r} is missing {name}")
            actual = sha256_file(path)
            if actual != expected:
                raise RegistryError(
                    f"version {version!r}: {name} has sha256 {actual[:12]}…, card says {expected[:12]}…"
                )
        return card

    def activate(self, version: str) -> None:
        """Point CURRENT at an existing, verified version (atomic)."""
        self.verify(version)
        atomic_write_text(self.root / CURRENT_FILE, version + "\n")
        log.info("registry %s: CURRENT -> %s", self.root, version)

    def publish(self, version: str, files: dict[str, Path], card: dict, *, activate: bool = True) -> Path:
        """Copy `files` into a new immutable version with its card (sha256 of each file added).

        The version directory is assembled under a temporary name and renamed into place, so a
        half-written version is never visible; publishing an existing version is an error.
        """
        target = self.version_dir(version)
        if target.exists():
            raise RegistryError(f"version {version!r} already exists; published versions are immutable")
        self.versions_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.versions_root, prefix=f".{version}."))
        try:
            hashes = {}
            for name, source in files.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, staging / name)
                hashes[name] = sha256_file(staging / name)
            full_card = {
                "version": version,
                "created_at": datetime.now(UTC).isoformat(),
                **card,
                "files": hashes,
            }
            (staging / CARD_FILE).write_text(json.dumps(full_card, indent=2, sort_keys=True) + "\n")
            for path in staging.rglob("*"):
                if path.is_file():
                    with path.open("rb") as f:
                        os.fsync(f.fileno())
            os.rename(staging, target)
            _fsync_dir(self.versions_root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("registry %s: published %s", self.root, version)
        if activate:
            self.activate(version)
        return target

    def seed_from(self, shipped_version_dir: Path) -> str:
        """Publish a shipped version (e.g. models/base) into an empty registry and activate it."""
        card = json.loads((shipped_version_dir / CARD_FILE).read_text())
        version = card["version"]
        if version not in self.versions():
            files = {name: shipped_version_dir / name for name in card["files"]}
            kept = {k: v for k, v in card.items() if k not in ("files",)}
            self.publish(version, files, kept, activate=False)
        if self.current_version() is None:
            self.activate(version)
        return version
