"""Replica stages: several workers with the same layers serve one stage.

A request's KV caches live on one replica of each stage, so a request runs on one *path*
(one replica per stage) and every micro-batch goes down one path: the route a ``Forward``
carries. :class:`ReplicaRouter` keeps one :class:`~mlx_relay.coordinator.step_loop.StepLoop`
per path in use, places each new request on the path of the least loaded live replica of
every stage, and when a replica fails moves the requests of its paths to a path through
live replicas, where they are replayed (:mod:`mlx_relay.coordinator.recovery`). A replica
that serves again (the stage health poll sees it SERVING) takes new requests again. Without
replicas there is one path and one loop, which waits for a failed stage to come back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.scheduler import SchedulerSettings
from mlx_relay.coordinator.step_loop import StageView, StepLoop
from mlx_relay.core.errors import PartitionError

logger = logging.getLogger(__name__)

Path = tuple[str, ...]


class ReplicaRouter:
    """The step loops of a pipeline whose stages may have several replicas.

    Args:
        stages: every worker as a stage (replicas share their ``index``), pipeline order.
        clients: one client per worker, same order.
        settings, collector, traced, recovery_timeout, restore, arrivals: as
            :class:`StepLoop`'s.
    """

    def __init__(
        self,
        stages: Sequence[StageView],
        clients: Sequence[WorkerClient],
        settings: SchedulerSettings,
        collector: Any | None = None,
        *,
        traced: bool = False,
        recovery_timeout: float = 0.0,
        restore: Callable[[], Awaitable[None]] | None = None,
        arrivals: Callable[[], int] | None = None,
    ) -> None:
        # Without replicas the one loop runs on these very lists: a live repartition
        # replaces the stages' ranges in them, in place.
        self._stages = stages
        self._clients = clients
        self._replicas: list[list[tuple[StageView, WorkerClient]]] = []
        for stage, client in zip(stages, clients, strict=True):
            if stage.index == len(self._replicas):
                self._replicas.append([])
            self._replicas[stage.index].append((stage, client))
        self._settings = settings
        self._collector = collector
        self._traced = traced
        self._recovery_timeout = recovery_timeout
        self._restore = restore
        self._arrivals = arrivals
        self._loops: dict[Path, StepLoop] = {}
        self._down: set[str] = set()
        self._stopped: str | None = None

    @property
    def loops(self) -> list[StepLoop]:
        return list(self._loops.values())

    @property
    def down(self) -> set[str]:
        """Replicas not serving, as last seen (a failed step or the health poll)."""
        return set(self._down)

    def place(self) -> StepLoop:
        """The loop a new request joins: the least loaded live replica of each stage (a
        stage whose replicas are all down keeps its least loaded one: the request waits
        for it)."""
        path = self._path(exclude=self._down) or self._path(exclude=set())
        assert path is not None
        return self._loop(path)

    def only_loop(self) -> StepLoop:
        """The one loop of a pipeline without replicas (what a live repartition holds).

        Raises:
            PartitionError: a stage has replicas.
        """
        if any(len(replicas) > 1 for replicas in self._replicas):
            raise PartitionError("a live repartition does not handle replica stages yet")
        path = self._path(exclude=set())
        assert path is not None
        return self._loop(path)

    def arrived(self) -> None:
        """No request is being prepared any more: loops holding a burst's first requests
        start them now (:meth:`StepLoop.arrived`)."""
        for loop in list(self._loops.values()):
            loop.arrived()

    def update(self, states: Sequence[tuple[str, str]]) -> None:
        """The stages' health from a poll: ``(device_id, status)``; a replica answering
        SERVING takes requests again."""
        self._down = {device_id for device_id, status in states if status != "SERVING"}

    async def stop(self, reason: str) -> None:
        self._stopped = reason
        for loop in list(self._loops.values()):
            await loop.stop(reason)

    def _load(self, device_id: str) -> int:
        return sum(loop.scheduled for path, loop in self._loops.items() if device_id in path)

    def _path(self, exclude: set[str]) -> Path | None:
        path = []
        for replicas in self._replicas:
            live = [stage.device_id for stage, _ in replicas if stage.device_id not in exclude]
            if not live:
                return None
            path.append(min(live, key=self._load))
        return tuple(path)

    def _loop(self, path: Path) -> StepLoop:
        loop = self._loops.get(path)
        if loop is None:
            chosen = [
                next(pair for pair in replicas if pair[0].device_id == device_id)
                for replicas, device_id in zip(self._replicas, path, strict=True)
            ]
            alone = all(len(replicas) == 1 for replicas in self._replicas)
            loop = StepLoop(
                self._stages if alone else [stage for stage, _ in chosen],
                self._clients if alone else [client for _, client in chosen],
                self._settings,
                self._collector,
                traced=self._traced,
                recovery_timeout=self._recovery_timeout,
                restore=self._restore,
                failover=self._failover,
                pipeline_in_flight=self._in_flight,
                arrivals=self._arrivals,
            )
            self._loops[path] = loop
        return loop

    def _in_flight(self) -> int:
        """Micro-batches in flight in all the loops (stages of one host in different
        paths may compute at once)."""
        return sum(loop.computing for loop in self._loops.values())

    def _failover(self, loop: StepLoop, failed: str) -> StepLoop | None:
        """Where the requests of ``loop`` go when its stage ``failed`` failed: a path
        through live replicas, or None (no other: they wait for the stage)."""
        if self._stopped is not None:
            return None
        if failed:
            self._down.add(failed)
        path = self._path(exclude=self._down)
        if path is None or path == loop.path:
            return None
        logger.warning("%s failed: its requests move to %s", failed or "a stage", " -> ".join(path))
        return self._loop(path)
