"""One request's life on the coordinator (:class:`RequestTrace`) and what the request log
keeps of it once finished (:class:`RequestRecord`: numbers only, never text).

A trace records into its :class:`~mlx_relay.monitoring.inference.InferenceRecorder` under the
recorder's lock; every method is O(1).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from mlx_relay.monitoring.snapshot import FINISHED_REASONS, RecentError
from mlx_relay.monitoring.windows import RateWindow

if TYPE_CHECKING:
    from mlx_relay.monitoring.inference import InferenceRecorder

logger = logging.getLogger(__name__)

# The longest error message a trace keeps (characters).
MAX_ERROR_MESSAGE = 200


@dataclass(frozen=True)
class RequestRecord:
    """One finished request for the request log: timings and counts, no prompt or text.

    Durations are seconds; ``arrival`` is unix seconds. ``status`` is ``ok`` (finished with
    ``stop`` or ``length``), ``aborted`` or ``error`` (then ``error_type`` says which).
    """

    request_id: str
    arrival: float
    status: str
    finish_reason: str | None
    error_type: str | None
    queue_seconds: float | None
    ttft_seconds: float | None
    e2e_seconds: float
    prompt_tokens: int
    generated_tokens: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    network_seconds: float = 0.0


class RequestTrace:
    """The life of one request, from arrival to its verdict.

    Times come from the collector's monotonic clock. ``queued_at`` (same clock) is when the
    request arrived, ``started()`` when it left the queue; without them both are the moment
    the trace was created. Use as a context manager to get a verdict even on exceptions.
    """

    __slots__ = (
        "_arrived",
        "_created",
        "_done",
        "_first_token",
        "_generated",
        "_last_token",
        "_network",
        "_prompt_tokens",
        "_recorder",
        "_request_id",
        "_stage",
        "_stages",
        "_started",
    )

    def __init__(
        self,
        recorder: InferenceRecorder,
        prompt_tokens: int,
        created: float,
        queued_at: float | None,
        request_id: str = "",
    ) -> None:
        self._recorder = recorder
        self._request_id = request_id
        self._prompt_tokens = prompt_tokens
        self._created = created
        self._arrived = created if queued_at is None else queued_at
        self._started: float | None = None
        self._first_token: float | None = None
        self._last_token: float | None = None
        self._generated = 0
        self._stage = 0.0
        self._stages: dict[str, float] = {}
        self._network = 0.0
        self._done = False

    @property
    def generated_tokens(self) -> int:
        return self._generated

    def _ensure_started(self, now: float) -> None:
        # Caller holds the lock. Queue time is known once the request has left the queue.
        if self._started is None:
            self._started = self._created
            self._recorder._observe("queue", now, self._created - self._arrived)

    def started(self) -> None:
        """The request left the queue and began prefill."""
        rec = self._recorder
        now = rec._clock()
        with rec._lock:
            if self._started is None and not self._done:
                self._started = now
                rec._observe("queue", now, now - self._arrived)

    def token(self, n: int = 1) -> None:
        """``n`` tokens were generated; the first call marks the first token."""
        if n <= 0:
            return
        rec = self._recorder
        now = rec._clock()
        with rec._lock:
            if self._done:
                return
            self._ensure_started(now)
            if self._first_token is None:
                self._first_token = now
                rec._observe("ttft", now, now - self._arrived)
                assert self._started is not None
                rec._observe("prefill", now, now - self._started)
            elif self._last_token is not None:
                # One sample per call: with n tokens per call, the mean gap per token.
                rec._observe("inter_token", now, (now - self._last_token) / n)
            self._last_token = now
            self._generated += n
            rec.generation_tokens_total += n
            rec._tokens.add(now, n)

    def recovered(self, seconds: float) -> None:
        """The request's stream went on after a stage failure, ``seconds`` after it (the
        pause its caller saw: the wait for the stage and the replay)."""
        rec = self._recorder
        now = rec._clock()
        with rec._lock:
            if not self._done:
                rec._observe("recovery", now, seconds)

    def stage_time(self, device_id: str, seconds: float) -> None:
        """Compute time a worker reported for this request (summed over stages and steps)."""
        with self._recorder._lock:
            self._stage += seconds
            self._stages[device_id] = self._stages.get(device_id, 0.0) + seconds

    def network_time(self, seconds: float) -> None:
        """Time spent on the network for this request (summed)."""
        with self._recorder._lock:
            self._network += seconds

    def finish(self, finished_reason: str) -> None:
        """The request completed: ``finished_reason`` is ``stop``, ``length`` or ``abort``."""
        if finished_reason not in FINISHED_REASONS:
            raise ValueError(f"finished_reason must be one of {FINISHED_REASONS}")
        rec = self._recorder
        now = rec._clock()
        with rec._lock:
            if self._done:
                return
            self._close(now)
            rec.success_total[finished_reason] += 1
            e2e = now - self._arrived
            rec._observe("e2e", now, e2e)
            if self._first_token is not None:
                rec._observe("decode", now, now - self._first_token)
                if self._generated > 1:
                    ttft = self._first_token - self._arrived
                    rec._observe("time_per_output_token", now, (e2e - ttft) / (self._generated - 1))
            if self._stage:
                rec._observe("stage", now, self._stage)
            if self._network:
                rec._observe("network", now, self._network)
            rec._histograms["request_prompt_tokens"].observe(self._prompt_tokens)
            rec._histograms["request_generation_tokens"].observe(self._generated)
            status = "aborted" if finished_reason == "abort" else "ok"
            record = self._record(now, status, finished_reason, None) if rec.request_log else None
        if record is not None:
            self._log(record)

    def fail(self, error_type: str, message: str = "") -> None:
        """The request failed; ``error_type`` is a short class name (a bounded label)."""
        rec = self._recorder
        now = rec._clock()
        wall = rec._wall_clock()
        with rec._lock:
            if self._done:
                return
            self._close(now)
            error_type = rec._error_type(error_type)
            rec.failure_total[error_type] = rec.failure_total.get(error_type, 0) + 1
            rec._failed.add(now)
            rec._failed_by_type.setdefault(error_type, RateWindow()).add(now)
            rec._recent_errors.append(
                RecentError(
                    timestamp=wall, error_type=error_type, message=message[:MAX_ERROR_MESSAGE]
                )
            )
            record = self._record(now, "error", None, error_type) if rec.request_log else None
        logger.debug("request failed: %s: %s", error_type, message)
        if record is not None:
            self._log(record)

    def _record(
        self, now: float, status: str, finish_reason: str | None, error_type: str | None
    ) -> RequestRecord:
        # Caller holds the lock; the trace is closed, so _started is set.
        rec = self._recorder
        started = self._started if self._started is not None else self._created
        return RequestRecord(
            request_id=self._request_id,
            arrival=rec._wall_clock() - (now - self._arrived),
            status=status,
            finish_reason=finish_reason,
            error_type=error_type,
            queue_seconds=started - self._arrived,
            ttft_seconds=None if self._first_token is None else self._first_token - self._arrived,
            e2e_seconds=now - self._arrived,
            prompt_tokens=self._prompt_tokens,
            generated_tokens=self._generated,
            stage_seconds=dict(self._stages),
            network_seconds=self._network,
        )

    def _log(self, record: RequestRecord) -> None:
        sink = self._recorder.request_log
        if sink is None:
            return
        try:
            sink(record)
        except Exception:
            # The request log must never fail a request.
            logger.warning("request log refused a record", exc_info=True)

    def _close(self, now: float) -> None:
        rec = self._recorder
        self._done = True
        self._ensure_started(now)
        rec.running -= 1
        rec._finished.add(now)

    def __enter__(self) -> RequestTrace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._done:
            return
        if exc is None or isinstance(exc, GeneratorExit):
            self.finish("stop")
        elif isinstance(exc, asyncio.CancelledError):
            self.finish("abort")
        else:
            self.fail(type(exc).__name__, str(exc))
