"""``mlx-relay placement``: the current and the proposed layer split, with their predicted
decode step and the gain (docs/monitoring-api.md, "Placement").

It asks the running coordinator (``GET /api/placement`` at the config's ``http`` address),
whose figures come from live stage timings. When no coordinator answers there, it computes
the same report from the config and the model alone: nothing is measured, so every device
is taken as equally fast and times are in layer units (1.0 = one layer's decode time).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import httpx

from mlx_relay.cli.options import add_token_arguments, given_token, token_from
from mlx_relay.core.addresses import host_port
from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import PartitionError
from mlx_relay.server.placement import PlacementView, SplitView, placement_view


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "placement",
        help="current and proposed layer split with the predicted gain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="cluster configuration file (YAML)")
    parser.add_argument(
        "--add-device",
        type=float,
        action="append",
        default=[],
        metavar="GB",
        help="what if a device with this much memory (10^9 bytes) joined (repeatable)",
    )
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        metavar="WORKER",
        help="what if this worker left (repeatable)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="do not ask the coordinator: config and model alone",
    )
    add_token_arguments(parser, "bearer token of the coordinator")
    return parser


def run(args: argparse.Namespace) -> int:
    config = ClusterConfig.from_yaml(args.config)
    for gb in args.add_device:
        if not gb > 0:
            raise PartitionError(f"--add-device: expected a positive size in GB, got {gb:g}")
    token = token_from(given_token(args)) or config.http.auth_token
    view = None if args.offline else _ask_coordinator(config, args, token)
    if view is None:
        view = _from_model(config, args)
    write_report(view, sys.stdout)
    return 0


def coordinator_url(config: ClusterConfig, path: str) -> str:
    """``path`` on the coordinator named by the config's ``http`` address."""
    host = config.http.host if config.http.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host_port(host, config.http.port)}{path}"


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _ask_coordinator(
    config: ClusterConfig, args: argparse.Namespace, token: str | None
) -> PlacementView | None:
    url = coordinator_url(config, "/api/placement")
    params = {"add_device_gb": args.add_device, "without": args.without}
    try:
        response = httpx.get(url, params=params, headers=bearer(token), timeout=30)
    except httpx.TransportError:
        return None
    check_answer(url, response)
    return PlacementView.model_validate(response.json())


def check_answer(url: str, response: httpx.Response) -> None:
    """Raise for an answer other than 2xx, with the server's own reason.

    Raises:
        PartitionError: ``URL: HTTP status: detail``.
    """
    if not response.is_success:
        detail = response.json().get("detail") if _is_json(response) else response.text
        raise PartitionError(f"{url}: HTTP {response.status_code}: {detail}")


def _from_model(config: ClusterConfig, args: argparse.Namespace) -> PlacementView:
    from mlx_relay.model.footprint import read_footprint
    from mlx_relay.model.load import read_model_info, resolve_model_dir

    model_dir = resolve_model_dir(config.model, True)
    info = read_model_info(model_dir)
    return placement_view(
        config,
        read_footprint(model_dir),
        None,
        model_max_context=info.max_context,
        add_device_gb=args.add_device,
        without=args.without,
    )


def _is_json(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("application/json")


def write_report(view: PlacementView, out: TextIO) -> None:
    """The report as plain text: one line per stage of each split, then the gain."""
    unit = "s" if view.source == "measured" else " layer units"
    where = (
        "live stage timings"
        if view.source == "measured"
        else "config and model alone (nothing measured: equal device speeds)"
    )
    out.write(f"placement from {where}; {view.compute} weights, KV budget ")
    out.write(f"{view.kv_budget_tokens} tokens per stage, head = {view.head_layers:.2f} layers\n")
    for name, split in (("current", view.current), ("proposed", view.proposed)):
        if split is not None:
            _write_split(name, split, unit, out)
    if view.predicted_gain_ratio is not None:
        out.write(f"predicted gain: {view.predicted_gain_ratio:+.1%} decode steps per second\n")
    if view.error:
        out.write(f"no split proposed: {view.error}\n")


def _write_split(name: str, split: SplitView, unit: str, out: TextIO) -> None:
    out.write(
        f"{name}: predicted step {_time(split.predicted_step_seconds, unit)}, "
        f"one request's token {_time(split.predicted_latency_seconds, unit)}\n"
    )
    for stage in split.stages:
        out.write(
            f"  {stage.device_id:<12} layers [{stage.layer_start}, {stage.layer_end})  "
            f"{_time(stage.predicted_seconds, unit)}  {stage.memory_bytes / 1e9:.2f} GB\n"
        )


def _time(value: float, unit: str) -> str:
    return f"{value * 1e3:.2f} ms" if unit == "s" else f"{value:.2f}{unit}"
