"""The committed voxloop.v1 stubs are what the .proto files generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_are_fresh():
    result = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_package_is_importable_as_voxloop_without_a_bare_server_module():
    import voxloop.server
    import voxloop.v1.recognizer_pb2

    assert Path(voxloop.server.__file__).parent.name == "server"
    assert voxloop.v1.recognizer_pb2.DESCRIPTOR.package == "voxloop.v1"
    probe = subprocess.run([sys.executable, "-c", "import server"], capture_output=True, text=True, cwd="/")
    assert probe.returncode != 0
