"""The ``mlx-relay`` command. Each subcommand lives in its own module of this package with
``add_parser(subparsers)`` and ``run(args) -> int``; errors become one readable line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from mlx_relay import __version__
from mlx_relay.core.blas import load_blas
from mlx_relay.core.errors import RelayError
from mlx_relay.core.hugepages import reexec_with_hugepages

# Subcommand modules, in the order `mlx-relay --help` lists them.
COMMANDS = (
    "generate",
    "up",
    "worker",
    "coordinator",
    "dashboard",
    "prometheus_config",
    "model",
    "chat",
    "placement",
    "rebalance",
    "certs",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-relay",
        description="Distributed LLM inference on MLX, with monitoring.",
    )
    parser.add_argument("--version", action="version", version=f"mlx-relay {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"mlx_relay.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"mlx_relay.cli.{name}":
                continue
            raise
        sub = module.add_parser(subparsers)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        # Run as a program: once, again with malloc's large blocks in huge pages.
        reexec_with_hugepages()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Before any subcommand module imports MLX, so that its CPU matmuls use this BLAS.
    try:
        load_blas()
    except RelayError as exc:  # MLX_RELAY_BLAS names no known library
        print(f"mlx-relay: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.getLogger().setLevel(logging.DEBUG)
    try:
        return int(args.handler(args) or 0)
    except RelayError as exc:
        print(f"mlx-relay {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
