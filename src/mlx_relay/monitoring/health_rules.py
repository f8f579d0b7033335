"""Pure pieces of health checking: statuses, the rollup, and the built-in checks' verdicts.

Each built-in check is a pure function of its readings (percentages, counts, fed state), so
thresholds and transitions are tested without touching the machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class HealthStatus(StrEnum):
    """A check's verdict; values are the strings the API and Prometheus show."""

    HEALTHY = "healthy"
    WARNING = "warning"
    CRITICAL = "critical"
    UNKNOWN = "unknown"


# UNKNOWN ranks between WARNING and CRITICAL: a check that never answered is worse than a
# warning but must not page like a critical failure.
_SEVERITY = {
    HealthStatus.HEALTHY: 0,
    HealthStatus.WARNING: 1,
    HealthStatus.UNKNOWN: 2,
    HealthStatus.CRITICAL: 3,
}


def worst_status(statuses: Iterable[HealthStatus]) -> HealthStatus:
    """The overall status: the worst of ``statuses``; UNKNOWN when there are none."""
    found = list(statuses)
    if not found:
        return HealthStatus.UNKNOWN
    return max(found, key=_SEVERITY.__getitem__)


CheckResult = dict[str, Any]


def result(status: HealthStatus, message: str, **details: Any) -> CheckResult:
    return {"status": status, "message": message, "details": details}


@dataclass(frozen=True)
class Level:
    """Warning and critical thresholds of one resource, in percent."""

    warning: float
    critical: float

    def classify(self, percent: float) -> HealthStatus:
        if percent >= self.critical:
            return HealthStatus.CRITICAL
        if percent >= self.warning:
            return HealthStatus.WARNING
        return HealthStatus.HEALTHY


def judge_resources(
    readings: Mapping[str, float | None], levels: Mapping[str, Level]
) -> CheckResult:
    """Compare resource usage (percent, e.g. ``{"memory": 91.0}``) with each one's levels.

    A reading of None (e.g. CPU on the first sample) is skipped; the message names every
    resource over a threshold, worst first.
    """
    statuses: dict[str, HealthStatus] = {}
    problems: list[tuple[int, str]] = []
    for name, percent in readings.items():
        if percent is None or name not in levels:
            continue
        level = levels[name]
        status = level.classify(percent)
        statuses[name] = status
        if status is not HealthStatus.HEALTHY:
            bound = level.critical if status is HealthStatus.CRITICAL else level.warning
            problems.append(
                (_SEVERITY[status], f"{name} {percent:.1f}% >= {bound:g}% ({status.value})")
            )
    details: dict[str, Any] = {f"{k}_percent": v for k, v in readings.items()}
    details.update({f"{k}_status": s.value for k, s in statuses.items()})
    if not statuses:
        return result(HealthStatus.UNKNOWN, "no resource readings yet", **details)
    overall = worst_status(statuses.values())
    if not problems:
        return result(overall, "resources within thresholds", **details)
    message = "; ".join(text for _, text in sorted(problems, reverse=True))
    return result(overall, message, **details)


def judge_service(serving: bool | None, model_loaded: bool | None, message: str) -> CheckResult:
    """Service availability from the state the pipeline fed in."""
    details = {"serving": serving, "model_loaded": model_loaded}
    if serving is None and model_loaded is None:
        return result(HealthStatus.UNKNOWN, message or "service state not reported yet", **details)
    if not serving:
        return result(HealthStatus.CRITICAL, message or "not serving", **details)
    if model_loaded is False:
        return result(HealthStatus.WARNING, message or "serving, model not loaded yet", **details)
    return result(HealthStatus.HEALTHY, message or "serving with the model loaded", **details)


@dataclass(frozen=True)
class PeerState:
    """What the pipeline last learned about a peer."""

    reachable: bool
    healthy: bool
    message: str = ""
    stage: int | None = None  # its pipeline stage; replicas of a stage share it


