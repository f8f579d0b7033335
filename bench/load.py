"""A bounded load run on a 2-worker tiny-model cluster, every part its own process.

    .venv/bin/python bench/load.py                       # 1,000 requests at concurrency 32
    .venv/bin/python bench/load.py --requests 200 --concurrency 16

The mix (tests/support/load.py): valid chat and text completions, streamed and not, invalid
and oversized requests, and streams whose client disconnects after two events. Prints the
answers by kind and status, the 5xx count, how many valid requests completed, the KV sessions
left on the workers and the coordinator's memory growth (target < 50 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_relay.core.blas import load_blas
from mlx_relay.core.hugepages import reexec_with_hugepages

reexec_with_hugepages()  # weights in huge pages, as in the workers
load_blas()

from tests.support.load import load_cluster, run_load  # noqa: E402
from tests.support.tiny_model import make_tiny_model_dir  # noqa: E402


async def main(requests: int, concurrency: int) -> int:
    with tempfile.TemporaryDirectory(prefix="mlx-relay-load-") as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model_dir(work / "tiny-llama", arch="llama", num_layers=4)
        async with load_cluster(model_dir, work) as cluster:
            report = await run_load(cluster, requests, concurrency)
        for line in report.lines():
            print(line)
        for outcome in report.unexpected[:10]:
            print(f"  unexpected: {outcome.kind} {outcome.status} {outcome.detail}")
    ok = (
        report.server_errors == 0
        and not report.unexpected
        and not report.incomplete
        and not any(report.sessions_left)
    )
    print("result:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.requests, args.concurrency)))
