"""What one hop costs on this machine before any of mlx-relay's work: a bare gRPC stream.

    .venv/bin/python bench/link_floor.py                    # gaps 0.5, 5, 20 and 40 ms
    .venv/bin/python bench/link_floor.py --gaps 0 20 --round-trips 400

A child process serves one bidirectional gRPC stream (grpcio's asyncio API, as the workers
use) that echoes every message; this process writes a message the size of one decode
step's hidden state (576 float32 values, the bundled model's width), reads the echo, then
waits ``gap`` ms before the next, round by round over the gaps in turn. Printed: the
median and 90th percentile round trip at each gap.

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


async def serve(port_file: str) -> None:
    """Serve the echo stream on a free loopback port; write the port to ``port_file``."""
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
    written = Path(port_file).with_suffix(".part")
    written.write_text(str(port), encoding="utf-8")
    written.replace(port_file)  # the reader never sees a partial number
    await server.wait_for_termination()


async def measure(port: int, gaps: list[float], round_trips: int, rounds: int) -> None:
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.stream_stream(
        f"/{SERVICE}/Echo", request_serializer=_same, response_deserializer=_same
    )()
    payload = bytes(HIDDEN_BYTES)
    for _ in range(200):  # the stream and both processes warm
        await call.write(payload)
        await call.read()
    times: dict[float, list[float]] = {gap: [] for gap in gaps}
    for round_ in range(rounds):
        for gap in gaps if round_ % 2 == 0 else list(reversed(gaps)):
            for _ in range(round_trips // rounds):
                await asyncio.sleep(gap / 1000)
                started = time.perf_counter()
                await call.write(payload)
                await call.read()
                times[gap].append(time.perf_counter() - started)
    await call.done_writing()
    await channel.close()
    print(f"bare gRPC stream round trip between two processes, {HIDDEN_BYTES}-byte messages")
    print(f"{'idle gap before each':>22} {'median':>9} {'p90':>9}")
    for gap in gaps:
        ordered = sorted(times[gap])
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        print(f"{gap:>19.1f} ms {1000 * statistics.median(ordered):>6.3f} ms {1000 * p90:>6.3f} ms")


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
            port = int(port_file.read_text(encoding="utf-8"))
            asyncio.run(measure(port, args.gaps, args.round_trips, args.rounds))
        finally:
            child.terminate()
            child.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == SERVE:
        asyncio.run(serve(sys.argv[2]))
    else:
        main()
