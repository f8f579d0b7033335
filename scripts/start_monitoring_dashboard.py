#!/usr/bin/env python3
"""Start the standalone monitoring dashboard (same as ``mlx-relay dashboard``).

python scripts/start_monitoring_dashboard.py --host 127.0.0.1 --port 8080 [--config FILE]
"""

from __future__ import annotations

import sys

from mlx_relay.cli import main

if __name__ == "__main__":
    sys.exit(main(["dashboard", *sys.argv[1:]]))
