"""The network round-trip probe: TCP handshakes with a real listening socket."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from mlx_relay.coordinator.link_probe import (
    METHOD_CONNECT,
    METHOD_TCP_INFO,
    probe_rtt,
    split_address,
)
from mlx_relay.core.errors import WorkerUnavailable


def test_probe_measures_a_handshake_with_a_listening_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        started = time.perf_counter()
        result = probe_rtt("w0", address, timeout=2.0)
        elapsed = time.perf_counter() - started
    assert result.method == (METHOD_TCP_INFO if sys.platform == "linux" else METHOD_CONNECT)
    # The kernel's estimate (or one connect) is part of what three handshakes took in all.
    assert 0 < result.seconds < elapsed


def test_probe_of_a_closed_port_is_a_typed_error_naming_the_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    with pytest.raises(WorkerUnavailable, match=f"TCP probe of 127.0.0.1:{port} failed"):
        probe_rtt("w0", f"127.0.0.1:{port}", timeout=2.0)


def test_split_address() -> None:
    assert split_address("10.0.0.2:50051") == ("10.0.0.2", 50051)
    assert split_address("[::1]:7") == ("::1", 7)
    assert split_address("worker.local:1") == ("worker.local", 1)


def test_probe_of_a_host_name_resolves_it_first() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        result = probe_rtt("w0", f"localhost:{server.getsockname()[1]}", timeout=2.0)
    assert result.seconds > 0
