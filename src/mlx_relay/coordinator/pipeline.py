"""One request's life on the coordinator: admission, its tokens and text, its cleanup.

The steps themselves run in the shared :class:`~mlx_relay.coordinator.step_loop.StepLoop`,
which batches every running request's step into one ``Forward`` per stage; a
:class:`RequestRun` is one member of it. The loop hands it each sampled token
(:meth:`RequestRun.on_token`, which applies EOS, stop strings and ``max_tokens`` at once, so
that a finished request takes no further step), and the run turns them into its caller's
events.

Backpressure: a run holds at most ``buffer_tokens`` events its caller has not taken. With that
many unread, the run is paused in the step loop (it takes no decode step, so the stages do no
work for it) until the caller has taken half of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from mlx_relay.coordinator.admission import Admission
from mlx_relay.coordinator.prepare import PreparedRequest
from mlx_relay.coordinator.recovery import replay_session_id
from mlx_relay.coordinator.replicas import ReplicaRouter
from mlx_relay.coordinator.requests import (
    FinishReason,
    InferenceResponse,
    Timings,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from mlx_relay.coordinator.step_loop import StepLoop
from mlx_relay.coordinator.stops import TextStream
from mlx_relay.coordinator.tracing import CoordinatorTracing, RequestSpans
from mlx_relay.core.types import LayerRange
from mlx_relay.model.tokenizer import TextDecoder
from mlx_relay.proto import relay_pb2
from mlx_relay.wire import encode_sampling

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as the coordinator sees it."""

    index: int
    device_id: str
    address: str
    layer_range: LayerRange


class RunTracker:
    """The live runs and their pending session cleanups, so that shutdown can end them."""

    def __init__(self) -> None:
        self.runs: set[RequestRun] = set()
        self.cleanups: set[asyncio.Task[None]] = set()

    def add_cleanup(self, task: asyncio.Task[None]) -> None:
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)


