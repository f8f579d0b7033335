"""``mlx-relay model``: import a GGUF file, or describe a model."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from mlx_relay.core.config import ModelConfig
from mlx_relay.model.load import default_cache_dir, import_gguf, read_model_info, resolve_model_dir


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "model",
        help="import a GGUF model or show what a model is",
        description="Import a GGUF file into an MLX model directory, or describe a model.",
    )
    actions = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    imp = actions.add_parser(
        "import",
        help="convert a .gguf file into an MLX model directory",
        description="Convert a .gguf file into an MLX model directory (printed when done).",
    )
    imp.add_argument("file", type=Path, metavar="FILE.gguf")
    imp.add_argument(
        "--out", type=Path, metavar="DIR", help="output directory (default: <cache>/<file stem>)"
    )
    imp.add_argument("--cache-dir", metavar="DIR", help="cache directory for the default --out")

    info = actions.add_parser(
        "info",
        help="describe a model directory, a .gguf file or the bundled model",
        description="Describe a model. A .gguf file or the bundled model (no PATH) is "
        "imported into the cache first if needed.",
    )
    info.add_argument("path", nargs="?", metavar="PATH")
    info.add_argument("--cache-dir", metavar="DIR", help="where imported GGUF models live")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.model_command == "import":
        out = args.out or default_cache_dir(args.cache_dir) / args.file.stem
        print(import_gguf(args.file, out))
        return 0
    model_dir = resolve_model_dir(ModelConfig(path=args.path, cache_dir=args.cache_dir))
    info = read_model_info(model_dir)
    print(f"{'path':<14} {model_dir}")
    for field in dataclasses.fields(info):
        print(f"{field.name:<14} {getattr(info, field.name)}")
    return 0
