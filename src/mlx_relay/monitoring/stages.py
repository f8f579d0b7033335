"""Worker-side recording of pipeline-stage compute: one forward call at a time, O(1)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from mlx_relay.monitoring.snapshot import PHASES, StageMetrics
from mlx_relay.monitoring.windows import (
    STAGE_BATCH_BUCKETS,
    STAGE_FORWARD_BUCKETS,
    Histogram,
    RateWindow,
    SampleWindow,
)

UTILIZATION_WINDOW_SECONDS = 10.0


class StageRecorder:
    """State behind this device's :class:`StageMetrics`; owned by the collector."""

    def __init__(
        self,
        device_id: str,
        lock: threading.Lock,
        clock: Callable[[], float],
        *,
        retention_seconds: float,
        window_size: int = 1024,
    ) -> None:
        self._device_id = device_id
        self._lock = lock
        self._clock = clock
        self._started_at = clock()
        self.stage: int | None = None
        self.kv_sessions = 0
        self.busy_seconds_total = 0.0
        self.steps_total = dict.fromkeys(PHASES, 0)
        self.tokens_total = dict.fromkeys(PHASES, 0)
        self._histograms = {p: Histogram(STAGE_FORWARD_BUCKETS) for p in PHASES}
        self._batch_sizes = Histogram(STAGE_BATCH_BUCKETS)
        self._samples = {p: SampleWindow(window_size, retention_seconds) for p in PHASES}
        self._busy = RateWindow(UTILIZATION_WINDOW_SECONDS)
        self.active = False

    def record_forward(
        self, stage: int, phase: str, seconds: float, tokens: int, batch_size: int = 1
    ) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        now = self._clock()
        with self._lock:
            self.active = True
            self.stage = stage
            self.busy_seconds_total += seconds
            self.steps_total[phase] += 1
            self.tokens_total[phase] += tokens
            self._histograms[phase].observe(seconds)
            self._batch_sizes.observe(batch_size)
            self._samples[phase].add(now, seconds)
            self._busy.add(now, seconds)

    def set_kv_sessions(self, n: int) -> None:
        with self._lock:
            self.active = True
            self.kv_sessions = max(0, n)

    def snap(self) -> StageMetrics:
        now = self._clock()
        with self._lock:
            elapsed = max(1.0, min(UTILIZATION_WINDOW_SECONDS, now - self._started_at))
            busy = self._busy.total(now, UTILIZATION_WINDOW_SECONDS)
            return StageMetrics(
                device_id=self._device_id,
                stage=self.stage,
                forward_duration_seconds={p: h.snap() for p, h in self._histograms.items()},
                batch_size=self._batch_sizes.snap(),
                forward_seconds={p: w.summary(now) for p, w in self._samples.items()},
                busy_seconds_total=self.busy_seconds_total,
                steps_total=dict(self.steps_total),
                tokens_total=dict(self.tokens_total),
                kv_sessions=self.kv_sessions,
                utilization_ratio_10s=min(1.0, busy / elapsed),
            )
