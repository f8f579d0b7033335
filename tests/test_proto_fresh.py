"""The committed generated modules match what relay.proto generates (run `make proto`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_relay.proto.generate import PROTO_DIR, generate


def test_generated_code_matches_relay_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a dev dependency")
    fresh = generate(tmp_path)
    assert [p.name for p in fresh] == ["relay_pb2.py", "relay_pb2.pyi", "relay_pb2_grpc.py"]
    stale = [p.name for p in fresh if p.read_bytes() != (PROTO_DIR / p.name).read_bytes()]
    assert not stale, f"{', '.join(stale)} out of date with relay.proto: run `make proto`"
