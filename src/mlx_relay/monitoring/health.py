"""HealthMonitor: periodic health checks, each on its own interval and timeout.

A check is a sync or async function returning ``{"status": HealthStatus, "message": str,
"details": dict}``. Sync checks run on the monitor's own small thread pool, so a blocking or
hanging check never freezes the event loop nor starves other thread users; a check that
exceeds its timeout is CRITICAL ("timed out") and one that raises is CRITICAL with the
exception's message. The overall status is the worst check status.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from mlx_relay.core.config import Thresholds
from mlx_relay.core.tasks import cancel_and_wait
from mlx_relay.monitoring.device import busy_ratio, read_process_stats
from mlx_relay.monitoring.health_rules import (
    CheckResult,
    HealthStatus,
    Level,
    PeerState,
    jsonable,
    judge_peers,
    judge_process,
    judge_resources,
    judge_service,
    result,
    validated,
    worst_status,
)
from mlx_relay.monitoring.snapshot import CheckResultSnap, HealthSummary, HealthTransition

logger = logging.getLogger(__name__)

MAX_TRANSITIONS = 50
CheckFunction = Callable[[], CheckResult | Awaitable[CheckResult]]
ResourceReader = Callable[[], Mapping[str, float | None]]
ProcessReader = Callable[[], Mapping[str, Any]]


@dataclass
class HealthCheck:
    """A named check run every ``interval_seconds``, failing after ``timeout_seconds``."""

    name: str
    description: str
    check_function: CheckFunction
    interval_seconds: float = 30.0
    timeout_seconds: float = 5.0


@dataclass
class _State:
    check: HealthCheck
    status: HealthStatus = HealthStatus.UNKNOWN
    message: str = "not run yet"
    details: dict[str, Any] | None = None
    last_run_timestamp: float | None = None
    duration_seconds: float | None = None
    in_flight: asyncio.Future[Any] | None = None
    task: asyncio.Task[None] | None = None


class _DeviceSource(Protocol):
    def get_device_metrics(self) -> dict[str, Any]: ...

    def update_device_status(self, device_id: str, **fields: Any) -> None: ...


class HealthMonitor:
    """Runs health checks for one device and rolls them up.

    Args:
        device_id: The device the checks describe.
        thresholds: Resource thresholds in percent (default: :class:`Thresholds` defaults).
        metrics_collector: If given, its latest device sample feeds ``system_resources`` and
            the rolled-up status is written into its cluster view.
        clock: Monotonic clock for check durations.
        check_interval: Interval of the built-in checks, seconds.
        resource_reader: Returns ``{"memory": %, "cpu": %, "disk": %}`` (None = no reading);
            injectable for tests.
        process_reader: Returns ``rss_bytes``, ``memory_total_bytes``, ``threads``,
            ``open_fds``, ``fd_limit``; injectable for tests.
    """

    def __init__(
        self,
        device_id: str,
        *,
        thresholds: Thresholds | None = None,
        metrics_collector: _DeviceSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        check_interval: float = 30.0,
        resource_reader: ResourceReader | None = None,
        process_reader: ProcessReader | None = None,
    ) -> None:
        t = thresholds or Thresholds()
        self.device_id = device_id
        self.memory_warning_threshold = t.memory_warning
        self.memory_critical_threshold = t.memory_critical
        self.cpu_warning_threshold = t.cpu_warning
        self.cpu_critical_threshold = t.cpu_critical
        self.disk_warning_threshold = t.disk_warning
        self.disk_critical_threshold = t.disk_critical
        self._collector = metrics_collector
        self._clock = clock
        self._wall_clock = wall_clock
        self._read_resources = resource_reader or self._default_resources
        self._read_process = process_reader or read_process_stats
        self._previous_cpu: Any = None
        self._checks: dict[str, _State] = {}
        self._transitions: deque[HealthTransition] = deque(maxlen=MAX_TRANSITIONS)
        self._listeners: list[Callable[[HealthStatus], None]] = []
        self._overall = HealthStatus.UNKNOWN
        self._service: tuple[bool | None, bool | None, str] = (None, None, "")
        self._peers: dict[str, PeerState] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._started = False
        for name, description, function in (
            ("system_resources", "Memory, CPU and disk use vs thresholds", self._system_resources),
            ("process_health", "Resident memory, threads and open files", self._process_health),
            ("service_availability", "gRPC serving and model loaded", self._service_check),
            ("distributed_health", "Every peer reachable and healthy", self._peer_check),
        ):
            self.register_check(HealthCheck(name, description, function, check_interval))

    # -- registration and lifecycle ----------------------------------------------------------

    def register_check(self, check: HealthCheck) -> None:
        """Add (or replace) a check; it starts running at once if the monitor is started."""
        self.unregister_check(check.name)
        state = self._checks[check.name] = _State(check)
        if self._started:
            state.task = asyncio.create_task(self._loop(state), name=f"health-{check.name}")

    def unregister_check(self, name: str) -> None:
        state = self._checks.pop(name, None)
        if state is not None and state.task is not None:
            state.task.cancel()

    def add_listener(self, callback: Callable[[HealthStatus], None]) -> None:
        """Call ``callback(overall_status)`` whenever the overall status changes."""
        self._listeners.append(callback)

    async def start(self) -> None:
        """Run every check once now, then each on its own interval in the background."""
        if self._started:
            return
        self._started = True
        for state in self._checks.values():
            state.task = asyncio.create_task(self._loop(state), name=f"health-{state.check.name}")
        logger.info("health monitoring started for %s", self.device_id)

    async def stop(self) -> None:
        """Cancel every check task and wait for them; hung sync checks are abandoned."""
        self._started = False
        await cancel_and_wait(*(s.task for s in self._checks.values()))
        for state in self._checks.values():
            state.task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _loop(self, state: _State) -> None:
        while True:
            await self._run(state)
            await asyncio.sleep(state.check.interval_seconds)

    # -- running checks ----------------------------------------------------------------------

    async def run_check(self, name: str) -> CheckResult:
        """Run one check now and return its result."""
        state = self._checks.get(name)
        if state is None:
            raise KeyError(f"no health check named {name!r}")
        return await self._run(state)

    async def run_all_checks(self) -> dict[str, CheckResult]:
        """Run every check concurrently; a slow check delays only its own result."""
        states = list(self._checks.values())
        results = await asyncio.gather(*(self._run(s) for s in states))
        return {s.check.name: r for s, r in zip(states, results, strict=True)}

    async def _run(self, state: _State) -> CheckResult:
        check = state.check
        started = self._clock()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with completion, and stop() would then wait a whole interval.
            async with asyncio.timeout(check.timeout_seconds):
                outcome = await self._call(state)
            outcome = validated(outcome)
        except TimeoutError:
            outcome = result(
                HealthStatus.CRITICAL, f"check timed out after {check.timeout_seconds:g}s"
            )
        except Exception as exc:
            outcome = result(
                HealthStatus.CRITICAL, f"check failed: {exc}", error=type(exc).__name__
            )
        self._record(state, outcome, self._clock() - started)
        return outcome

    async def _call(self, state: _State) -> Any:
        function = state.check.check_function
        if inspect.iscoroutinefunction(function):
            return await function()
        if state.in_flight is None or state.in_flight.done():
            if self._executor is None:
                # Its own pool: a hung check must not starve the loop's default executor.
                self._executor = ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix="health-check"
                )
            state.in_flight = asyncio.wrap_future(self._executor.submit(function))
        # A run still in its thread (concurrent or hung) is joined, never started twice;
        # shield so that a timeout leaves it to finish rather than cancelling it.
        value = await asyncio.shield(state.in_flight)
        if inspect.isawaitable(value):
            value = await value
        return value

    def _record(self, state: _State, outcome: CheckResult, duration: float) -> None:
        previous = state.status
        state.status = outcome["status"]
        state.message = outcome["message"]
        state.details = outcome["details"]
        state.last_run_timestamp = self._wall_clock()
        state.duration_seconds = duration
        if state.status is not previous:
            log = logger.warning if state.status is HealthStatus.CRITICAL else logger.info
            log(
                "health check %s: %s -> %s: %s",
                state.check.name,
                previous.value,
                state.status.value,
                state.message,
            )
            self._transitions.append(
                HealthTransition(
                    timestamp=state.last_run_timestamp,
                    check=state.check.name,
                    from_status=previous.value,
                    to_status=state.status.value,
                    message=state.message,
                )
            )
        self._rollup()

    def _rollup(self) -> None:
        overall = worst_status(s.status for s in self._checks.values())
        changed = overall is not self._overall
        self._overall = overall
        if self._collector is not None:
            self._collector.update_device_status(
                self.device_id,
                is_healthy=overall in (HealthStatus.HEALTHY, HealthStatus.WARNING),
                health_status=overall.value,
            )
        if changed:
            for listener in list(self._listeners):
                try:
                    listener(overall)
                except Exception:
                    logger.exception("health listener failed")

    # -- state fed by the pipeline -----------------------------------------------------------

    def set_service_state(self, serving: bool, model_loaded: bool, message: str = "") -> None:
        """What the server knows about itself; ``service_availability`` updates at once."""
        self._service = (serving, model_loaded, message)
        self._refresh("service_availability", self._service_check)

    def set_peer_states(
        self, peers: Mapping[str, PeerState | tuple[bool, bool] | tuple[bool, bool, str]]
    ) -> None:
        """Reachability and health of every peer (replaces the previous set)."""
        self._peers = {
            peer: state if isinstance(state, PeerState) else PeerState(*state)
            for peer, state in peers.items()
        }
        self._refresh("distributed_health", self._peer_check)

    def set_peer_state(self, peer: str, state: PeerState) -> None:
        """One peer's latest reachability and health (the others keep theirs)."""
        self._peers = {**self._peers, peer: state}
        self._refresh("distributed_health", self._peer_check)

    def _refresh(self, name: str, function: Callable[[], CheckResult]) -> None:
        state = self._checks.get(name)
        if state is not None and state.check.check_function == function:
            self._record(state, function(), 0.0)

    # -- built-in checks ---------------------------------------------------------------------

    def _system_resources(self) -> CheckResult:
        levels = {
            "memory": Level(self.memory_warning_threshold, self.memory_critical_threshold),
            "cpu": Level(self.cpu_warning_threshold, self.cpu_critical_threshold),
            "disk": Level(self.disk_warning_threshold, self.disk_critical_threshold),
        }
        return judge_resources(self._read_resources(), levels)

    def _default_resources(self) -> dict[str, float | None]:
        sample = self._collector.get_device_metrics() if self._collector else {}
        if sample:
            cpu = sample.get("cpu_utilization_ratio")
            return {
                "memory": 100.0 * sample["memory_used_ratio"],
                "cpu": None if cpu is None else 100.0 * cpu,
                "disk": 100.0 * sample["disk_used_ratio"],
            }
        memory = psutil.virtual_memory()
        times = psutil.cpu_times()
        previous, self._previous_cpu = self._previous_cpu, times
        cpu = busy_ratio(previous, times) if previous is not None else None
        return {
            "memory": 100.0 * (memory.total - memory.available) / memory.total,
            "cpu": None if cpu is None else 100.0 * cpu,
            "disk": psutil.disk_usage(os.getcwd()).percent,
        }

    def _process_health(self) -> CheckResult:
        reading = self._read_process()
        return judge_process(
            reading["rss_bytes"],
            reading["memory_total_bytes"],
            reading["threads"],
            reading.get("open_fds"),
            reading.get("fd_limit"),
            Level(self.memory_warning_threshold, self.memory_critical_threshold),
        )

    def _service_check(self) -> CheckResult:
        return judge_service(*self._service)

    def _peer_check(self) -> CheckResult:
        return judge_peers(self._peers)

    # -- reading -----------------------------------------------------------------------------

    @property
    def overall_status(self) -> HealthStatus:
        return self._overall

    def get_check(self, name: str) -> CheckResultSnap:
        return self._snap(self._checks[name])

    def summary(self) -> HealthSummary:
        return HealthSummary(
            device_id=self.device_id,
            timestamp=self._wall_clock(),
            overall_status=self._overall.value,
            checks={name: self._snap(state) for name, state in self._checks.items()},
            transitions=list(self._transitions),
        )

    def get_health_summary(self) -> dict[str, Any]:
        """Overall status, every check's latest result and recent transitions, as JSON data."""
        return self.summary().model_dump(mode="json")

    @staticmethod
    def _snap(state: _State) -> CheckResultSnap:
        return CheckResultSnap(
            name=state.check.name,
            description=state.check.description,
            status=state.status.value,
            message=state.message,
            details=jsonable(state.details or {}),
            last_run_timestamp=state.last_run_timestamp,
            duration_seconds=state.duration_seconds,
            interval_seconds=state.check.interval_seconds,
        )
