"""``mlx-relay rebalance``: move the running pipeline to the advisor's proposed layer split
(or ``--split``) without restarting a process (docs/monitoring-api.md, "Live repartition").

It asks the running coordinator (at the config's ``http`` address) for the current and the
proposed split with the predicted gain, prints them, then applies the split with
``POST /api/placement/apply`` and prints each step as the coordinator reports it: running
requests drain (new ones wait), the workers load their new ranges, the pipeline resumes. A
worker that refuses its range leaves the old split in place, and the error says why.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

import httpx

from mlx_relay.cli.options import add_token_arguments, given_token, token_from
from mlx_relay.cli.placement import bearer, check_answer, coordinator_url, write_report
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import PartitionError, PipelineNotReady, RelayError
from mlx_relay.server.placement import PlacementView
from mlx_relay.server.rebalance import RebalanceStatus, split_pairs

POLL_SECONDS = 0.25


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "rebalance",
        help="apply the proposed layer split live, without restarting the workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="cluster configuration file (YAML)")
    parser.add_argument(
        "--split",
        default=None,
        metavar="A:B,B:C,...",
        help="apply this split (one start:end per worker, in pipeline order) instead of the "
        "proposal, e.g. 0:19,19:30",
    )
    parser.add_argument(
        "--min-gain",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="apply the proposal only if its predicted gain is at least this (0.1 = 10 %%)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the splits and the gain, apply nothing"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="stop following the repartition after this long (it goes on regardless)",
    )
    add_token_arguments(parser, "bearer token of the coordinator")
    return parser


def run(args: argparse.Namespace) -> int:
    config = ClusterConfig.from_yaml(args.config)
    token = token_from(given_token(args)) or config.http.auth_token
    split = parse_split(args.split) if args.split is not None else None
    with httpx.Client(headers=bearer(token), timeout=30) as http:
        view = _placement(http, config)
        write_report(view, sys.stdout)
        target = split if split is not None else _proposed(view)
        if target is None:
            raise PartitionError(f"the advisor proposes no split: {view.error}")
        if view.current is not None and target == split_pairs(view.current):
            print("the pipeline already has this split: nothing to apply")
            return 0
        gain = view.predicted_gain_ratio
        if split is None and gain is not None and gain < args.min_gain:
            print(
                f"predicted gain {gain:+.1%} is below --min-gain {args.min_gain:.0%}: not applied"
            )
            return 0
        if args.dry_run:
            print(f"would apply {_split_text(target)} (--dry-run)")
            return 0
        url = coordinator_url(config, "/api/placement/apply")
        response = http.post(url, json={"split": [list(pair) for pair in target]})
        check_answer(url, response)
        status = follow(http, url, RebalanceStatus.model_validate(response.json()), args.timeout)
    return _outcome(status, sys.stdout)


def parse_split(text: str) -> list[tuple[int, int]]:
    """``0:19,19:30`` as ``[(0, 19), (19, 30)]``.

    Raises:
        PartitionError: a part is not ``start:end`` with integers.
    """
    pairs = []
    for part in text.split(","):
        start, sep, end = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError(part)
            pairs.append((int(start), int(end)))
        except ValueError:
            raise PartitionError(
                f"--split: expected start:end pairs separated by commas (e.g. 0:19,19:30), "
                f"got {part.strip()!r}"
            ) from None
    return pairs


def follow(
    http: httpx.Client, url: str, status: RebalanceStatus, timeout: float
) -> RebalanceStatus:
    """Print each step of the repartition as the coordinator reports it, until it ends.

    Raises:
        PipelineNotReady: still running after ``timeout`` seconds.
    """
    out = sys.stdout
    deadline = time.monotonic() + timeout
    shown = 0
    out.write(f"applying {_split_text(status.after or [])}\n")
    while True:
        for line in status.progress[shown:]:
            out.write(f"  [{line.seconds:7.2f} s] {line.phase}: {line.detail}\n")
        out.flush()
        shown = len(status.progress)
        if status.state != "running":
            return status
        if time.monotonic() > deadline:
            raise PipelineNotReady(f"the repartition still runs after {timeout:g} s ({url})")
        time.sleep(POLL_SECONDS)
        response = http.get(url)
        check_answer(url, response)
        status = RebalanceStatus.model_validate(response.json())


def _outcome(status: RebalanceStatus, out: TextIO) -> int:
    if status.state == "failed":
        raise RelayError(f"the split was not applied: {status.error}")
    out.write(
        f"applied {_split_text(status.after or [])} in {status.total_seconds or 0:.2f} s "
        f"(drain {status.drain_seconds or 0:.2f} s, load {status.load_seconds or 0:.2f} s)\n"
    )
    return 0


def _placement(http: httpx.Client, config: ClusterConfig) -> PlacementView:
    url = coordinator_url(config, "/api/placement")
    try:
        response = http.get(url)
    except httpx.TransportError as exc:
        raise PipelineNotReady(f"no coordinator answers at {url} ({exc})") from None
    check_answer(url, response)
    return PlacementView.model_validate(response.json())


def _proposed(view: PlacementView) -> list[tuple[int, int]] | None:
    return split_pairs(view.proposed) if view.proposed is not None else None


def _split_text(split: list[tuple[int, int]]) -> str:
    return " / ".join(f"[{a}, {b})" for a, b in split)
