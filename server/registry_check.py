"""`voxloop models check`: the registry's state as an operator needs it, and the cleanup of crash leftovers.

Reads the registry directory itself (no server needed, so it works while no replica can start):
CURRENT and PIN, every version (with `verify`: every file's sha256), the refusals and whether they
still stand, the directories of versions/ that are not versions, and what crashed writers left
(`Registry.leftovers`). With `clean`, removes the leftovers whose writer is gone
(`Registry.clean_leftovers`: never a running publish's, never anything younger than a minute).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.registry import Leftover, Registry, RegistryError, VerificationError


@dataclass(frozen=True)
class VersionReport:
    version: str
    status: str
    """ok, refused (a standing refusal), lapsed (refused, but its files changed since: tried again), or
    broken (not readable as a version, or with `verify`, its files do not match its card)."""
    detail: str = ""


@dataclass(frozen=True)
class RegistryReport:
    root: Path
    current: str | None
    pin: str | None
    target: str | None
    """What every replica should serve now (Registry.target_version)."""
    problems: list[str] = field(default_factory=list)
    """State that cannot be read (CURRENT, PIN, history, a refusal record)."""
    versions: list[VersionReport] = field(default_factory=list)
    leftovers: list[Leftover] = field(default_factory=list)
    """What is left after cleaning (all of them without `clean`)."""
    removed: list[Leftover] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """Something to serve, nothing unreadable, no broken version, no dead leftover."""
        return (self.target is not None and not self.problems
                and all(v.status != "broken" for v in self.versions)
                and not any(leftover.removable for leftover in self.leftovers))

    def as_dict(self) -> dict:
        def leftover(item: Leftover) -> dict:
            return {"path": str(item.path.relative_to(self.root)), "kind": item.kind, "age_s": round(item.age_s, 1),
                    "live": item.live, "removable": item.removable}

        return {"registry": str(self.root), "healthy": self.healthy, "current": self.current, "pin": self.pin,
                "target": self.target, "problems": self.problems,
                "versions": [{"version": v.version, "status": v.status, "detail": v.detail} for v in self.versions],
                "leftovers": [leftover(item) for item in self.leftovers],
                "removed": [leftover(item) for item in self.removed]}


def _read(what: str, read, problems: list[str]):
    try:
        return read()
    except (RegistryError, OSError) as e:
        problems.append(f"{what}: {e}")
        return None


def check_registry(registry: Registry, *, verify: bool = False, clean: bool = False) -> RegistryReport:
    """The registry's state; with `verify`, every version's files are hashed; with `clean`, dead leftovers go."""
    problems: list[str] = []
    removed = registry.clean_leftovers() if clean else []
    current = _read("CURRENT", registry.current_version, problems)
    pin = _read("PIN", registry.pinned, problems)
    refusals = _read("refusals", registry.refusals, problems) or {}
    target = _read("target version", registry.target_version, problems)
    versions = []
    for version in registry.versions():
        refusal = refusals.get(version)
        if verify:
            try:
                registry.verify(version)
            except VerificationError as e:
                versions.append(VersionReport(version, "broken", f"{e.reason}: {e}"))
                continue
        if refusal is None:
            versions.append(VersionReport(version, "ok"))
        elif registry.stands(refusal):
            versions.append(VersionReport(version, "refused", f"{refusal.reason}: {refusal.detail} "
                                                              f"({refusal.by}, {refusal.at})"))
        else:
            versions.append(VersionReport(version, "lapsed", f"refused ({refusal.reason}) before its files changed; "
                                                             "it is tried again"))
    versions += [VersionReport(name, "broken", why) for name, why in sorted(registry.broken_versions().items())]
    if current is not None and current not in {v.version for v in versions}:
        problems.append(f"CURRENT names {current}, which is not a published version")
    return RegistryReport(registry.root, current, pin.version if pin else None, target, problems, versions,
                          registry.leftovers(), removed)


__all__ = ["RegistryReport", "VersionReport", "check_registry"]
