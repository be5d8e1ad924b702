"""The model registry: a directory of immutable versions and a CURRENT pointer (docs/model-format.md).

Shared by the server (reads, verifies, seeds) and the trainer (publishes). Every write that another
process may read is atomic: write a temporary file, fsync, rename, fsync the directory.

Beside the versions, the registry holds the state every server replica must agree on, so that a
fleet watching one directory converges without talking to each other:
- `refused/<version>.json`: a version a server refused (bad sha256, unloadable, failed warm-up) or an
  admin rolled back; no replica serves it, and no watcher retries it in a loop;
- `PIN`: automatic activation is stopped; every replica serves the pinned version;
- `history.json`: every change of CURRENT (who, when, why), newest last: what Rollback goes back along.
Read-modify-write of the history happens under an advisory lock (`.lock`, flock), so a trainer
publishing and an admin rolling back at the same time both land in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from .limits import preview

log = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
CARD_FILE = "card.json"
MODEL_FILE = "model.onnx"
REFUSED_DIR = "refused"
PIN_FILE = "PIN"
HISTORY_FILE = "history.json"
LOCK_FILE = ".lock"
HISTORY_LIMIT = 256
"""Most CURRENT changes kept in history.json (rollback never needs to walk further back)."""
ROLLED_BACK = "rolled_back"
"""The refusal reason of a version an admin rolled back from."""
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A version id, matched with fullmatch (a `$` would also accept a trailing newline)."""
MAX_VERSION_CHARS = 128
HASH_BLOCK_BYTES = 1 << 20


class RegistryError(RuntimeError):
    """The registry is missing, inconsistent, or a version fails verification."""


