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

What a crash can leave behind never blocks listing, activation or training: entries of `versions/`
that are not versions (a publish's staging directory `.<version>.<random>.staging` and its lock
file, a directory without a readable card) are skipped, and `leftovers()` / `clean_leftovers()`
(`voxloop models check --clean`) name and remove the ones whose writer is gone: a publish holds an
flock on its lock file while it runs, so a live one is never touched.

A file a card names is read only if it is listed in the card's `files` (so its sha256 is verified)
and stays inside the version directory (`version_file`).

A refusal records a fingerprint of the version's files (size, mtime, inode): when the files change
(restored from a backup, re-copied) the refusal lapses and the version is tried again. A read error
(EIO on a shared volume) is not a refusal at all: `ReadFailed`, retried later.
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
import time
from collections.abc import Collection, Iterator
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
STAGING_SUFFIX = ".staging"
"""A publish assembles `versions/.<version>.<random>.staging/` and renames it to `versions/<version>/`."""
PUBLISH_LOCK_SUFFIX = ".lock"
"""...holding an flock on `versions/.<version>.<random>.lock` until the rename is durable."""
LEFTOVER_GRACE_S = 60.0
"""Nothing younger is cleaned: covers the instant between creating a publish's lock file and locking it,
and an atomic write's temporary file (milliseconds)."""
UNLOCKED_STAGING_GRACE_S = 3600.0
"""A staging directory without its lock file (left by an older voxloop) is cleaned only this long after
anything in it last changed."""


class RegistryError(RuntimeError):
    """The registry is missing, inconsistent, or a version fails verification."""


class VerificationError(RegistryError):
    """A version's files do not match its card; `reason` (missing_file, sha256, card) is a metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ReadFailed(VerificationError):
    """A version's file could not be read (an I/O error, not a verdict on its content): never a refusal,
    since a flaky volume would otherwise make every replica refuse a good version for good."""

    def __init__(self, message: str):
        super().__init__("io", message)


def safe_file_name(name: object) -> str:
    """A file name a card may use: a relative path below the version directory ("model.onnx",
    "policy/config.json"); raises VerificationError("card") for anything else (absolute, "..", empty parts)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise VerificationError("card", f"card file name {preview(str(name))} is not a relative path")
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise VerificationError("card", f"card file name {preview(name)} leaves the version directory")
    return name


def _confined(version_dir: Path, name: str) -> Path:
    """version_dir / name, provided it stays inside version_dir with symlinks resolved."""
    path = version_dir / safe_file_name(name)
    if not path.resolve().is_relative_to(version_dir.resolve()):
        raise VerificationError("card", f"card file {preview(name)} resolves outside its version directory")
    return path


def version_file(version_dir: Path, card: dict, name: object) -> Path:
    """The path of a file the card names (a decoder file, a probe, a graph...), checked before anyone reads it:
    listed in card["files"] (so `Registry.verify` checked its sha256) and inside the version directory.

    Raises VerificationError("card") otherwise.
    """
    safe_file_name(name)
    files = card.get("files")
    if not isinstance(files, dict) or name not in files:
        raise VerificationError("card", f"the card names {preview(str(name))} but does not list it in its files "
                                        "(its sha256 would go unchecked)")
    return _confined(Path(version_dir), name)


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


def write_card(directory: Path, card: dict, *, indent: int = 1) -> dict:
    """Finish a version directory: hash every file in it (card.json aside) into card["files"] and write card.json
    atomically; returns the card.

    The one way a version directory is built (`voxloop export`, the trainer's candidates): `Registry.publish`
    copies such a directory's files in, `Registry.verify` checks the hashes."""
    directory = Path(directory)
    card = {**card, "files": {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*"))
                              if p.is_file() and p.name != CARD_FILE}}
    atomic_write_text(directory / CARD_FILE, json.dumps(card, indent=indent, sort_keys=True, default=str) + "\n")
    return card


