"""The network's own round trip to a worker, without process wake-up or RPC handling in it.

A Ping RPC's round trip holds two processes waking up and running a gRPC call; on a fast
link that is nearly all of it. A TCP handshake is answered by the worker machine's kernel
(the SYN-ACK needs no process to run), so the time from SYN to SYN-ACK is the path's round
trip. On Linux the kernel measures exactly that and reports it as ``tcpi_rtt`` of the new
socket (``TCP_INFO``, microseconds); elsewhere the time ``connect()`` takes is used, which
adds this process's own wake-up after the SYN-ACK. Each probe opens a few connections to
the worker's gRPC port one after the other and keeps the minimum, closing each at once (the
server sees a connection that ends before any request).
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any

from mlx_relay.coordinator.client import WorkerTimedOut
from mlx_relay.core.errors import WorkerUnavailable

HANDSHAKES = 3
# struct tcp_info (linux/tcp.h): 8 one-byte fields, then 32-bit fields of which tcpi_rtt is
# the 16th (after rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets, four
# last_* times, pmtu, rcv_ssthresh).
_TCP_INFO_HEAD = struct.Struct("=8B16I")
_RTT_FIELD = 8 + 15
METHOD_TCP_INFO = "tcp_info"
METHOD_CONNECT = "tcp_connect"


@dataclass(frozen=True)
class LinkRtt:
    """One probe's result: the network round trip in seconds and how it was measured."""

    seconds: float
    method: str


def _kernel_rtt(sock: socket.socket) -> float | None:
    if sys.platform != "linux" or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_HEAD.size)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_HEAD.size:
        return None
    rtt_us = _TCP_INFO_HEAD.unpack(raw)[_RTT_FIELD]
    return rtt_us / 1e6 if rtt_us > 0 else None


def _handshake(family: int, sockaddr: Any, timeout: float) -> LinkRtt:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        started = time.perf_counter()
        sock.connect(sockaddr)
        connect_seconds = time.perf_counter() - started
        kernel = _kernel_rtt(sock)
    if kernel is not None:
        return LinkRtt(kernel, METHOD_TCP_INFO)
    return LinkRtt(connect_seconds, METHOD_CONNECT)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) as host and port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def probe_rtt(
    device_id: str, address: str, *, timeout: float, handshakes: int = HANDSHAKES
) -> LinkRtt:
    """The smallest round trip of ``handshakes`` TCP handshakes with ``address``. Blocking.

    Raises:
        WorkerUnavailable: no handshake completed within ``timeout`` seconds, or refused.
    """
    host, port = split_address(address)
    try:
        # Resolved before any timing: a name lookup is no part of the round trip.
        family, sockaddr, best = _first_answering(host, port, timeout)
        for _ in range(handshakes - 1):
            result = _handshake(family, sockaddr, timeout)
            if result.seconds < best.seconds:
                best = result
    except TimeoutError:
        raise WorkerTimedOut(
            device_id, f"TCP probe of {address}: no answer within {timeout:g} s"
        ) from None
    except OSError as exc:
        raise WorkerUnavailable(device_id, f"TCP probe of {address} failed: {exc}") from None
    return best


def _first_answering(host: str, port: int, timeout: float) -> tuple[int, Any, LinkRtt]:
    # Like gRPC, try each address the name resolves to (e.g. ::1, then 127.0.0.1).
    error: OSError = OSError(f"{host} resolves to no address")
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        try:
            return family, sockaddr, _handshake(family, sockaddr, timeout)
        except OSError as exc:
            error = exc
    raise error
