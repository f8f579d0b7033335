"""Request-level recording on the coordinator: counters, latency windows and histograms.

Every method is O(1) and takes the collector's lock briefly, so it may be called from asyncio
handlers and from the MLX thread alike. Nothing here keeps a per-request record once the
request has finished: a :class:`~mlx_relay.monitoring.request_trace.RequestTrace` holds its
own few timestamps, and hands a :class:`~mlx_relay.monitoring.request_trace.RequestRecord`
(numbers only, never text) to the request log when one is attached.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from mlx_relay.monitoring.request_trace import RequestRecord, RequestTrace
from mlx_relay.monitoring.snapshot import (
    FINISHED_REASONS,
    THROUGHPUT_WINDOWS,
    InferenceMetrics,
    LatencySummary,
    RecentError,
    ThroughputWindow,
)
from mlx_relay.monitoring.windows import (
    INTER_TOKEN_BUCKETS,
    RECOVERY_BUCKETS,
    REQUEST_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    RateWindow,
    SampleWindow,
    token_count_buckets,
)

logger = logging.getLogger(__name__)

__all__ = ["InferenceRecorder", "RequestLog", "RequestRecord", "RequestTrace"]

WINDOW_SECONDS = {"10s": 10.0, "60s": 60.0}
MAX_ERROR_TYPES = 32
RECENT_ERRORS = 20
LATENCY_KEYS = (
    "e2e",
    "ttft",
    "inter_token",
    "time_per_output_token",
    "queue",
    "prefill",
    "decode",
    "stage",
    "network",
    "recovery",
)
# Latency-summary key -> docs/monitoring-api.md histogram (without the mlxrelay_ prefix).
_HISTOGRAM_OF = {
    "e2e": "e2e_request_latency_seconds",
    "ttft": "time_to_first_token_seconds",
    "inter_token": "inter_token_latency_seconds",
    "time_per_output_token": "request_time_per_output_token_seconds",
    "queue": "request_queue_time_seconds",
    "prefill": "request_prefill_time_seconds",
    "decode": "request_decode_time_seconds",
    "recovery": "recovery_seconds",
}
_BUCKETS_OF = {
    "e2e": REQUEST_BUCKETS,
    "ttft": TTFT_BUCKETS,
    "inter_token": INTER_TOKEN_BUCKETS,
    "time_per_output_token": INTER_TOKEN_BUCKETS,
    "queue": REQUEST_BUCKETS,
    "prefill": REQUEST_BUCKETS,
    "decode": REQUEST_BUCKETS,
    "recovery": RECOVERY_BUCKETS,
}
OTHER_ERROR_TYPE = "other"
REQUEST_STATUSES = ("ok", "aborted", "error")


RequestLog = Callable[[RequestRecord], None]


class InferenceRecorder:
    """State behind :class:`InferenceMetrics`; owned by the collector."""

    def __init__(
        self,
        lock: threading.Lock,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        *,
        retention_seconds: float,
        window_size: int = 1024,
        max_tokens: int = 32768,
    ) -> None:
        self._lock = lock
        self._clock = clock
        self._wall_clock = wall_clock
        self._started_at = clock()
        self.running = 0
        self.waiting = 0
        self.requests_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.success_total = dict.fromkeys(FINISHED_REASONS, 0)
        self.failure_total: dict[str, int] = {}
        self._finished = RateWindow()
        self._failed = RateWindow()
        self._failed_by_type: dict[str, RateWindow] = {}
        self._tokens = RateWindow()
        self._prompt_tokens = RateWindow()
        self._samples = {k: SampleWindow(window_size, retention_seconds) for k in LATENCY_KEYS}
        self._histograms = {_HISTOGRAM_OF[k]: Histogram(b) for k, b in _BUCKETS_OF.items()}
        counts = token_count_buckets(max_tokens)
        self._histograms["request_prompt_tokens"] = Histogram(counts)
        self._histograms["request_generation_tokens"] = Histogram(counts)
        self._recent_errors: deque[RecentError] = deque(maxlen=RECENT_ERRORS)
        self.request_log: RequestLog | None = None

    # -- called by RequestTrace (lock held by the caller) ------------------------------------

    def _observe(self, key: str, now: float, seconds: float) -> None:
        self._samples[key].add(now, seconds)
        histogram = _HISTOGRAM_OF.get(key)
        if histogram is not None:
            self._histograms[histogram].observe(seconds)

    def _error_type(self, error_type: str) -> str:
        # error_type is a label: cap the distinct values so memory stays bounded.
        if error_type in self.failure_total or len(self.failure_total) < MAX_ERROR_TYPES:
            return error_type
        return OTHER_ERROR_TYPE

    # -- public ------------------------------------------------------------------------------

    def track(
        self, prompt_tokens: int, queued_at: float | None, request_id: str = ""
    ) -> RequestTrace:
        now = self._clock()
        with self._lock:
            self.running += 1
            self.requests_total += 1
            self.prompt_tokens_total += prompt_tokens
            self._prompt_tokens.add(now, prompt_tokens)
        return RequestTrace(self, prompt_tokens, now, queued_at, request_id)

    def set_waiting(self, n: int) -> None:
        with self._lock:
            self.waiting = max(0, n)

    def snap(self) -> InferenceMetrics:
        now = self._clock()
        with self._lock:
            windows = {name: self._window(name, now) for name in THROUGHPUT_WINDOWS}
            return InferenceMetrics(
                requests_running=self.running,
                requests_waiting=self.waiting,
                requests_total=self.requests_total,
                success_total=dict(self.success_total),
                failure_total=dict(self.failure_total),
                prompt_tokens_total=self.prompt_tokens_total,
                generation_tokens_total=self.generation_tokens_total,
                windows=windows,
                latency={k: w.summary(now) for k, w in self._samples.items()},
                histograms={k: h.snap() for k, h in self._histograms.items()},
                recent_errors=list(self._recent_errors),
            )

    def chart_numbers(self) -> tuple[ThroughputWindow, LatencySummary, LatencySummary]:
        """The 10 s rates and the e2e and TTFT summaries, for one history point."""
        now = self._clock()
        with self._lock:
            return (
                self._window("10s", now),
                self._samples["e2e"].summary(now),
                self._samples["ttft"].summary(now),
            )

    def _window(self, name: str, now: float) -> ThroughputWindow:
        window = WINDOW_SECONDS[name]
        # Younger than the window: divide by uptime, so early rates are not diluted.
        elapsed = max(1.0, min(window, now - self._started_at))
        finished = self._finished.total(now, window)
        failed = self._failed.total(now, window)
        by_type = {
            error_type: rate.total(now, window) / finished
            for error_type, rate in self._failed_by_type.items()
            if finished and rate.total(now, window)
        }
        return ThroughputWindow(
            window_seconds=window,
            elapsed_seconds=elapsed,
            requests_per_second=finished / elapsed,
            tokens_per_second=self._tokens.total(now, window) / elapsed,
            prompt_tokens_per_second=self._prompt_tokens.total(now, window) / elapsed,
            error_rate=failed / finished if finished else None,
            error_rate_by_type=by_type,
        )
