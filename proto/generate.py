"""Generate the voxloop.v1 Python stubs beside the .proto files.

    python proto/generate.py            # rewrite the committed stubs
    python proto/generate.py --check    # exit 1 if the committed stubs are stale

The stubs are committed so that `pip install voxloop` needs no protoc; tests/test_proto.py runs the
check, so a .proto edit without regeneration fails CI.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "voxloop" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run grpc_tools.protoc on every .proto under voxloop/v1, writing under out_root."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in (out_root / "voxloop" / "v1").iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the committed stubs are fresh")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [p.name for p in fresh if not (PACKAGE_DIR / p.name).exists()
                 or not filecmp.cmp(p, PACKAGE_DIR / p.name, shallow=False)]
        if args.check:
            if stale:
                print(f"stale generated stubs: {', '.join(stale)}; run: python proto/generate.py", file=sys.stderr)
                return 1
            return 0
        for p in fresh:
            shutil.copyfile(p, PACKAGE_DIR / p.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
