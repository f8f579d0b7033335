"""The ``mlxrelay.v1.Worker`` gRPC service: typed errors become status codes here.

Status codes a caller can see:
INVALID_ARGUMENT (malformed entry, wrong dtype/shape/byte length, token id outside the
vocabulary, position not equal to the cached length, more positions than
``max_prompt_tokens`` or than the model's context), NOT_FOUND (a step past position 0 for
a request this stage holds no session for), RESOURCE_EXHAUSTED (``max_sessions`` reached,
or the caller's share ``max_sessions_per_peer``; grpc itself for messages over
``max_message_mb`` and for calls past ``maximum_concurrent_rpcs``), UNAVAILABLE (model
still loading or worker stopping), FAILED_PRECONDITION (model failed to load; a ``Reshard``
range that does not fit the worker's memory), UNAUTHENTICATED (missing or wrong bearer
token when ``network.auth_token`` is set), INTERNAL (a bug; logged).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import grpc

from mlx_relay.core.errors import InvalidRequest, RelayError, ShardMismatch
from mlx_relay.core.types import LayerRange
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.proto import relay_pb2_grpc as pb_grpc
from mlx_relay.worker.auth import SERVICE_NAME, BearerTokenInterceptor, peer_of
from mlx_relay.worker.chain import ChainedTokens, chained_inputs, record_answer, record_failure
from mlx_relay.worker.forward_call import CallFailed, ForwardCallInfo
from mlx_relay.worker.forward_stream import serve_stream
from mlx_relay.worker.relay import failure_for, relay
from mlx_relay.worker.sessions import SessionLimitReached, SessionNotFound
from mlx_relay.worker.stage import CheckedEntry, ForwardOutcome, StageRuntime
from mlx_relay.worker.tracing import ForwardSpans
from mlx_relay.worker.worker_state import WorkerState

logger = logging.getLogger(__name__)

__all__ = ["SERVICE_NAME", "BearerTokenInterceptor", "WorkerServicer", "WorkerState", "peer_of"]


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code a typed error maps to."""
    if isinstance(exc, SessionNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, SessionLimitReached):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, InvalidRequest | ShardMismatch):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class WorkerServicer(pb_grpc.WorkerServicer):
    """Forward (unary and streamed), EndSession, Ping and GetStatus over one
    :class:`WorkerState`. ``max_stream_calls``: the most calls one ``ForwardStream`` holds
    at once (None: no limit)."""

    def __init__(self, state: WorkerState, max_stream_calls: int | None = None) -> None:
        self.state = state
        self.max_stream_calls = max_stream_calls
        # The port of this worker's direct link (0: none), named to each ForwardStream's
        # caller (mlx_relay/worker/direct_link.py).
        self.direct_port = 0
        self._releases: set[asyncio.Task[None]] = set()
        # Tokens for chained steps, on the first stage (mlx_relay/worker/chain.py).
        self.chain = ChainedTokens()

    async def _runtime(self, context: grpc.aio.ServicerContext) -> StageRuntime:
        try:
            return self._serving()
        except CallFailed as failed:
            await failed.abort(context)
        raise AssertionError("unreachable")

    def _serving(self) -> StageRuntime:
        """The stage's runtime, once it serves.

        Raises:
            CallFailed: stopping, still loading or failed to load.
        """
        state = self.state
        if state.stopping:
            raise CallFailed(grpc.StatusCode.UNAVAILABLE, f"worker {state.device_id} is stopping")
        if state.load_error is not None:
            raise CallFailed(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {state.device_id} failed to load its model: {state.load_error}",
            )
        if state.runtime is None:
            raise CallFailed(
                grpc.StatusCode.UNAVAILABLE, f"worker {state.device_id} is still loading its model"
            )
        return state.runtime

    async def Forward(
        self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForwardResponse:
        try:
            return await self.serve_forward(request, ForwardCallInfo.of_unary(context))
        except CallFailed as failed:
            await failed.abort(context)
        raise AssertionError("unreachable")

    async def ForwardStream(
        self, requests: AsyncIterator[pb.ForwardCall], context: grpc.aio.ServicerContext
    ) -> None:
        await serve_stream(self, requests, context, self.max_stream_calls)

    async def serve_forward(
        self, request: pb.ForwardRequest, call: ForwardCallInfo
    ) -> pb.ForwardResponse:
        """One Forward, from a unary call or the stream.

        Raises:
            CallFailed: the status the call ends with.
        """
        received = time.perf_counter()
        runtime = self._serving()
        spans = self._spans(request, call, received)
        timing: pb.StageTiming | None = None
        error: str | None = None
        try:
            waited = await chained_inputs(self.chain, request, runtime.is_first, call.deadline)
            response, timing = await self._forward(runtime, request, call, received, spans)
            timing.chain_wait_seconds = waited
            if runtime.is_first and record_answer(self.chain, request, response):
                # A chained step now has its input: it goes to the MLX thread before this
                # step's answer is encoded and written.
                await asyncio.sleep(0)
            return response
        except BaseException as exc:
            error = exc.code.name if isinstance(exc, CallFailed) else type(exc).__name__
            if runtime.is_first:
                failure = (
                    exc
                    if isinstance(exc, CallFailed)
                    else CallFailed(grpc.StatusCode.UNAVAILABLE, f"the step before failed: {exc!r}")
                )
                record_failure(self.chain, request, failure)
            raise
        finally:
            if spans is not None:
                spans.close(timing, error)

    async def _forward(
        self,
        runtime: StageRuntime,
        request: pb.ForwardRequest,
        call: ForwardCallInfo,
        received: float,
        spans: ForwardSpans | None,
    ) -> tuple[pb.ForwardResponse, pb.StageTiming]:
        checking = time.perf_counter()  # after a chained step's wait for its input
        try:
            self._check_layers(request)
            checked = runtime.check(request)
            checked_at = time.perf_counter()
            outcome = await self.state.executor.run(
                self._compute, runtime, checked, call.peer, request.microbatches_in_flight
            )
        except RelayError as exc:
            code = status_code_for(exc)
            logger.info("Forward rejected with %s: %s", code.name, exc)
            raise CallFailed(code, str(exc)) from None
        except Exception as exc:
            if self.state.executor.closed:
                raise CallFailed(grpc.StatusCode.UNAVAILABLE, "worker is stopping") from None
            logger.exception("Forward failed")
            raise CallFailed(grpc.StatusCode.INTERNAL, f"forward failed: {exc}") from None
        self._record(outcome)
        own = pb.ForwardResponse(
            results=outcome.results,
            device_id=self.state.device_id,
            compute_seconds=outcome.compute_seconds,
            stages=[
                pb.StageTiming(
                    device_id=self.state.device_id,
                    compute_seconds=outcome.compute_seconds,
                    compute_offset_seconds=max(0.0, outcome.started - received),
                    check_seconds=checked_at - checking,
                    queue_seconds=max(0.0, outcome.started - checked_at),
                    encode_seconds=outcome.encode_seconds,
                    sample_seconds=outcome.sample_seconds,
                )
            ],
        )
        if not request.route:
            own.stages[0].handled_seconds = time.perf_counter() - received
            return own, own.stages[0]
        # The MLX thread is free again: this stage takes its next micro-batch while this
        # one runs downstream.
        parents = spans.hop_parents(request.route[0].device_id) if spans is not None else None
        response = await self._relay(request, own, call, received, parents)
        timing = response.stages[0]
        timing.handled_seconds = time.perf_counter() - received
        return response, timing

    def _spans(
        self, request: pb.ForwardRequest, call: ForwardCallInfo, received: float
    ) -> ForwardSpans | None:
        """This call's spans, when this worker records spans."""
        state = self.state
        if state.tracer is None:
            return None
        spans = ForwardSpans(
            state.tracer, state.device_id, state.stage, request, call.traceparent, received
        )
        return spans if spans.traced else None

    def _check_layers(self, request: pb.ForwardRequest) -> None:
        """Refuse a step meant for other layers than this stage's (a worker restarted with
        its configured layers after a live repartition moved them).

        Raises:
            ShardMismatch: the caller expects another range.
        """
        if not request.layer_end:
            return
        state = self.state
        try:
            expected = LayerRange(request.layer_start, request.layer_end)
        except ValueError as exc:
            raise InvalidRequest(f"layer_start, layer_end: {exc}") from None
        if state.layer_range != expected:
            raise ShardMismatch(
                f"worker {state.device_id} serves layers {state.layer_range}, the caller "
                f"expects {expected} (restarted with its configured layers after a live "
                f"repartition? apply the split again with mlx-relay rebalance)"
            )

    def _compute(
        self, runtime: StageRuntime, checked: list[CheckedEntry], peer: str, in_flight: int
    ) -> ForwardOutcome:
        """The step on the MLX thread, with as many BLAS threads as it may use; after it,
        the BLAS helpers sleep where other workers share the host."""
        threads = self.state.threads if runtime.engine.blas_threads else None
        if threads is not None:
            threads.apply(in_flight)
        try:
            return runtime.forward(checked, peer)
        finally:
            if threads is not None:
                threads.rest()

    async def _relay(
        self,
        request: pb.ForwardRequest,
        own: pb.ForwardResponse,
        call: ForwardCallInfo,
        received: float,
        parents: list[str] | None,
    ) -> pb.ForwardResponse:
        state = self.state
        try:
            if state.peers is None or state.runtime is None or state.runtime.is_last:
                raise InvalidRequest(f"worker {state.device_id} is the last stage: no route")
            return await relay(
                state.peers,
                request,
                own,
                call.time_remaining(),
                state.collector,
                received,
                parents,
            )
        except InvalidRequest as exc:
            raise CallFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except RelayError as exc:
            raise failure_for(exc, state.device_id) from None

    def _record(self, outcome: ForwardOutcome) -> None:
        collector = self.state.collector
        if collector is not None:
            for call in outcome.calls:
                collector.record_stage_forward(
                    self.state.stage, call.phase, call.seconds, call.tokens, call.batch_size
                )
        self.state.report_sessions()

    async def EndSession(
        self, request: pb.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndSessionResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id must not be empty")
        runtime = self.state.runtime
        existed = runtime.sessions.end(request.request_id) if runtime is not None else False
        if runtime is not None and request.request_id in runtime.batches:
            # Its positions sit in a decode batch: free them on the MLX thread now rather
            # than at the stage's next Forward, without making this call wait for it.
            task = asyncio.get_running_loop().create_task(self._release(runtime))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)
        self.state.report_sessions()
        return pb.EndSessionResponse(request_id=request.request_id, existed=existed)

    async def _release(self, runtime: StageRuntime) -> None:
        try:
            await self.state.executor.run(runtime.release_ended)
        except RuntimeError:
            logger.debug("batch rows not freed: the MLX thread is stopping")

    async def Ping(
        self, request: pb.PingRequest, context: grpc.aio.ServicerContext
    ) -> pb.PingResponse:
        return pb.PingResponse(
            request_id=request.request_id,
            payload=request.payload,
            sent_at=request.sent_at,
            device_id=self.state.device_id,
        )

    async def Reshard(
        self, request: pb.ReshardRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReshardResponse:
        await self._runtime(context)
        reshard = self.state.reshard
        if reshard is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"worker {self.state.device_id} is still loading"
            )
        try:
            response: pb.ReshardResponse = await reshard.handle(request)
        except (InvalidRequest, ShardMismatch) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RelayError as exc:
            # The range does not fit (PartitionError) or cannot be loaded (ModelError).
            logger.warning("Reshard refused: %s", exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:
            if self.state.executor.closed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is stopping")
            logger.exception("Reshard failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"reshard failed: {exc}")
        return response

    async def GetStatus(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatusResponse:
        state = self.state
        response = pb.StatusResponse(
            request_id=request.request_id,
            device_id=state.device_id,
            stage=state.stage,
            model_loaded=state.runtime is not None,
            kv_sessions=state.kv_sessions,
            health_status=state.health_status(),
            uptime_seconds=time.monotonic() - state.started_at,
        )
        if state.layer_range is not None:
            response.layer_start = state.layer_range.start
            response.layer_end = state.layer_range.end
        if state.model_info is not None:
            response.num_layers = state.model_info.num_layers
            response.model_name = state.model_info.name
            response.hidden_size = state.model_info.hidden_size
        if state.runtime is not None:
            engine = state.runtime.engine
            response.hidden_size = state.runtime.hidden_size
            response.dtype = state.runtime.input_dtype
            response.backend = engine.backend
            response.compute = engine.compute
            response.blas = engine.blas
            response.blas_threads = state.blas_threads
        if state.collector is not None:
            response.metrics_json = json.dumps(state.collector.export_metrics(), default=str)
        if state.health is not None:
            response.health_json = json.dumps(state.health.get_health_summary(), default=str)
        return response