@dataclass
class RequestOutcome:
    """What a finished (or failed) run produced; filled in as it goes."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    timings: Timings = field(default_factory=Timings)


class RequestRun:
    """One prepared request in the step loop; iterate :meth:`events` once.

    Args:
        prepared: the validated request.
        router: places the request in the step loop of a path through the stages'
            replicas (the loop may hand it to another path when a replica fails).
        tokenizer: decodes the generated ids into text.
        eos_ids: token ids that end generation.
        admission: where the request waits for a running slot.
        collector: the coordinator's MetricsCollector, or None without monitoring.
        tracker: where the run registers itself while it runs, and its session cleanup
            task, so that shutdown can end both.
        buffer_tokens: most token events waiting for the caller before the run pauses.
        tracing: opens the request's trace (kept in the trace store when it ends), or None.
    """

    def __init__(
        self,
        prepared: PreparedRequest,
        router: ReplicaRouter,
        tokenizer: Any,
        eos_ids: set[int],
        admission: Admission,
        collector: Any | None,
        tracker: RunTracker,
        buffer_tokens: int = 32,
        tracing: CoordinatorTracing | None = None,
    ) -> None:
        if buffer_tokens < 1:
            raise ValueError(f"buffer_tokens must be >= 1, got {buffer_tokens}")
        self.prepared = prepared
        self.request_id = prepared.request.request_id
        self.session_id = self.request_id
        self.prompt_ids = prepared.prompt_ids
        self.sampling = encode_sampling(prepared.params)
        self.max_steps: int | None = prepared.max_tokens
        self._router = router
        self._loop: StepLoop | None = None  # once it joins
        self._eos_ids = eos_ids
        self._admission = admission
        self._collector = collector
        self._tracker = tracker
        self._trace: Any = None
        self._tracing = tracing
        self.spans: RequestSpans | None = tracing.open(prepared) if tracing is not None else None
        self._sessions_opened = False
        self.outcome = RequestOutcome()
        # Unbounded as a queue; the step loop pauses the run at ``buffer_tokens`` unread.
        self._events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self._buffer_tokens = buffer_tokens
        self.paused = False
        self._text = TextStream(TextDecoder(tokenizer, self.prompt_ids), prepared.request.stop)
        self._want_logprobs = prepared.request.logprobs or prepared.params.top_logprobs > 0
        self._last_token = self.prompt_ids[-1]
        self._admitted = 0.0
        self._first_token_at: float | None = None
        self._replays = 0
        self._failed_at: float | None = None  # a stage failed then; its next token ends the wait

    async def events(self) -> AsyncGenerator[TokenEvent, None]:
        """Token events; the last one carries ``finish_reason`` and ``usage``. Closing the
        iterator early ends the request with finish reason ``abort``."""
        outcome = self.outcome
        submitted = self.prepared.submitted_at
        try:
            async with self._admission.slot():
                self._tracker.runs.add(self)
                admitted = time.monotonic()
                outcome.timings.queue = admitted - submitted
                if self.spans is not None:
                    self.spans.admitted(admitted)
                if self._collector is not None:
                    self._trace = self._collector.track_request(
                        prompt_tokens=len(self.prepared.prompt_ids),
                        queued_at=submitted,
                        request_id=self.request_id,
                    )
                    self._trace.started()
                try:
                    async with aclosing(self._step_events(admitted)) as events:
                        async for event in events:
                            yield event
                except (GeneratorExit, asyncio.CancelledError):
                    if outcome.finish_reason is None:
                        outcome.finish_reason = "abort"
                        logger.debug("request %s aborted by its caller", self.request_id)
                        if self._trace is not None:
                            self._trace.finish("abort")
                        self._spans_end("abort")
                    raise
                except Exception as exc:
                    outcome.finish_reason = "error"
                    logger.info("request %s failed: %s", self.request_id, exc)
                    if self._trace is not None:
                        self._trace.fail(type(exc).__name__, str(exc))
                    self._spans_end("error", type(exc).__name__)
                    raise
        finally:
            self._tracker.runs.discard(self)
            if self.spans is not None and self._tracing is not None:
                self._spans_end("abort")
                self._tracing.close(self.spans)
            if not outcome.timings.total:
                outcome.timings.total = time.monotonic() - submitted
            if self._sessions_opened:
                task = asyncio.get_running_loop().create_task(self._leave_and_end())
                self._tracker.add_cleanup(task)
                if outcome.finish_reason in ("stop", "length"):
                    # Free the stages' caches before the caller sees the request as done; on
                    # failure the error is not held back behind the cleanup.
                    await asyncio.shield(task)

    async def _step_events(self, admitted: float) -> AsyncGenerator[TokenEvent, None]:
        self._admitted = admitted
        self._loop = self._router.place()
        self._loop.join(self)
        self._sessions_opened = True
        while True:
            item = await self._events.get()
            if self.paused and self._events.qsize() <= self._buffer_tokens // 2:
                self.paused = False
                logger.debug("request %s: its reader caught up; resumed", self.request_id)
                assert self._loop is not None
                self._loop.resume(self.request_id)
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    # -- what the step loop calls (Member) ---------------------------------------------------

    def next_token(self) -> int:
        return self._last_token

    def prefill_ids(self, position: int, length: int) -> list[int]:
        end = position + length
        if end <= len(self.prompt_ids):
            return self.prompt_ids[position:end]
        return (self.prompt_ids + self.outcome.token_ids)[position:end]

    def moved(self, loop: StepLoop) -> None:
        self._loop = loop

    def replay(self, failed_at: float) -> None:
        self._replays += 1
        self.session_id = replay_session_id(self.request_id, self._replays)
        if self._failed_at is None:
            self._failed_at = failed_at
        logger.debug(
            "request %s replays %d prompt + %d generated tokens as session %s",
            self.request_id,
            len(self.prompt_ids),
            len(self.outcome.token_ids),
            self.session_id,
        )

    def on_token(self, result: relay_pb2.ForwardResult) -> bool:
        """Take the request's next sampled token; True when the request is finished."""
        outcome = self.outcome
        now = time.monotonic()
        if self._first_token_at is None:
            self._first_token_at = now
            outcome.timings.ttft = now - self.prepared.submitted_at
            outcome.timings.prefill = now - self._admitted
            if self.spans is not None:
                self.spans.first_token(now)
        if self._failed_at is not None:
            if self._trace is not None:
                self._trace.recovered(now - self._failed_at)
            self._failed_at = None
        token = result.token_id
        if token in self._eos_ids:
            self._finish("stop")
            return True
        outcome.token_ids.append(token)
        self._last_token = token
        logprob = None
        if self._want_logprobs:
            logprob = TokenLogprob(
                token, result.logprob, [(t.token_id, t.logprob) for t in result.top_logprobs]
            )
            outcome.logprobs.append(logprob)
        if self._trace is not None:
            self._trace.token()
        delta = self._text.add(token)
        outcome.text_parts.append(delta)
        index = len(outcome.token_ids) - 1
        self._events.put_nowait(TokenEvent(self.request_id, token, delta, index, logprob))
        if self._text.stopped:
            self._finish("stop")
            return True
        if len(outcome.token_ids) >= self.prepared.max_tokens:
            self._finish("length")
            return True
        if self._events.qsize() >= self._buffer_tokens and not self.paused:
            self.paused = True
            logger.debug("request %s: %d tokens unread; paused", self.request_id, index + 1)
            assert self._loop is not None
            self._loop.pause(self.request_id)
        return False

    def on_stage(self, device_id: str, compute: float, network: float) -> None:
        timings = self.outcome.timings
        timings.stage_compute[device_id] = timings.stage_compute.get(device_id, 0.0) + compute
        timings.network += network
        if self._trace is not None:
            self._trace.stage_time(device_id, compute)
            self._trace.network_time(network)

    def fail(self, error: BaseException) -> None:
        self._events.put_nowait(error)

    def _spans_end(self, reason: str, error_type: str | None = None) -> None:
        """The trace's end, unless it ended already (a finished request's last token)."""
        if self.spans is not None:
            self.spans.finish(time.monotonic(), reason, len(self.outcome.token_ids), error_type)

    def _finish(self, finish: FinishReason) -> None:
        outcome = self.outcome
        timings = outcome.timings
        tail = self._text.finish()
        outcome.text_parts.append(tail)
        outcome.finish_reason = finish
        end = time.monotonic()
        generated = len(outcome.token_ids)
        if self._first_token_at is not None:
            timings.decode = end - self._first_token_at
        running = end - self._admitted
        timings.tokens_per_second = generated / running if running > 0 else 0.0
        timings.total = end - self.prepared.submitted_at
        if self._trace is not None:
            self._trace.finish(finish)
        if self.spans is not None:
            self.spans.finish(end, finish, generated)
        logger.debug(
            "request %s: %d prompt + %d generated tokens, %s, %.3f s (queue %.3f s)",
            self.request_id,
            len(self.prompt_ids),
            generated,
            finish,
            timings.total,
            timings.queue,
        )
        self._events.put_nowait(
            TokenEvent(
                self.request_id,
                None,
                tail,
                generated,
                finish_reason=finish,
                usage=Usage(len(self.prompt_ids), generated),
            )
        )

    async def _leave_and_end(self) -> None:
        # Once no micro-batch in flight holds the request, its sessions may end without
        # failing another request's step.
        assert self._loop is not None
        await self._loop.leave(self.request_id)
        await self.end_sessions()

    async def end_sessions(self) -> None:
        """EndSession on every stage, concurrently, once; failures are logged, not raised (a
        dead worker has lost the session anyway, a stuck one frees it after its TTL)."""
        if not self._sessions_opened or self._loop is None:
            return
        self._sessions_opened = False
        loop = self._loop
        results = await asyncio.gather(
            *(client.end_session(self.session_id) for client in loop.clients),
            return_exceptions=True,
        )
        for stage, result in zip(loop.stages, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning(
                    "EndSession of request %s on %s failed: %s",
                    self.session_id,
                    stage.device_id,
                    result,
                )

    def response(self) -> InferenceResponse:
        """The complete response, once :meth:`events` has been exhausted."""
        outcome = self.outcome
        assert outcome.finish_reason is not None
        want_logprobs = self.prepared.request.logprobs or self.prepared.params.top_logprobs > 0
        return InferenceResponse(
            request_id=self.request_id,
            text="".join(outcome.text_parts),
            token_ids=list(outcome.token_ids),
            finish_reason=outcome.finish_reason,
            usage=Usage(len(self.prepared.prompt_ids), len(outcome.token_ids)),
            timings=outcome.timings,
            logprobs=list(outcome.logprobs) if want_logprobs else None,
        )