def _newest_mtime(path: Path) -> float:
    """The latest mtime of `path` and, for a directory, of anything below it (0 when it is gone)."""
    try:
        newest = path.lstat().st_mtime
        if path.is_dir():
            for child in path.rglob("*"):
                with contextlib.suppress(OSError):
                    newest = max(newest, child.lstat().st_mtime)
        return newest
    except OSError:
        return 0.0


def _is_locked(lock_file: Path) -> bool:
    """Whether a live process holds an flock on `lock_file` (a publish in progress)."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without flock: only the age tells
        return False
    finally:
        os.close(fd)  # releases our lock, if we got it
    return False


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
    fingerprint: str | None = None
    """`Registry.fingerprint` of the version's files when it was refused; None (rolled back, or an older
    record): the refusal holds until cleared."""


@dataclass(frozen=True)
class Pin:
    """Automatic activation is stopped: every replica serves `version` until it is unpinned."""

    version: str
    at: str
    by: str


@dataclass(frozen=True)
class Leftover:
    """Something a crashed writer left in the registry: not a version, never read as one."""

    path: Path
    kind: str
    """staging (a publish's unfinished version directory), publish_lock (its lock file) or temporary (an
    atomic write's temporary file)."""
    age_s: float
    """Seconds since anything in it last changed."""
    live: bool
    """Its writer still runs (holds the publish lock): never cleaned."""
    grace_s: float = LEFTOVER_GRACE_S
    """How old it must be before it is cleaned (longer for a staging directory without a lock file)."""

    @property
    def removable(self) -> bool:
        return not self.live and self.age_s >= self.grace_s


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
        """Published versions, oldest first (by the card's created_at).

        Only directories named like a version with a readable card: a publish's staging directory, a
        directory whose card is missing or unreadable (`broken_versions`) is skipped, so one bad entry
        never stops listing, activation or training.
        """
        return [version for version, _ in self.version_cards()]

    def version_cards(self) -> list[tuple[str, dict]]:
        """(version, card) of every published version, oldest first (what versions() lists)."""
        cards, _ = self._scan_versions()
        return sorted(cards.items(), key=lambda item: (str(item[1].get("created_at", "")), item[0]))

    def broken_versions(self) -> dict[str, str]:
        """Directories of versions/ named like a version that cannot be read as one -> why."""
        return self._scan_versions()[1]

    def _scan_versions(self) -> tuple[dict[str, dict], dict[str, str]]:
        cards: dict[str, dict] = {}
        broken: dict[str, str] = {}
        if not self.versions_root.is_dir():
            return cards, broken
        for path in self.versions_root.iterdir():
            if path.name.startswith(".") or not path.is_dir():
                continue  # leftovers of a publish (leftovers()), not versions
            if not VERSION_PATTERN.fullmatch(path.name):
                broken[path.name] = "its name is not a version id"
                continue
            if not (path / CARD_FILE).exists():
                broken[path.name] = f"it has no {CARD_FILE}"
                continue
            try:
                card = self.load_card(path.name)
            except (RegistryError, OSError) as e:
                broken[path.name] = str(e)
                continue
            if not isinstance(card, dict):
                broken[path.name] = f"its {CARD_FILE} is not a JSON object"
                continue
            cards[path.name] = card
        return cards, broken

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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RegistryError(f"{path} is not valid JSON: {e}") from e

    def verify(self, version: str) -> dict:
        """Check every file the card lists against its sha256; return the card.

        Every listed name must stay inside the version directory (no absolute paths, no "..", no
        symlink out). Raises VerificationError (missing_file, sha256, card), ReadFailed (an I/O error).
        """
        try:
            card = self.load_card(version)
        except RegistryError as e:
            raise VerificationError("card", str(e)) from e
        except OSError as e:
            raise ReadFailed(f"version {version!r}: reading {CARD_FILE} failed: {e}") from e
        files = card.get("files") if isinstance(card, dict) else None
        if not isinstance(files, dict):
            raise VerificationError("card", f"card of {version!r} has no files {{name: sha256}}")
        if MODEL_FILE not in files:
            raise VerificationError("card", f"card of {version!r} lists no {MODEL_FILE}")
        version_dir = self.version_dir(version)
        paths = {name: _confined(version_dir, name) for name in files}  # every name before any read
        for name, expected in files.items():
            path = paths[name]
            if not path.is_file():
                raise VerificationError("missing_file", f"version {version!r} is missing {name}")
            try:
                actual = sha256_file(path)
            except OSError as e:
                raise ReadFailed(f"version {version!r}: reading {name} failed: {e}") from e
            if actual != expected:
                raise VerificationError(
                    "sha256", f"version {version!r}: {name} has sha256 {actual[:12]}…, card says {str(expected)[:12]}…"
                )
        return card

    def fingerprint(self, version: str) -> str:
        """A digest of the identity (size, mtime, inode) of the version's card and of every file it lists:
        it changes when any of them is rewritten or replaced, without reading their contents."""
        version_dir = self.version_dir(version)
        names = [CARD_FILE]
        try:
            files = self.load_card(version).get("files")
            if isinstance(files, dict):
                names += sorted(str(name) for name in files)
        except (RegistryError, OSError, AttributeError):
            pass  # an unreadable card: its own identity is the fingerprint
        digest = hashlib.sha256()
        for name in names:
            try:
                stat = _confined(version_dir, name).stat()
                digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}\n".encode())
            except (OSError, VerificationError):
                digest.update(f"{name}\0unreadable\n".encode())
        return digest.hexdigest()[:16]

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

    def refuse(self, version: str, reason: str, detail: str, *, by: str | None = None,
               fingerprint: str | None = None) -> Refusal:
        """Mark `version` refused for every replica (atomic; a second refusal replaces the first).

        Unless it is a rollback, the refusal records the version's fingerprint (`fingerprint`, taken
        before the failed load, or now): it lapses when the files change.
        """
        if reason != ROLLED_BACK and fingerprint is None:
            fingerprint = self.fingerprint(version)
        refusal = Refusal(version, reason, detail, _now(), by or this_process(),
                          None if reason == ROLLED_BACK else fingerprint)
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
        """Every refusal record, lapsed ones included (see standing_refusals)."""
        folder = self.root / REFUSED_DIR
        if not folder.is_dir():
            return {}
        found = (self.refusal(p.stem) for p in folder.glob("*.json") if VERSION_PATTERN.fullmatch(p.stem))
        return {r.version: r for r in found if r is not None}

    def stands(self, refusal: Refusal) -> bool:
        """Whether a refusal still holds: a rollback always does; a failed verification or load only while
        the version's files are as they were when it failed (restored files are tried again)."""
        return refusal.fingerprint is None or refusal.fingerprint == self.fingerprint(refusal.version)

    def standing_refusals(self) -> dict[str, Refusal]:
        """The refusals no replica may serve past (refusals() without the lapsed ones)."""
        return {version: r for version, r in self.refusals().items() if self.stands(r)}

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

    def target_version(self, exclude: Collection[str] = ()) -> str | None:
        """The version replicas should serve: the pin, else CURRENT, else (CURRENT refused) the last good one.

        A refused version (standing refusal) is never the target: while CURRENT names one, the fleet
        keeps serving the newest version of the history that is not refused. `exclude`: versions this
        process cannot read right now (treated like refused ones, but only here).
        """
        pin = self.pinned()
        if pin is not None:
            return pin.version
        current = self.current_version()
        refused = set(self.standing_refusals()) | set(exclude)
        if current is not None and current not in refused:
            return current
        good = [a.version for a in self.history() if a.version not in refused and self._published(a.version)]
        return good[-1] if good else None

    def previous_version(self, serving: str) -> str | None:
        """What Rollback from `serving` goes back to: the newest other version of the history, not refused."""
        refused = self.standing_refusals()
        for activation in reversed(self.history()):
            version = activation.version
            if version != serving and version not in refused and self._published(version):
                return version
        return None

    def _published(self, version: str) -> bool:
        return (self.version_dir(version) / CARD_FILE).is_file()

    def publish(self, version: str, files: dict[str, Path], card: dict, *, activate: bool = True) -> Path:
        """Copy `files` into a new immutable version with its card (sha256 of each file added).

        The version directory is assembled under a temporary name (`.<version>.<random>.staging`) and
        renamed into place, so a half-written version is never visible; publishing an existing version
        is an error. The publish holds an flock on `.<version>.<random>.lock` until the rename is
        durable: a process killed at any step leaves a leftover that `clean_leftovers` can tell is dead.
        """
        target = self.version_dir(version)
        if target.exists():
            raise RegistryError(f"version {version!r} already exists; published versions are immutable")
        for name in files:
            safe_file_name(name)
        self.versions_root.mkdir(parents=True, exist_ok=True)
        with self._publishing(version) as staging:
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
        log.info("registry %s: published %s", self.root, version)
        if activate:
            self.activate(version, action="publish")
        return target

    @contextlib.contextmanager
    def _publishing(self, version: str) -> Iterator[Path]:
        """A fresh staging directory for `version`, with its publish lock held; removed if the body fails."""
        fd, lock_name = tempfile.mkstemp(dir=self.versions_root, prefix=f".{version}.", suffix=PUBLISH_LOCK_SUFFIX)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            staging = Path(lock_name[: -len(PUBLISH_LOCK_SUFFIX)] + STAGING_SUFFIX)
            staging.mkdir()
            try:
                yield staging
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        finally:
            Path(lock_name).unlink(missing_ok=True)  # after the rename (or the cleanup): nothing left to guard
            os.close(fd)

    # --- leftovers of crashed writers ---

    def leftovers(self) -> list[Leftover]:
        """What crashed writers left: publishes' staging directories and lock files, atomic writes' temporary
        files. None of it is read as a version or as state; `clean_leftovers` removes the dead ones."""
        found: list[Leftover] = []
        now = time.time()
        for folder in (self.versions_root, self.root, self.root / REFUSED_DIR):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if not path.name.startswith(".") or path.name == LOCK_FILE:
                    continue
                if folder == self.versions_root and path.is_dir():
                    lock = path.with_suffix(PUBLISH_LOCK_SUFFIX)
                    has_lock = path.suffix == STAGING_SUFFIX and lock.exists()
                    found.append(Leftover(path, "staging", now - _newest_mtime(path), has_lock and _is_locked(lock),
                                          LEFTOVER_GRACE_S if has_lock else UNLOCKED_STAGING_GRACE_S))
                elif folder == self.versions_root and path.suffix == PUBLISH_LOCK_SUFFIX:
                    found.append(Leftover(path, "publish_lock", now - _newest_mtime(path), _is_locked(path)))
                elif path.is_file():
                    found.append(Leftover(path, "temporary", now - _newest_mtime(path), False))
        # Staging directories before the lock files that guard them (a removed lock would make its
        # directory look like an older voxloop's).
        return sorted(found, key=lambda leftover: (leftover.kind != "staging", str(leftover.path)))

    def clean_leftovers(self) -> list[Leftover]:
        """Remove the leftovers whose writer is gone (not locked, older than the grace period); returns them."""
        removed = []
        for leftover in self.leftovers():
            if not leftover.removable:
                continue
            if leftover.kind == "staging":
                shutil.rmtree(leftover.path, ignore_errors=True)
            else:
                leftover.path.unlink(missing_ok=True)
            log.info("registry %s: removed %s %s (%.0f s old)", self.root, leftover.kind, leftover.path.name,
                     leftover.age_s)
            removed.append(leftover)
        if removed:
            _fsync_dir(self.versions_root if self.versions_root.is_dir() else self.root)
        return removed

    def seed_from(self, shipped_version_dir: Path) -> str:
        """Publish a shipped version (e.g. models/base) into an empty registry and activate it."""
        card = json.loads((shipped_version_dir / CARD_FILE).read_text())
        version = card["version"]
        if version not in self.versions():
            files = {name: _confined(Path(shipped_version_dir), name) for name in card["files"]}
            kept = {k: v for k, v in card.items() if k not in ("files",)}
            self.publish(version, files, kept, activate=False)
        if self.current_version() is None:
            self.activate(version, action="seed")
        return version
