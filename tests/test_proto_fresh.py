"""The checked-in gRPC code in gradprobe/v1/ is exactly what scripts/gen_proto.py makes from
proto/gradprobe/v1/*.proto. Regenerate with `python scripts/gen_proto.py` (`make proto`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lines that name the generator's own version: a newer grpcio-tools may write other numbers
# for the same schema, which is not staleness.
_VERSION_LINE = re.compile(
    r"^(# Protobuf Python Version: .*|\s+\d+,|GRPC_GENERATED_VERSION = .*)$", re.M)


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normalised(text: str) -> str:
    return _VERSION_LINE.sub("<version>", text)


def test_generated_code_is_fresh(tmp_path):
    generated = _load_generator().generate(tmp_path)
    assert generated, "no .proto files found"
    checked_in = sorted(p.relative_to(ROOT) for p in (ROOT / "gradprobe" / "v1").glob("*_pb2*.py*"))
    assert checked_in == generated, "generated file set differs: run python scripts/gen_proto.py"
    for rel in generated:
        fresh = _normalised((tmp_path / rel).read_text())
        assert _normalised((ROOT / rel).read_text()) == fresh, (
            f"{rel} is stale: run python scripts/gen_proto.py")


def test_generated_package_imports_as_gradprobe_v1():
    from gradprobe.v1 import service_pb2, service_pb2_grpc

    assert service_pb2.DESCRIPTOR.package == "gradprobe.v1"
    assert "Gradprobe" in service_pb2.DESCRIPTOR.services_by_name
    assert hasattr(service_pb2_grpc, "GradprobeStub")