class VerificationError(RegistryError):
    """A version's files do not match its card; `reason` (missing_file, sha256, card) is a metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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


def this_process() -> str:
    """Who wrote a registry record: host:pid (a replica, a trainer, an admin's call)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class Refusal:
    """A version no replica may serve (`refused/<version>.json`)."""

    version: str
    reason: str
    """Low-cardinality cause: missing_file, sha256, load, warmup, probe_mismatch or rolled_back."""
    detail: str
    """What exactly failed, for the operator."""
    at: str
    """ISO 8601 UTC time of the refusal."""
    by: str
    """host:pid of the process that refused it (or the admin call that rolled it back)."""


@dataclass(frozen=True)
class Pin:
    """Automatic activation is stopped: every replica serves `version` until it is unpinned."""

    version: str
    at: str
    by: str


@dataclass(frozen=True)
class Activation:
    """One change of CURRENT, as history.json records it."""

    version: str
    action: str
    """publish, activate, rollback or seed."""
    at: str
    by: str


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        shown = preview(version) if isinstance(version, str) else type(version).__name__
        raise RegistryError(
            f"invalid version id {shown}: use 1-{MAX_VERSION_CHARS} letters, digits, '.', '_' or '-', "
            "starting alphanumeric"
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
        try:
            card = self.load_card(version)
        except RegistryError as e:
            raise VerificationError("card", str(e)) from e
        files = card.get("files") or {}
        if MODEL_FILE not in files:
            raise VerificationError("card", f"card of {version!r} lists no {MODEL_FILE}")
        for name, expected in files.items():
            path = self.version_dir(version) / name
            if not path.is_file():
                raise VerificationError("missing_file", f"version {version!r} is missing {name}")
            actual = sha256_file(path)
            if actual != expected:
                raise VerificationError(
                    "sha256", f"version {version!r}: {name} has sha256 {actual[:12]}…, card says {expected[:12]}…"
                )
        return card

    def activate(self, version: str, *, action: str = "activate", by: str | None = None) -> None:
        """Point CURRENT at an existing, verified version (atomic) and record the change in the history.

        CURRENT is written before the history: a crash in between leaves a history that lacks the
        newest entry, which rollback tolerates (it walks back from what is serving).
        """
        self.verify(version)
        with self._locked():
            atomic_write_text(self.root / CURRENT_FILE, version + "\n")
            entries = [*self.history(), Activation(version, action, _now(), by or this_process())]
            document = [asdict(e) for e in entries[-HISTORY_LIMIT:]]
            atomic_write_text(self.root / HISTORY_FILE, json.dumps(document, indent=1) + "\n")
        log.info("registry %s: CURRENT -> %s (%s)", self.root, version, action)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive advisory lock on the registry's shared state (history read-modify-write)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def history(self) -> list[Activation]:
        """Every recorded change of CURRENT, oldest first (the last HISTORY_LIMIT)."""
        try:
            document = json.loads((self.root / HISTORY_FILE).read_text())
        except FileNotFoundError:
            return []
        except json.JSONDecodeError as e:  # written atomically: only a hand edit gets here
            raise RegistryError(f"{self.root / HISTORY_FILE} is not valid JSON: {e}") from e
        return [Activation(**entry) for entry in document]

    # --- refusals: versions no replica serves ---

    def _refusal_path(self, version: str) -> Path:
        return self.root / REFUSED_DIR / f"{validate_version(version)}.json"

    def refuse(self, version: str, reason: str, detail: str, *, by: str | None = None) -> Refusal:
        """Mark `version` refused for every replica (atomic; a second refusal replaces the first)."""
        refusal = Refusal(version, reason, detail, _now(), by or this_process())
        atomic_write_text(self._refusal_path(version), json.dumps(asdict(refusal), indent=1) + "\n")
        log.warning("registry %s: version %s refused (%s): %s", self.root, version, reason, detail)
        return refusal

    def refusal(self, version: str) -> Refusal | None:
        try:
            return Refusal(**json.loads(self._refusal_path(version).read_text()))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, TypeError) as e:
            raise RegistryError(f"{self._refusal_path(version)} is not a refusal record: {e}") from e

    def refusals(self) -> dict[str, Refusal]:
        folder = self.root / REFUSED_DIR
        if not folder.is_dir():
            return {}
        found = (self.refusal(p.stem) for p in folder.glob("*.json") if VERSION_PATTERN.fullmatch(p.stem))
        return {r.version: r for r in found if r is not None}

    def clear_refusal(self, version: str) -> bool:
        """Let `version` be served again (an admin's explicit decision); True if it was refused."""
        path = self._refusal_path(version)
        if not path.exists():
            return False
        path.unlink()
        _fsync_dir(path.parent)
        log.info("registry %s: refusal of %s cleared", self.root, version)
        return True

    # --- pin: stop automatic activation ---

    def pin(self, version: str, *, by: str | None = None) -> Pin:
        """Every replica serves `version` (verified) and ignores CURRENT until unpin()."""
        self.verify(version)
        pin = Pin(version, _now(), by or this_process())
        atomic_write_text(self.root / PIN_FILE, json.dumps(asdict(pin), indent=1) + "\n")
        log.info("registry %s: pinned to %s", self.root, version)
        return pin

    def unpin(self) -> Pin | None:
        """Resume automatic activation (CURRENT is served again); returns the pin that was removed."""
        pin = self.pinned()
        if pin is not None:
            (self.root / PIN_FILE).unlink(missing_ok=True)
            _fsync_dir(self.root)
            log.info("registry %s: unpinned (was %s)", self.root, pin.version)
        return pin

    def pinned(self) -> Pin | None:
        try:
            return Pin(**json.loads((self.root / PIN_FILE).read_text()))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, TypeError) as e:
            raise RegistryError(f"{self.root / PIN_FILE} is not a pin record: {e}") from e

    # --- what every replica should serve ---

    def target_version(self) -> str | None:
        """The version replicas should serve: the pin, else CURRENT, else (CURRENT refused) the last good one.

        A refused version is never the target: while CURRENT names one, the fleet keeps serving the
        newest version of the history that is not refused.
        """
        pin = self.pinned()
        if pin is not None:
            return pin.version
        current = self.current_version()
        refused = self.refusals()
        if current is not None and current not in refused:
            return current
        good = [a.version for a in self.history() if a.version not in refused and self._published(a.version)]
        return good[-1] if good else None

    def previous_version(self, serving: str) -> str | None:
        """What Rollback from `serving` goes back to: the newest other version of the history, not refused."""
        refused = self.refusals()
        for activation in reversed(self.history()):
            version = activation.version
            if version != serving and version not in refused and self._published(version):
                return version
        return None

    def _published(self, version: str) -> bool:
        return (self.version_dir(version) / CARD_FILE).is_file()

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
            self.activate(version, action="publish")
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
            self.activate(version, action="seed")
        return version
