"""The committed generated modules match what relay.proto generates (run `make proto`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlx_relay.proto.generate import PROTO_DIR, generate

# Where the generated code names the versions of the tools that wrote it (grpcio-tools within
# pyproject.toml's range, its protoc): a newer patch release writes other numbers there and
# nothing else. The committed files carry the range's lowest grpcio, the runtime they need.
TOOL_VERSIONS = (
    re.compile(r"GRPC_GENERATED_VERSION = '[^']*'"),
    re.compile(r"# Protobuf Python Version: \S+"),
    re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,[\d,\s]+"),
)


def without_tool_versions(code: str) -> str:
    for stamp in TOOL_VERSIONS:
        code = stamp.sub("<tool version>", code)
    return code


def test_generated_code_matches_relay_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a dev dependency")
    fresh = generate(tmp_path)
    assert [p.name for p in fresh] == ["relay_pb2.py", "relay_pb2.pyi", "relay_pb2_grpc.py"]
    stale = [
        p.name
        for p in fresh
        if without_tool_versions(p.read_text())
        != without_tool_versions((PROTO_DIR / p.name).read_text())
    ]
    assert not stale, f"{', '.join(stale)} out of date with relay.proto: run `make proto`"


def test_only_the_tool_versions_are_left_out_of_the_comparison() -> None:
    committed = (PROTO_DIR / "relay_pb2_grpc.py").read_text()
    assert without_tool_versions(committed) != committed
    assert without_tool_versions(committed.replace("1.85.1", "1.85.4")) == without_tool_versions(
        committed
    )
    changed = committed.replace("ForwardStream", "ForwardStreams", 1)
    assert without_tool_versions(changed) != without_tool_versions(committed)
