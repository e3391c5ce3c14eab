"""Generate the Python gRPC code in gradprobe/v1/ from proto/gradprobe/v1/*.proto.

The one command (also `make proto`):  python scripts/gen_proto.py
Generated files are never edited by hand; tests/test_proto_fresh.py fails when they are stale.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PACKAGE = Path("gradprobe") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) with `-I proto`, writing gradprobe/v1/*_pb2*.py(i) under
    `out_root`; return the written files relative to `out_root`."""
    import grpc_tools
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE).glob("*_pb2*.py*"))


def main() -> int:
    target = ROOT / PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        written = generate(Path(tmp))
        for stale in target.glob("*_pb2*.py*"):
            stale.unlink()
        for rel in written:
            (ROOT / rel).write_bytes((Path(tmp) / rel).read_bytes())
            print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
