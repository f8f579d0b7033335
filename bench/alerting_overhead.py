"""What built-in alerting costs: one evaluation of the stock rules, and decode speed with
alerting on (a rule always firing, its webhook receiver down) vs off.

    .venv/bin/python bench/alerting_overhead.py                  # both sections, ~2 minutes
    .venv/bin/python bench/alerting_overhead.py --interval 10    # the default interval
    .venv/bin/python bench/alerting_overhead.py --rounds 3 --max-tokens 24

Sections:
  evaluate  Median wall time of one evaluation of the stock rules (plus one always-firing
            rule) over a live 2-worker coordinator's families, with the sample ring full.
  decode    Decode tokens/s of one 2-worker loopback pipeline (bundled model, monitoring on),
            alternating runs with the alert engine running and stopped; medians and ratio.
            The receiver is a closed port, so every notification fails, is retried with
            backoff and, once the small queue is full, dropped: the worst case for the notifier.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALWAYS_FIRING = """
groups:
  - name: bench
    rules:
      - alert: AlwaysFiring
        expr: mlxrelay_build_info == 1
"""


def refusing_socket() -> socket.socket:
    """A bound socket that never listens: connections to its port are refused, and no other
    process can take the port while it stays open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def run(rounds: int, max_tokens: int, evaluations: int, interval: float) -> None:
    sys.path.insert(0, str(ROOT))
    from mlx_relay.coordinator.requests import InferenceRequest
    from mlx_relay.core.config import AlertingConfig, ModelConfig
    from mlx_relay.model.load import resolve_model_dir
    from mlx_relay.monitoring.alerting import AlertEngine, configured_rules
    from mlx_relay.monitoring.alerting.factory import build_alert_engine
    from mlx_relay.monitoring.alerting.rules import parse_rules
    from tests.support.cluster import process_cluster

    model_dir = resolve_model_dir(ModelConfig(), progress=False)
    prompt = "Write a long story about a lighthouse keeper who finds a map."
    refusing = refusing_socket()
    alerting = AlertingConfig.model_validate(
        {
            "evaluation_interval": interval,
            "receivers": [
                {
                    "name": "down",
                    "url": f"http://127.0.0.1:{refusing.getsockname()[1]}/hook",
                    "group_wait": 0,
                    "group_interval": interval,
                    "repeat_interval": interval,
                    "retry_backoff": 0.2,
                    "queue_size": 8,
                }
            ],
        }
    )
    with tempfile.TemporaryDirectory() as work_dir:
        async with process_cluster(
            model_dir, Path(work_dir), 2, enable_monitoring=True, worker_monitoring=True
        ) as cluster:
            collector = cluster.orchestrator.metrics_collector
            assert collector is not None
            config = cluster.config.model_copy(update={"alerting": alerting})
            rules = configured_rules(alerting, config.inference)
            rules += parse_rules(ALWAYS_FIRING, {}, source="bench")
            engine: AlertEngine = build_alert_engine(
                config, collector, cluster.orchestrator.health_monitor, rules=rules
            )

            print(f"== evaluate: {len(rules)} rules over a live coordinator ==")
            costs = []
            for _ in range(evaluations):
                started = time.perf_counter()
                engine.evaluate()
                costs.append(time.perf_counter() - started)
            print(f"one evaluation, median         {1e3 * statistics.median(costs):.2f} ms")
            print(f"one evaluation, max            {1e3 * max(costs):.2f} ms")

            print(
                f"\n== decode: 2 workers, bundled model, {rounds} alternating rounds, "
                f"evaluation every {interval:g} s =="
            )
            speeds: dict[bool, list[float]] = {True: [], False: []}
            for round_index in range(rounds + 1):  # round 0 warms up
                for alerting_on in (True, False):
                    if alerting_on:
                        await engine.start()
                    request = InferenceRequest(
                        messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
                    )
                    response = await cluster.orchestrator.process_request(request)
                    if alerting_on:
                        await engine.stop()
                    tokens = response.usage.completion_tokens
                    decode = response.timings.decode
                    if round_index and tokens > 1 and decode > 0:
                        speeds[alerting_on].append((tokens - 1) / decode)
            (queue,) = engine.queues
            on, off = speeds[True], speeds[False]
            if not on or not off:
                print("no decode measurements: every run stopped after its first token")
                return
            median_on, median_off = statistics.median(on), statistics.median(off)
            print(f"alerting on   tok/s per run    {', '.join(f'{s:.2f}' for s in on)}")
            print(f"alerting off  tok/s per run    {', '.join(f'{s:.2f}' for s in off)}")
            print(f"median on / off                {median_on:.2f} / {median_off:.2f} tok/s")
            print(f"ratio on/off                   {median_on / median_off:.3f}")
            print(
                f"notifications                  sent {queue.counts['sent']}, failed "
                f"{queue.counts['failed']}, dropped {queue.counts['dropped']}, "
                f"queued {queue.queued} (queue size 8)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="decode runs per side")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per decode run")
    parser.add_argument("--evaluations", type=int, default=200, help="timed evaluations")
    parser.add_argument(
        "--interval", type=float, default=0.2, help="evaluation and notification interval, s"
    )
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.max_tokens, args.evaluations, args.interval))


if __name__ == "__main__":
    main()
