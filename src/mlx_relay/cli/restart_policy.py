"""When to restart a worker process that exited, and when to give up: a pure policy.

Each exit is recorded at a time from the caller's clock. The delay before the next start
doubles from ``backoff_initial`` up to ``backoff_max`` with every exit still inside the
``window``; more than ``max_restarts`` exits inside the window means give up.
"""

from __future__ import annotations

from collections import deque

from mlx_relay.core.supervision_config import SupervisionConfig


class RestartPolicy:
    """The restart decisions for one worker."""

    def __init__(self, config: SupervisionConfig) -> None:
        self.config = config
        self._exits: deque[float] = deque()

    def recent_exits(self, now: float) -> int:
        """Exits within the window ending at ``now``."""
        while self._exits and self._exits[0] <= now - self.config.window:
            self._exits.popleft()
        return len(self._exits)

    def on_exit(self, now: float) -> float | None:
        """Record an exit at ``now``: seconds to wait before restarting, or None to give up."""
        self._exits.append(now)
        exits = self.recent_exits(now)
        if exits > self.config.max_restarts:
            return None
        delay: float = self.config.backoff_initial * 2.0 ** (exits - 1)
        return min(delay, self.config.backoff_max)
