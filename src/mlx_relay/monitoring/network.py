"""Recording of links to peers: network round trips, Ping RPC round trips and the RPC
overhead between the two, RPC outcomes, message bytes, transfer time.

See docs/monitoring-api.md ("Link figures") for what each figure measures and its error bound.

The peer, method and code labels are bounded by the cluster (a few devices, a few methods,
the gRPC status names); caps below keep memory bounded even if a caller misbehaves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from mlx_relay.monitoring.snapshot import (
    LINK_OUTCOMES,
    LinkMetrics,
    NetworkMetrics,
    RpcMethodMetrics,
)
from mlx_relay.monitoring.windows import (
    NETWORK_RPC_BUCKETS,
    NETWORK_RTT_BUCKETS,
    Histogram,
    SampleWindow,
)

MAX_PEERS = 64
MAX_METHODS_PER_PEER = 16
MAX_CODES_PER_METHOD = 20
OTHER = "other"
_TIMEOUT_CODES = frozenset({"DEADLINE_EXCEEDED"})


def rpc_outcome(code: str) -> str:
    """Map a gRPC status name to the link outcome: ok, timeout or error."""
    if code == "OK":
        return "ok"
    return "timeout" if code in _TIMEOUT_CODES else "error"


class _Link:
    __slots__ = (
        "last_error",
        "last_error_at",
        "last_ok_at",
        "overhead",
        "overhead_histogram",
        "overhead_last",
        "ping_rtt",
        "ping_rtt_last",
        "ping_total",
        "receive_bytes",
        "requests_total",
        "rtt",
        "rtt_histogram",
        "rtt_last",
        "rtt_method",
        "rtt_unavailable_reason",
        "transfer",
        "transfer_histogram",
        "transmit_bytes",
    )

    def __init__(self, window_size: int, retention_seconds: float) -> None:
        self.rtt_last: float | None = None
        self.rtt = SampleWindow(window_size, retention_seconds)
        self.rtt_histogram = Histogram(NETWORK_RTT_BUCKETS)
        self.rtt_method: str | None = None
        self.rtt_unavailable_reason: str | None = "not probed yet"
        self.ping_rtt_last: float | None = None
        self.ping_rtt = SampleWindow(window_size, retention_seconds)
        self.overhead_last: float | None = None
        self.overhead = SampleWindow(window_size, retention_seconds)
        self.overhead_histogram = Histogram(NETWORK_RPC_BUCKETS)
        self.ping_total = dict.fromkeys(LINK_OUTCOMES, 0)
        self.requests_total = dict.fromkeys(LINK_OUTCOMES, 0)
        self.transmit_bytes = 0
        self.receive_bytes = 0
        self.transfer = SampleWindow(window_size, retention_seconds)
        self.transfer_histogram = Histogram(NETWORK_RPC_BUCKETS)
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_ok_at: float | None = None


class _Method:
    __slots__ = ("handled", "histogram")

    def __init__(self) -> None:
        self.handled: dict[str, int] = {}
        self.histogram = Histogram(NETWORK_RPC_BUCKETS)


class NetworkRecorder:
    """State behind :class:`NetworkMetrics`; owned by the collector."""

    def __init__(
        self,
        device_id: str,
        lock: threading.Lock,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        *,
        retention_seconds: float,
        window_size: int = 256,
    ) -> None:
        self._device_id = device_id
        self._lock = lock
        self._clock = clock
        self._wall_clock = wall_clock
        self._retention = retention_seconds
        self._window_size = window_size
        self._links: dict[str, _Link] = {}
        self._methods: dict[tuple[str, str], _Method] = {}

    def _link(self, peer: str) -> _Link:
        link = self._links.get(peer)
        if link is None:
            if len(self._links) >= MAX_PEERS:
                peer = OTHER
                link = self._links.get(peer)
            if link is None:
                link = self._links[peer] = _Link(self._window_size, self._retention)
        return link

    def _method(self, peer: str, method: str) -> _Method:
        entry = self._methods.get((peer, method))
        if entry is None:
            known = sum(1 for p, _ in self._methods if p == peer)
            if known >= MAX_METHODS_PER_PEER:
                method = OTHER
            entry = self._methods.setdefault((peer, method), _Method())
        return entry

    def add_peer(self, peer: str) -> None:
        """Create a peer's series with zero values so they exist before the first call."""
        with self._lock:
            self._link(peer)

    def record_ping(
        self, peer: str, rtt_seconds: float | None, error: str | None, timeout: bool
    ) -> None:
        now = self._clock()
        wall = self._wall_clock()
        with self._lock:
            link = self._link(peer)
            if rtt_seconds is not None and error is None and not timeout:
                link.ping_total["ok"] += 1
                link.ping_rtt_last = rtt_seconds
                link.ping_rtt.add(now, rtt_seconds)
                link.last_ok_at = wall
            else:
                link.ping_total["timeout" if timeout else "error"] += 1
                link.last_error = error or ("ping timed out" if timeout else "ping failed")
                link.last_error_at = wall

    def record_network_rtt(
        self,
        peer: str,
        rtt_seconds: float | None,
        method: str | None,
        error: str | None,
        ping_rtt_seconds: float | None,
    ) -> None:
        now = self._clock()
        with self._lock:
            link = self._link(peer)
            if rtt_seconds is None:
                link.rtt_unavailable_reason = error or "probe failed"
                return
            link.rtt_last = rtt_seconds
            link.rtt.add(now, rtt_seconds)
            link.rtt_histogram.observe(rtt_seconds)
            link.rtt_method = method
            link.rtt_unavailable_reason = None
            if ping_rtt_seconds is not None:
                overhead = max(0.0, ping_rtt_seconds - rtt_seconds)
                link.overhead_last = overhead
                link.overhead.add(now, overhead)
                link.overhead_histogram.observe(overhead)

    def record_rpc(
        self, peer: str, method: str, seconds: float, code: str, sent: int, received: int
    ) -> None:
        wall = self._wall_clock()
        outcome = rpc_outcome(code)
        with self._lock:
            link = self._link(peer)
            link.requests_total[outcome] += 1
            link.transmit_bytes += sent
            link.receive_bytes += received
            if outcome == "ok":
                link.last_ok_at = wall
            else:
                link.last_error = f"{method}: {code}"
                link.last_error_at = wall
            entry = self._method(peer, method)
            if code not in entry.handled and len(entry.handled) >= MAX_CODES_PER_METHOD:
                code = OTHER
            entry.handled[code] = entry.handled.get(code, 0) + 1
            entry.histogram.observe(seconds)

    def record_transfer(self, peer: str, seconds: float) -> None:
        now = self._clock()
        with self._lock:
            link = self._link(peer)
            link.transfer.add(now, seconds)
            link.transfer_histogram.observe(seconds)

    def snap(self) -> NetworkMetrics:
        now = self._clock()
        with self._lock:
            links = [
                LinkMetrics(
                    device=self._device_id,
                    peer=peer,
                    rtt_last_seconds=link.rtt_last,
                    rtt=link.rtt.summary(now),
                    rtt_histogram=link.rtt_histogram.snap(),
                    rtt_method=link.rtt_method,
                    rtt_unavailable_reason=link.rtt_unavailable_reason,
                    ping_rtt_last_seconds=link.ping_rtt_last,
                    ping_rtt=link.ping_rtt.summary(now),
                    rpc_overhead_last_seconds=link.overhead_last,
                    rpc_overhead=link.overhead.summary(now),
                    rpc_overhead_histogram=link.overhead_histogram.snap(),
                    ping_total=dict(link.ping_total),
                    requests_total=dict(link.requests_total),
                    transmit_bytes_total=link.transmit_bytes,
                    receive_bytes_total=link.receive_bytes,
                    transfer_duration_seconds=link.transfer_histogram.snap(),
                    transfer=link.transfer.summary(now),
                    last_error=link.last_error,
                    last_error_timestamp=link.last_error_at,
                    last_ok_timestamp=link.last_ok_at,
                )
                for peer, link in sorted(self._links.items())
            ]
            rpc = [
                RpcMethodMetrics(
                    peer=peer,
                    method=method,
                    handled_total=dict(entry.handled),
                    handling_seconds=entry.histogram.snap(),
                )
                for (peer, method), entry in sorted(self._methods.items())
            ]
        return NetworkMetrics(links=links, rpc=rpc)
