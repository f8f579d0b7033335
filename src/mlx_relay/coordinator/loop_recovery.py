"""The step loop's recovery from a failed stage (see :mod:`mlx_relay.coordinator.recovery`).

:class:`LoopRecovery` is the part of :class:`~mlx_relay.coordinator.step_loop.StepLoop`
that pauses the loop when a stage fails, then moves its requests to another path through
live replicas, replays them once every stage serves again, or fails them past
``network.recovery_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from mlx_relay.coordinator import recovery
from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.scheduler import Scheduler
from mlx_relay.core.errors import PipelineNotReady, RelayError

if TYPE_CHECKING:
    from mlx_relay.coordinator.step_loop import Member, StepLoop

logger = logging.getLogger(__name__)


class LoopRecovery:
    """Recovery by replay and failover, mixed into the step loop (which owns the state)."""

    _scheduler: Scheduler
    _members: dict[str, Member]
    _left: dict[str, asyncio.Future[None]]
    _clients: Sequence[WorkerClient]
    _recovery_timeout: float
    _failover: Callable[[StepLoop, str], StepLoop | None] | None
    _restore: Callable[[], Awaitable[None]] | None
    # While a stage failure is being recovered from: when it began, the last error.
    _failed_at: float | None
    _failure: BaseException | None
    _recovering: bool

    if TYPE_CHECKING:

        @property
        def path(self) -> tuple[str, ...]: ...

        def _pump(self) -> None: ...

        def _spawn(self, work: Any) -> None: ...

        def _report_held(self) -> None: ...

    def _begin_recovery(self, exc: BaseException) -> None:
        """Pause the loop: the requests wait for the stages (see :meth:`_recover`)."""
        self._failure = exc
        if self._recovering:
            return
        self._recovering = True
        if self._failed_at is None:
            self._failed_at = time.monotonic()
            logger.warning(
                "%s; holding %d requests for up to %g s until the stage serves again",
                exc,
                len(self._members),
                self._recovery_timeout,
            )
        else:
            logger.info("the replay failed (%s); waiting for the stages again", exc)
        self._spawn(self._recover())

    async def _recover(self) -> None:
        """Wait for the steps in flight, end the requests' old sessions, wait until every
        stage serves, then replay every request (or fail them all past the window)."""
        assert self._failed_at is not None
        failed_at = self._failed_at
        deadline = failed_at + self._recovery_timeout
        while self._scheduler.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(recovery.POLL_INTERVAL / 4)
        failed = str(getattr(self._failure, "device_id", ""))
        target = None
        if self._failover is not None:
            target = self._failover(self, failed)  # type: ignore[arg-type]  # a StepLoop
        if target is not None and not self._scheduler.in_flight:
            self._hand_over(target, failed_at)
            return
        serving = not self._scheduler.in_flight and await recovery.wait_until_serving(
            self._clients, deadline
        )
        if serving and self._restore is not None:
            try:
                await self._restore()
            except RelayError as exc:
                self._failure, serving = exc, False
        if not serving:
            self._give_up()
            return
        old = []
        for request_id in self._scheduler.replay():
            member = self._members.get(request_id)
            if member is not None:
                old.append(member.session_id)
                member.replay(failed_at)
        # Before the replay opens the new sessions: a stage holds one session per request
        # (and the quota of the coordinator's sessions allows no more than twice that).
        await recovery.end_old_sessions(self._clients, old)
        logger.info(
            "every stage serves again after %.2f s: replaying %d requests",
            time.monotonic() - failed_at,
            len(old),
        )
        self._recovering = False
        self._pump()

    def _hand_over(self, target: StepLoop, failed_at: float) -> None:
        """Move every request to ``target`` (the same stages through other replicas): each
        one that took a step replays there under a new session id; the old sessions end
        on this loop's stages (the live ones free them)."""
        old = []
        for request_id, generated, sent in self._scheduler.hand_over():
            member = self._members.pop(request_id, None)
            if member is None:
                continue
            if sent:
                old.append(member.session_id)
                member.replay(failed_at)
            member.moved(target)
            target.adopt(member, generated)
        logger.info(
            "moved %d requests from %s to %s",
            len(old),
            " -> ".join(self.path),
            " -> ".join(target.path),
        )
        self._recovering = False
        self._failed_at = None
        self._failure = None
        self._spawn(recovery.end_old_sessions(self._clients, old))
        self._report_held()

    def _give_up(self) -> None:
        """Past the recovery window: every request fails with the stage's error."""
        error = self._failure or PipelineNotReady("a stage failed")
        logger.warning(
            "no recovery within %g s: failing %d requests (%s)",
            self._recovery_timeout,
            len(self._scheduler),
            error,
        )
        for request_id in list(self._members):
            self._scheduler.abort(request_id)
            member = self._members.pop(request_id)
            if request_id not in self._left:
                member.fail(error)
            if request_id not in self._scheduler:  # else once its micro-batch is back
                future = self._left.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(None)
        self._recovering = False
        self._failed_at = None
        self._failure = None
        self._pump()
