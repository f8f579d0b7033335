"""One request's trip through the stages: prefill, then one decode step per token.

Each request drives its own loop (stage 0 -> 1 -> ... -> last, which samples, then back to
stage 0), so concurrent requests interleave on the stages. Hidden states pass from one stage
to the next as the workers' own ``Tensor`` messages, never decoded here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from mlx_relay.coordinator.admission import Admission
from mlx_relay.coordinator.client import StageError, WorkerClient
from mlx_relay.coordinator.prepare import PreparedRequest
from mlx_relay.coordinator.requests import (
    FinishReason,
    InferenceResponse,
    Timings,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from mlx_relay.coordinator.stops import TextStream
from mlx_relay.core.errors import PipelineNotReady
from mlx_relay.core.types import LayerRange
from mlx_relay.model.tokenizer import TextDecoder
from mlx_relay.proto import relay_pb2
from mlx_relay.wire import encode_sampling, encode_token_ids

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
    """Drives one prepared request through the pipeline; iterate :meth:`events` once.

    Args:
        prepared: the validated request.
        stages: the pipeline, in order, and one client per stage.
        clients: the WorkerClient of each stage, same order.
        tokenizer: decodes the generated ids into text.
        eos_ids: token ids that end generation.
        admission: where the request waits for a running slot.
        collector: the coordinator's MetricsCollector, or None without monitoring.
        tracker: where the run registers itself while it runs, and its session cleanup
            task, so that shutdown can end both.
    """

    def __init__(
        self,
        prepared: PreparedRequest,
        stages: Sequence[Stage],
        clients: Sequence[WorkerClient],
        tokenizer: Any,
        eos_ids: set[int],
        admission: Admission,
        collector: Any | None,
        tracker: RunTracker,
    ) -> None:
        self.prepared = prepared
        self.request_id = prepared.request.request_id
        self._stages = stages
        self._clients = clients
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._admission = admission
        self._collector = collector
        self._tracker = tracker
        self._trace: Any = None
        self._sessions_opened = False
        self._stopping: str | None = None
        self._sampling = encode_sampling(prepared.params)
        self.outcome = RequestOutcome()

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
                if self._collector is not None:
                    self._trace = self._collector.track_request(
                        prompt_tokens=len(self.prepared.prompt_ids),
                        queued_at=submitted,
                        request_id=self.request_id,
                    )
                    self._trace.started()
                try:
                    async with aclosing(self._prefill_and_decode(admitted)) as events:
                        async for event in events:
                            yield event
                except (GeneratorExit, asyncio.CancelledError):
                    if outcome.finish_reason is None:
                        outcome.finish_reason = "abort"
                        logger.debug("request %s aborted by its caller", self.request_id)
                        if self._trace is not None:
                            self._trace.finish("abort")
                    raise
                except Exception as exc:
                    outcome.finish_reason = "error"
                    logger.info("request %s failed: %s", self.request_id, exc)
                    if self._trace is not None:
                        self._trace.fail(type(exc).__name__, str(exc))
                    raise
        finally:
            self._tracker.runs.discard(self)
            if not outcome.timings.total:
                outcome.timings.total = time.monotonic() - submitted
            if self._sessions_opened:
                task = asyncio.get_running_loop().create_task(self.end_sessions())
                self._tracker.add_cleanup(task)
                if outcome.finish_reason in ("stop", "length"):
                    # Free the stages' caches before the caller sees the request as done; on
                    # failure the error is not held back behind the cleanup.
                    await asyncio.shield(task)

    async def _prefill_and_decode(self, admitted: float) -> AsyncGenerator[TokenEvent, None]:
        prepared = self.prepared
        outcome = self.outcome
        timings = outcome.timings
        prompt = prepared.prompt_ids
        want_logprobs = prepared.request.logprobs or prepared.params.top_logprobs > 0
        text = TextStream(TextDecoder(self._tokenizer, prompt), prepared.request.stop)
        position = 0
        if len(prompt) > 1:
            # Prefill all but the last prompt token; the last one is the first decode step.
            await self._forward_all(prompt[:-1], position, step=0)
            position = len(prompt) - 1
        token = prompt[-1]
        first_token_at: float | None = None
        finish: FinishReason = "length"
        for step in range(prepared.max_tokens):
            result = await self._forward_all([token], position, step=step)
            position += 1
            now = time.monotonic()
            if first_token_at is None:
                first_token_at = now
                timings.ttft = now - prepared.submitted_at
                timings.prefill = now - admitted
            token = result.token_id
            if token in self._eos_ids:
                finish = "stop"
                break
            outcome.token_ids.append(token)
            logprob = None
            if want_logprobs:
                logprob = TokenLogprob(
                    token,
                    result.logprob,
                    [(t.token_id, t.logprob) for t in result.top_logprobs],
                )
                outcome.logprobs.append(logprob)
            if self._trace is not None:
                self._trace.token()
            delta = text.add(token)
            outcome.text_parts.append(delta)
            yield TokenEvent(self.request_id, token, delta, len(outcome.token_ids) - 1, logprob)
            if text.stopped:
                finish = "stop"
                break
        tail = text.finish()
        outcome.text_parts.append(tail)
        outcome.finish_reason = finish
        end = time.monotonic()
        generated = len(outcome.token_ids)
        if first_token_at is not None:
            timings.decode = end - first_token_at
        running = end - admitted
        timings.tokens_per_second = generated / running if running > 0 else 0.0
        timings.total = end - prepared.submitted_at
        if self._trace is not None:
            self._trace.finish(finish)
        logger.debug(
            "request %s: %d prompt + %d generated tokens, %s, %.3f s (queue %.3f s)",
            self.request_id,
            len(prompt),
            generated,
            finish,
            timings.total,
            timings.queue,
        )
        yield TokenEvent(
            self.request_id,
            None,
            tail,
            generated,
            finish_reason=finish,
            usage=Usage(len(prompt), generated),
        )

    async def _forward_all(
        self, token_ids: Sequence[int], position: int, step: int
    ) -> relay_pb2.ForwardResult:
        """One step through every stage; returns the last stage's result (the sample)."""
        tensor = encode_token_ids(token_ids)
        timings = self.outcome.timings
        result: relay_pb2.ForwardResult | None = None
        for stage, client in zip(self._stages, self._clients, strict=True):
            if self._stopping is not None:
                raise PipelineNotReady(self._stopping)
            entry = relay_pb2.ForwardEntry(
                request_id=self.request_id,
                position=position,
                tensor=tensor,
                sampling=self._sampling,
                step=step,
            )
            self._sessions_opened = True
            started = time.perf_counter()
            response = await client.forward(relay_pb2.ForwardRequest(entries=[entry]))
            rpc_seconds = time.perf_counter() - started
            result = self._single_result(stage, response)
            compute = response.compute_seconds
            network = max(0.0, rpc_seconds - compute)
            timings.stage_compute[stage.device_id] = (
                timings.stage_compute.get(stage.device_id, 0.0) + compute
            )
            timings.network += network
            if self._trace is not None and self._collector is not None:
                self._trace.stage_time(stage.device_id, compute)
                self._trace.network_time(network)
                self._collector.record_transfer(stage.device_id, network)
            tensor = result.tensor
        assert result is not None
        return result

    def _single_result(
        self, stage: Stage, response: relay_pb2.ForwardResponse
    ) -> relay_pb2.ForwardResult:
        if len(response.results) != 1 or response.results[0].request_id != self.request_id:
            raise StageError(
                stage.device_id,
                "Forward",
                "BAD_RESPONSE",
                f"expected one result for request {self.request_id}, got {len(response.results)}",
            )
        return response.results[0]

    def stop(self, reason: str) -> None:
        """Make the run fail with :class:`PipelineNotReady` before its next forward call."""
        self._stopping = reason

    async def end_sessions(self) -> None:
        """EndSession on every stage, concurrently, once; failures are logged, not raised (a
        dead worker has lost the session anyway, a stuck one frees it after its TTL)."""
        if not self._sessions_opened:
            return
        self._sessions_opened = False
        results = await asyncio.gather(
            *(client.end_session(self.request_id) for client in self._clients),
            return_exceptions=True,
        )
        for stage, result in zip(self._stages, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning(
                    "EndSession of request %s on %s failed: %s",
                    self.request_id,
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
