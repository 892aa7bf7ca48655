"""The committed generated code must be exactly what the .proto files produce."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "proto" / "p2v" / "v1"


def _generate(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(out)


def test_generated_code_matches_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    _generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    committed = sorted(p.relative_to(REPO / "proto") for p in GENERATED.glob("*_pb2*.py*"))
    assert fresh == committed, "generated file set differs: run python proto/generate.py"
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (REPO / "proto" / rel).read_bytes(), (
            f"{rel} is stale: run python proto/generate.py and commit the result")


def test_grpc_tools_pinned_to_grpcio():
    from importlib.metadata import version

    import grpc

    assert version("grpcio-tools") == grpc.__version__
