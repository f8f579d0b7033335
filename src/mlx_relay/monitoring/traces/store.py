"""The last N requests' traces, in memory, and the profile over recent ones.

:class:`TraceStore` keeps the timelines of the ``max_traces`` most recently finished
requests (the oldest leaves first) and builds a trace document only when one is asked for.
With an archive (the history store), each finished request's summary (its attribution, no
spans) is also written there, so that a request older than the last N still answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from mlx_relay.monitoring.traces.attribution import Attribution, attribute
from mlx_relay.monitoring.traces.spans import trace_hex
from mlx_relay.monitoring.traces.timeline import RequestTimeline

logger = logging.getLogger(__name__)


class TraceArchive(Protocol):
    """Where trace summaries outlive the memory (``HistoryStore``)."""

    def record_trace(self, request_id: str, arrival: float, summary: dict[str, Any]) -> None: ...

    def trace_summary(self, request_id: str) -> dict[str, Any] | None: ...


def summary_of(timeline: RequestTimeline) -> dict[str, Any]:
    """A finished request's trace without its spans: what the archive keeps."""
    return {
        "request_id": timeline.request_id,
        "trace_id": trace_hex(timeline.trace_id),
        "start_unix": timeline.start_unix,
        "duration_s": timeline.e2e,
        "model": timeline.model,
        "finish_reason": timeline.finish_reason,
        "error_type": timeline.error_type,
        "prompt_tokens": timeline.prompt_tokens,
        "output_tokens": timeline.output_tokens,
        "lanes": timeline.lanes,
        "attribution": attribute(timeline).as_dict(),
    }


class TraceStore:
    """Finished requests' timelines, the newest ``max_traces`` of them.

    Args:
        max_traces: how many traces to keep (the oldest is dropped first).
        max_steps: most steps the kept traces may hold in all (the oldest go first; the
            newest trace stays whatever its length).
        clock: unix seconds (for the profile window).
    """

    def __init__(
        self,
        max_traces: int,
        clock: Callable[[], float] = time.time,
        *,
        max_steps: int = 50_000,
    ) -> None:
        if max_traces < 1 or max_steps < 1:
            raise ValueError(
                f"max_traces and max_steps must be >= 1, got {max_traces}, {max_steps}"
            )
        self.max_traces = max_traces
        self.max_steps = max_steps
        self._steps = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._traces: OrderedDict[str, RequestTimeline] = OrderedDict()
        self.archive: TraceArchive | None = None

    def __len__(self) -> int:
        return len(self._traces)

    def add(self, timeline: RequestTimeline) -> None:
        """A finished request's timeline (its summary also goes to the archive)."""
        with self._lock:
            old = self._traces.pop(timeline.request_id, None)
            if old is not None:
                self._steps -= len(old.steps)
            self._traces[timeline.request_id] = timeline
            self._steps += len(timeline.steps)
            while len(self._traces) > 1 and (
                len(self._traces) > self.max_traces or self._steps > self.max_steps
            ):
                _, dropped = self._traces.popitem(last=False)
                self._steps -= len(dropped.steps)
        archive = self.archive
        if archive is not None:
            try:
                archive.record_trace(timeline.request_id, timeline.start_unix, summary_of(timeline))
            except Exception:  # the archive must never fail a request
                logger.warning(
                    "trace summary of %s not archived", timeline.request_id, exc_info=True
                )

    def get(self, request_id: str) -> RequestTimeline | None:
        with self._lock:
            return self._traces.get(request_id)

    def archived(self, request_id: str) -> dict[str, Any] | None:
        """The archived summary of a request no longer in memory, or None."""
        archive = self.archive
        return archive.trace_summary(request_id) if archive is not None else None

    def recent(self, window: float) -> list[RequestTimeline]:
        """The kept timelines of requests that finished within the last ``window`` seconds."""
        since = self._clock() - window
        with self._lock:
            timelines = list(self._traces.values())
        return [t for t in timelines if (t.finished_unix or t.start_unix) >= since]

    def profile(self, window: float) -> dict[str, Any]:
        """Where the time of the requests that finished in the last ``window`` seconds went:
        totals, the mean per request, and per output token."""
        timelines = self.recent(window)
        totals = Attribution()
        output_tokens = prompt_tokens = 0
        statuses: dict[str, int] = {}
        for timeline in timelines:
            totals.add(attribute(timeline))
            output_tokens += timeline.output_tokens
            prompt_tokens += timeline.prompt_tokens
            status = _status(timeline)
            statuses[status] = statuses.get(status, 0) + 1
        count = len(timelines)
        return {
            "window_s": window,
            "requests": count,
            "statuses": statuses,
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "kept_traces": len(self),
            "max_traces": self.max_traces,
            "totals": totals.as_dict(),
            "per_request": totals.scaled(1 / count).as_dict() if count else None,
            "per_output_token": (
                totals.scaled(1 / output_tokens).as_dict() if output_tokens else None
            ),
            "shares": _shares(totals),
        }


def _status(timeline: RequestTimeline) -> str:
    if timeline.error_type is not None:
        return "error"
    return "aborted" if timeline.finish_reason == "abort" else "ok"


def _shares(totals: Attribution) -> dict[str, Any] | None:
    """Each part's fraction of the summed end-to-end time."""
    e2e = totals.e2e_s
    if e2e <= 0:
        return None
    return {
        "queue": totals.queue_s / e2e,
        "coordinator": totals.coordinator_s / e2e,
        "compute": {k: v / e2e for k, v in totals.compute_s.items()},
        "network": {k: v / e2e for k, v in totals.network_s.items()},
        "bubble": totals.bubble_s / e2e,
    }
