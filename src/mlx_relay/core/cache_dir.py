"""Where mlx-relay keeps what it builds once per machine (imported models, native helpers)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir(configured: str | None = None) -> Path:
    """``configured``, else ``$MLX_RELAY_CACHE``, else ``$XDG_CACHE_HOME/mlx-relay``, else
    ``~/.cache/mlx-relay``."""
    if configured:
        return Path(configured).expanduser()
    if env := os.environ.get("MLX_RELAY_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "mlx-relay"
    return Path.home() / ".cache" / "mlx-relay"