def judge_peers(peers: Mapping[str, PeerState]) -> CheckResult:
    """CRITICAL if a peer is unreachable and no replica of its stage is reachable; WARNING
    if a stage has lost replicas but not all (degraded), or a peer reports itself
    unhealthy."""
    if not peers:
        return result(HealthStatus.HEALTHY, "no peers to check", peers={})
    reached = {s.stage for s in peers.values() if s.reachable and s.stage is not None}
    down = sorted(p for p, s in peers.items() if not s.reachable and s.stage not in reached)
    lost = sorted(p for p, s in peers.items() if not s.reachable and s.stage in reached)
    unwell = sorted(p for p, s in peers.items() if s.reachable and not s.healthy)
    details: dict[str, Any] = {
        "peers": {
            p: {"reachable": s.reachable, "healthy": s.healthy, "message": s.message}
            for p, s in sorted(peers.items())
        }
    }
    stages = sorted({s.stage for s in peers.values() if s.stage is not None})
    details["stages"] = {
        str(index): {
            "replicas": sorted(p for p, s in peers.items() if s.stage == index),
            "status": "healthy"
            if all(s.reachable for s in peers.values() if s.stage == index)
            else ("degraded" if index in reached else "down"),
        }
        for index in stages
    }
    degraded = [
        f"stage {index} degraded ({', '.join(p for p in lost if peers[p].stage == index)} "
        "unreachable)"
        for index in stages
        if details["stages"][str(index)]["status"] == "degraded"
    ]
    if down:
        return result(HealthStatus.CRITICAL, f"unreachable: {', '.join(down)}", **details)
    if degraded:
        message = "; ".join(degraded + ([f"unhealthy: {', '.join(unwell)}"] if unwell else []))
        return result(HealthStatus.WARNING, message, **details)
    if unwell:
        return result(HealthStatus.WARNING, f"unhealthy: {', '.join(unwell)}", **details)
    return result(HealthStatus.HEALTHY, f"all {len(peers)} peers reachable and healthy", **details)


# Share of the process's file-descriptor limit in use: warning, critical.
FD_LEVELS = Level(80.0, 95.0)
# Built-in checks whose CRITICAL is, by itself, a warning about load or neighbours rather
# than a stage that cannot serve: memory pressure (holding layers in memory is a worker's
# job), a saturated CPU (what serving load looks like) and unreachable peers.
_RESOURCES_CHECK = "system_resources"
_PROCESS_CHECK = "process_health"
_PEERS_CHECK = "distributed_health"


def serving_blockers(checks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Why a stage cannot serve, from its checks' snapshots (``name -> {"status", "details"}``):
    a full disk, a process out of file descriptors, or any other CRITICAL check (the service
    check, one a deployment registered). Empty when it can serve, whatever memory, CPU and
    peers say."""
    blockers: list[str] = []
    for name, check in checks.items():
        if check.get("status") != HealthStatus.CRITICAL:
            continue
        details = check.get("details") or {}
        if name == _RESOURCES_CHECK:
            if details.get("disk_status") == HealthStatus.CRITICAL:
                blockers.append("disk full")
        elif name == _PROCESS_CHECK:
            fd_percent = details.get("open_fds_percent")
            if fd_percent is not None and FD_LEVELS.classify(fd_percent) is HealthStatus.CRITICAL:
                blockers.append("out of file descriptors")
        elif name != _PEERS_CHECK:
            blockers.append(f"{name} critical")
    return blockers


def judge_process(
    rss_bytes: int,
    memory_total_bytes: int,
    threads: int,
    open_fds: int | None,
    fd_limit: int | None,
    levels: Level,
) -> CheckResult:
    """Process resident memory (share of the machine) and file descriptors (share of limit)."""
    rss_percent = 100.0 * rss_bytes / memory_total_bytes if memory_total_bytes else 0.0
    status = levels.classify(rss_percent)
    details: dict[str, Any] = {
        "resident_memory_bytes": rss_bytes,
        "resident_memory_percent": rss_percent,
        "threads": threads,
        "open_fds": open_fds,
        "fd_limit": fd_limit,
    }
    message = f"rss {rss_bytes / 2**20:.0f} MiB ({rss_percent:.1f}% of memory), {threads} threads"
    if open_fds is not None and fd_limit:
        fd_percent = 100.0 * open_fds / fd_limit
        details["open_fds_percent"] = fd_percent
        fd_status = FD_LEVELS.classify(fd_percent)
        status = worst_status([status, fd_status])
        message += f", {open_fds}/{fd_limit} fds"
    return result(status, message, **details)


def validated(outcome: Any) -> CheckResult:
    """A check's return value as a result with a real :class:`HealthStatus`; raises if malformed."""
    if not isinstance(outcome, Mapping) or "status" not in outcome:
        raise ValueError(f"check returned {type(outcome).__name__}, expected a result mapping")
    status = HealthStatus(outcome["status"])
    details = outcome.get("details") or {}
    return {"status": status, "message": str(outcome.get("message", "")), "details": dict(details)}


def jsonable(value: Any) -> Any:
    """Details made JSON-safe: unknown objects become their ``str``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
