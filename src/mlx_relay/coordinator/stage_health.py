"""Each stage's serving state as of the last poll: what ``GET /health`` answers.

A load balancer may ask ``/health`` many times a second; answering each call with one
health RPC per worker would put that load on every worker. :class:`StageHealthPoll` asks
each worker once per interval instead, and ``/health`` reads its last answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from mlx_relay.core.tasks import PeriodicTask

StageStates = list[tuple[str, str]]
"""``(device_id, status)`` per stage: SERVING, NOT_SERVING or UNREACHABLE."""


class StageHealthPoll(PeriodicTask):
    """Polls ``check`` every ``interval`` seconds and keeps its last answer.

    Args:
        check: asks every stage once (``DistributedOrchestrator.stage_health``).
        interval: seconds between polls.

    Attributes:
        states: the last poll's answer; None before the first.
        checked_at: when it completed, unix seconds.
    """

    def __init__(self, check: Callable[[], Awaitable[StageStates]], interval: float) -> None:
        super().__init__("readiness-poll", interval, self.refresh)
        self._check = check
        self.states: StageStates | None = None
        self.checked_at: float | None = None

    async def refresh(self) -> None:
        """One poll, now."""
        self.states = await self._check()
        self.checked_at = time.time()
