"""A cluster on the namespace topology (tests/support/netns.py), and the independent measures
its monitoring figures are checked against.

- :func:`cluster_file` writes the cluster file the README's several-machines recipe uses;
  :func:`start_worker` runs ``mlx-relay worker --config FILE --device-id ID`` on a host.
- :func:`tcp_echo_rtt`: round trips of a plain TCP echo server running on a host.
- :class:`MessageBytes`: serialized sizes of every message on the coordinator's channels,
  counted by a gRPC interceptor of the test's own, and of every frame on its direct links.
- :class:`ProcessReads`: psutil reads of a process and of the machine, taken every few ms
  in a thread, to bracket a sample the monitoring took at some instant.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil
import yaml

from mlx_relay.direct_link import HEADER
from tests.support.cluster import TEST_NETWORK
from tests.support.netns import Host, Topology

MLX_RELAY = str(Path(sys.executable).with_name("mlx-relay"))
WORKER_PORT = 50151  # every worker has a machine (namespace) of its own: same port for all

_ECHO_SERVER = r"""
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := conn.recv(65536):
    conn.sendall(data)
"""


def cluster_file(
    path: Path,
    net: Topology,
    model_dir: Path,
    coordinator_port: int,
    monitoring: dict[str, Any],
    *,
    network: dict[str, Any] | None = None,
) -> Path:
    """A cluster file: the coordinator's HTTP app on loopback, worker-i on host i, layers
    split evenly."""
    layers = 4 // len(net.hosts)
    devices: list[dict[str, Any]] = [{"id": "coordinator", "role": "coordinator"}]
    for i, host in enumerate(net.hosts):
        devices.append(
            {
                "id": f"worker-{i}",
                "role": "worker",
                "host": host.address,
                "port": WORKER_PORT,
                "layers": [i * layers, (i + 1) * layers],
            }
        )
    data = {
        "model": {"path": str(model_dir)},
        "devices": devices,
        "network": {**TEST_NETWORK, **(network or {})},
        "http": {"host": "127.0.0.1", "port": coordinator_port},
        "monitoring": monitoring,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class WorkerRun:
    device_id: str
    host: Host
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker(host: Host, config: Path, device_id: str, log_path: Path) -> WorkerRun:
    """``mlx-relay worker --config FILE --device-id ID`` on ``host``, as the README says."""
    with open(log_path, "wb") as log:
        process = host.popen(
            [MLX_RELAY, "worker", "--config", str(config), "--device-id", device_id],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return WorkerRun(device_id, host, process, log_path)


def wait_for_log(worker: WorkerRun, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.log():
        if worker.process.poll() is not None:
            raise AssertionError(f"{worker.device_id} exited: {worker.log()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{worker.device_id}: no {text!r} in {timeout:g} s")
        time.sleep(0.05)


def tcp_echo_rtt(host: Host, rounds: int = 300, size: int = 64) -> list[float]:
    """Round trips (seconds) of ``size``-byte messages to a TCP echo server on ``host``."""
    import socket

    server = host.popen(
        [sys.executable, "-c", _ECHO_SERVER, host.address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection((host.address, port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            payload = b"\x00" * size
            times = []
            for _ in range(rounds + 20):
                started = time.perf_counter()
                sock.sendall(payload)
                received = 0
                while received < size:
                    received += len(sock.recv(size))
                times.append(time.perf_counter() - started)
        return times[20:]  # the first round trips warm both ends up
    finally:
        server.kill()
        server.wait()


def median(values: list[float]) -> float:
    return statistics.median(values)


class _Counting(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, owner: MessageBytes, target: str) -> None:
        self.owner = owner
        self.target = target

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        call = await continuation(details, request)
        response = await call
        with self.owner.lock:
            self.owner.sent[self.target] += len(request.SerializeToString())
            self.owner.received[self.target] += len(response.SerializeToString())
        return response


class _CountingStreams(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Every message of a stream (``ForwardStream``: each call and each answer)."""

    def __init__(self, owner: MessageBytes, target: str) -> None:
        self.owner = owner
        self.target = target

    async def intercept_stream_stream(
        self, continuation: Callable[[Any, Any], Awaitable[Any]], details: Any, requests: Any
    ) -> Any:
        owner, target = self.owner, self.target

        async def counted_requests() -> AsyncIterator[Any]:
            async for request in requests:
                with owner.lock:
                    owner.sent[target] += len(request.SerializeToString())
                yield request

        call = await continuation(details, counted_requests())

        async def counted_responses() -> AsyncIterator[Any]:
            async for response in call:
                with owner.lock:
                    owner.received[target] += len(response.SerializeToString())
                yield response

        return counted_responses()


