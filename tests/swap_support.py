"""Helpers of the hot-swap tests: publish versions into a registry, wait for a server to serve one."""

from __future__ import annotations

import json
from pathlib import Path

from server_support import noise, pcm16
from voxloop.core.registry import CARD_FILE, Registry

TOKENS_TOML = """
[[tokens]]
token = "root-token"
tenant = "ops"
user = "root"
role = "operator"

[[tokens]]
token = "carol-token"
tenant = "acme"
user = "carol"
role = "admin"

[[tokens]]
token = "alice-token"
tenant = "acme"
user = "alice"
"""
ADMIN_TOKEN = "root-token"
"""The fleet operator's token (role "operator"): what model administration needs."""
OPERATOR_TOKEN = ADMIN_TOKEN
TENANT_ADMIN_TOKEN = "carol-token"
"""An admin of tenant acme (role "admin"): its own tenant's data, not the models."""
USER_TOKEN = "alice-token"


def publish_copy(registry_root: Path, source: Path | str, version: str, *, activate: bool = True,
                 parent: str | None = None, extra_card: dict | None = None,
                 replace: dict[str, Path] | None = None) -> Path:
    """Publish the files of version directory `source` (or a version name of this registry) as `version`.

    The card is re-hashed by Registry.publish; `replace` swaps in other files (e.g. a corrupt model.onnx).
    """
    registry = Registry(registry_root)
    source_dir = registry.version_dir(source) if isinstance(source, str) else Path(source)
    card = json.loads((source_dir / CARD_FILE).read_text())
    files = {name: source_dir / name for name in card["files"]}
    files.update(replace or {})
    kept = {k: v for k, v in card.items() if k not in ("files", "version", "created_at")}
    kept["parent_version"] = parent if parent is not None else card.get("version")
    kept.update(extra_card or {})
    return registry.publish(version, files, kept, activate=activate)


def audio_pcm(seconds: float, seed: int = 0) -> bytes:
    return pcm16(noise(seconds, seed))


__all__ = ["ADMIN_TOKEN", "OPERATOR_TOKEN", "TENANT_ADMIN_TOKEN", "TOKENS_TOML", "USER_TOKEN", "audio_pcm",
           "publish_copy"]
