"""What one hop costs on this machine before any of mlx-relay's work: a bare gRPC stream
against a bare direct link (a TCP connection with the framing of ``mlx_relay.direct_link``).

    .venv/bin/python bench/link_floor.py                    # gaps 0.5, 5, 20 and 40 ms
    .venv/bin/python bench/link_floor.py --gaps 0 20 --round-trips 400

A child process serves one bidirectional gRPC stream (grpcio's asyncio API, as the workers
use) and one TCP port (an asyncio protocol, as the workers' direct links), both echoing
every message; this process writes a message the size of one decode step's hidden state
(576 float32 values, the bundled model's width), reads the echo, then waits ``gap`` ms
before the next, round by round over the gaps and the two transports in turn. Printed: the
median and 90th percentile round trip at each gap on each, and their ratio.

A decode step of one request through a 2-stage pipeline makes two such round trips (the
coordinator's call to stage 0, stage 0's call to stage 1, and their answers), each to a
process that has been idle for about a stage's compute: the round trip at a gap near that
compute time is the floor of the pipeline's added time per token on this machine, the time
an idle process takes to wake up for a message included.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc import aio

from mlx_relay.direct_link import FrameReader, frame, no_delay

SERVICE = "mlxrelay.bench.Echo"
HIDDEN_BYTES = 576 * 4
SERVE = "--serve"


def _same(message: bytes) -> bytes:
    return message


async def _echo(
    messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for message in messages:
        yield message


class _FrameEcho(asyncio.Protocol):
    """Echoes each frame of a TCP connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.reader = FrameReader(1 << 20)
        no_delay(transport)

    def data_received(self, data: bytes) -> None:
        for payload in self.reader.feed(data):
            self.transport.write(frame(payload))  # type: ignore[attr-defined]


class _FrameReply(asyncio.Protocol):
    """The caller's end: each echoed frame sets the waiting future."""

    def __init__(self) -> None:
        self.reader = FrameReader(1 << 20)
        self.waiting: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        no_delay(transport)

    def data_received(self, data: bytes) -> None:
        for payload in self.reader.feed(data):
            if self.waiting is not None and not self.waiting.done():
                self.waiting.set_result(payload)


async def serve(port_file: str) -> None:
    """Serve the echo stream and the TCP echo on free loopback ports; write both ports to
    ``port_file``."""
    server = aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.stream_stream_rpc_method_handler(
                _echo, request_deserializer=_same, response_serializer=_same
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tcp = await asyncio.get_running_loop().create_server(_FrameEcho, "127.0.0.1", 0)
    tcp_port = tcp.sockets[0].getsockname()[1]
    written = Path(port_file).with_suffix(".part")
    written.write_text(f"{port} {tcp_port}", encoding="utf-8")
    written.replace(port_file)  # the reader never sees a partial number
    await server.wait_for_termination()


async def measure(ports: list[int], gaps: list[float], round_trips: int, rounds: int) -> None:
    channel = aio.insecure_channel(f"127.0.0.1:{ports[0]}")
    call = channel.stream_stream(
        f"/{SERVICE}/Echo", request_serializer=_same, response_deserializer=_same
    )()
    loop = asyncio.get_running_loop()
    transport, reply = await loop.create_connection(_FrameReply, "127.0.0.1", ports[1])
    payload = bytes(HIDDEN_BYTES)

    async def on_stream() -> None:
        await call.write(payload)
        await call.read()

    async def on_link() -> None:
        reply.waiting = loop.create_future()
        transport.write(frame(payload))
        await reply.waiting

    ways = {"gRPC stream": on_stream, "direct link": on_link}
    for _ in range(200):  # the connections and both processes warm
        for way in ways.values():
            await way()
    times: dict[tuple[str, float], list[float]] = {(w, g): [] for w in ways for g in gaps}
    for round_ in range(rounds):
        for gap in gaps if round_ % 2 == 0 else list(reversed(gaps)):
            for i in range(round_trips // rounds):
                for name in list(ways) if i % 2 == 0 else list(reversed(ways)):
                    await asyncio.sleep(gap / 1000)
                    started = time.perf_counter()
                    await ways[name]()
                    times[name, gap].append(time.perf_counter() - started)
    await call.done_writing()
    await channel.close()
    transport.close()
    print(f"bare round trip between two processes, {HIDDEN_BYTES}-byte messages")
    print(
        f"{'idle gap before each':>22} {'gRPC stream median':>19} {'p90':>9} "
        f"{'direct link median':>19} {'p90':>9} {'ratio':>6}"
    )
    for gap in gaps:
        cells = []
        medians = []
        for name in ways:
            ordered = sorted(times[name, gap])
            medians.append(statistics.median(ordered))
            p90 = ordered[int(0.9 * (len(ordered) - 1))]
            cells.append(f"{1000 * medians[-1]:>16.3f} ms {1000 * p90:>6.3f} ms")
        print(f"{gap:>19.1f} ms {cells[0]} {cells[1]} {medians[0] / medians[1]:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.5, 5.0, 20.0, 40.0])
    parser.add_argument("--round-trips", type=int, default=600, help="per gap, in all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the gaps in turn")
    args = parser.parse_args()
    if args.round_trips < args.rounds:
        parser.error("--round-trips must be at least --rounds")
    with tempfile.TemporaryDirectory() as work:
        port_file = Path(work) / "port"
        child = subprocess.Popen([sys.executable, __file__, SERVE, str(port_file)])
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists():
                if child.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the echo server did not start")
                time.sleep(0.05)
            ports = [int(p) for p in port_file.read_text(encoding="utf-8").split()]
            asyncio.run(measure(ports, args.gaps, args.round_trips, args.rounds))
        finally:
            child.terminate()
            child.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == SERVE:
        asyncio.run(serve(sys.argv[2]))
    else:
        main()