@dataclass
class MessageBytes:
    """Serialized request and response sizes of every successful unary call and of every
    message on a stream, per target."""

    sent: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    received: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, insecure_channel: Callable[..., Any]) -> Callable[..., Any]:
        """A drop-in ``grpc.aio.insecure_channel`` that adds this counter to each channel."""

        def channel(target: str, options: Any = None, compression: Any = None,
                    interceptors: Any = None) -> Any:  # fmt: skip
            chain = [*(interceptors or []), _Counting(self, target), _CountingStreams(self, target)]
            return insecure_channel(target, options, compression, chain)

        return channel

    def wrap_link(
        self, open_link: Callable[..., Awaitable[Any]], grpc_port: int
    ) -> Callable[..., Awaitable[Any]]:
        """A drop-in ``mlx_relay.direct_link.open_link`` whose links count the payload of
        every frame written and read after the hello, under the worker's gRPC target
        (``host:grpc_port``): a call's ``ForwardCall`` and its ``ForwardAnswer``, as on a
        stream."""

        async def opened(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
            link = await open_link(host, port, *args, **kwargs)
            target = f"{host}:{grpc_port}"
            protocol = link._protocol  # the connection itself, not what the link records
            write, feed = protocol.transport.write, protocol.reader.feed

            def counted_write(data: bytes) -> None:
                with self.lock:
                    self.sent[target] += len(data) - HEADER.size  # one frame a write
                write(data)

            def counted_feed(data: bytes) -> list[bytes]:
                frames = feed(data)
                with self.lock:
                    self.received[target] += sum(len(f) for f in frames)
                return frames

            protocol.transport.write = counted_write
            protocol.reader.feed = counted_feed
            return link

        return opened

    def totals(self, target: str) -> tuple[int, int]:
        with self.lock:
            return self.sent[target], self.received[target]


@dataclass
class Read:
    at: float  # unix seconds, the clock the snapshot's sampled_at uses
    rss: int
    cpu_seconds: float
    memory_used: int
    cpu_busy: float
    cpu_total: float


class ProcessReads:
    """psutil reads of process ``pid`` and of the machine every ``spacing`` seconds."""

    def __init__(self, pid: int, spacing: float = 0.01) -> None:
        self.process = psutil.Process(pid)
        self.spacing = spacing
        self.reads: list[Read] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessReads:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            times = psutil.cpu_times()
            idle = times.idle + getattr(times, "iowait", 0.0)
            busy = (
                sum(times) - idle - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
            )
            own = self.process.cpu_times()
            memory = psutil.virtual_memory()
            self.reads.append(
                Read(
                    at=time.time(),
                    rss=self.process.memory_info().rss,
                    cpu_seconds=own.user + own.system,
                    memory_used=memory.total - memory.available,
                    cpu_busy=busy,
                    cpu_total=busy + idle,
                )
            )
            self._stop.wait(self.spacing)

    def covering(self, start: float, end: float) -> list[Read]:
        """The reads from the last one at or before ``start`` to the first at or after
        ``end`` (unix seconds)."""
        first = max((i for i, r in enumerate(self.reads) if r.at <= start), default=None)
        last = min((i for i, r in enumerate(self.reads) if r.at >= end), default=None)
        if first is None or last is None:
            raise AssertionError(f"no reads around {start}..{end} ({len(self.reads)} reads)")
        return self.reads[first : last + 1]
