"""The dependency rules of design.md, checked on the source: server -> core <- trainer, and a client library
that imports no heavy dependency.

Every import statement counts, at module level or inside a function (a lazy import is still a dependency),
relative ones resolved against their package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"core": "voxloop.core", "server": "voxloop.server", "trainer": "voxloop.trainer",
            "clients": "voxloop.clients"}

FORBIDDEN = {
    "core": ("voxloop.server", "voxloop.trainer", "voxloop.clients"),
    "server": ("voxloop.trainer", "voxloop.clients"),
    "trainer": ("voxloop.server",),
}
"""Package folder -> the packages none of its modules may import. No exceptions: the trainer composes no
server code (the CLI, voxloop.clients.cli, is the composition root that wires both)."""


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module `path` imports (absolute names; `from x import y` counts x and x.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def violations(folder: str) -> list[str]:
    package = PACKAGES[folder]
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for module in sorted(imported_modules(path, package)):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[folder]):
                bad.append(f"{folder}/{path.name} imports {module}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_module_imports_a_package_its_layer_may_not(folder):
    assert violations(folder) == []


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from ..trainer.cycle import run_cycle\n\ndef f():\n    import voxloop.trainer.loop\n")
    assert {"voxloop.trainer.cycle", "voxloop.trainer.loop"} <= imported_modules(module, "voxloop.server")


BLOCKED = ("torch", "torchaudio", "onnxruntime", "numpy", "soundfile", "voxloop.server", "voxloop.trainer",
           "voxloop.core")
CLIENT_WITH_HEAVY_PACKAGES_BLOCKED = f"""
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            raise ImportError(f"{{name}} is blocked: the client library must not import it")
        return None

sys.meta_path.insert(0, Blocker())
import voxloop.clients
from voxloop.clients.client import RecognizerClient, recognition_config
config = recognition_config(16000, interim_results=True)
with RecognizerClient("127.0.0.1:1", timeout=1) as client:
    pass
print("ok", config.sample_rate_hz)
"""


def test_the_client_library_imports_and_runs_with_torch_onnxruntime_and_numpy_blocked():
    run = subprocess.run([sys.executable, "-c", CLIENT_WITH_HEAVY_PACKAGES_BLOCKED], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["ok", "16000"]
