"""Regenerate the gRPC modules from relay.proto (``make proto``).

Imports in the generated service module are made package-relative so the modules work
from inside :mod:`mlx_relay.proto`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "relay.proto"


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Write relay_pb2.py, relay_pb2.pyi and relay_pb2_grpc.py into ``out_dir``."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE}")
    grpc_module = out_dir / "relay_pb2_grpc.py"
    text = grpc_module.read_text()
    text = re.sub(r"^import relay_pb2 as", "from . import relay_pb2 as", text, flags=re.M)
    grpc_module.write_text(text)
    return [out_dir / "relay_pb2.py", out_dir / "relay_pb2.pyi", grpc_module]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(f"wrote {path}")
