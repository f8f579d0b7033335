"""The one loop that runs the scheduler's plans through the stages.

Each :class:`~mlx_relay.coordinator.scheduler.StepPlan` becomes one ``Forward`` to the first
stage, carrying an entry per request (token ids) and the route (the later stages' ids and
addresses): each stage relays its hidden states to the next itself
(:mod:`mlx_relay.worker.relay`) and the last stage's sampled tokens come back up the chain to
each request's :class:`Member`, which decides whether it is finished. Up to one plan per stage is
in flight, each in its own task. Waiting in the scheduler is no RPC: each ``Forward`` has
the whole ``network.request_timeout`` for itself (each hop gets what its caller has left,
less a margin, so a failing stage is named before the coordinator's deadline passes).

With ``recovery_timeout`` above 0, a stage failure the requests can survive
(:func:`~mlx_relay.coordinator.recovery.is_recoverable`) pauses the loop instead of failing
them: once every stage serves again the requests are replayed and go on
(:mod:`mlx_relay.coordinator.recovery`).

:meth:`StepLoop.hold` lets the running requests finish while new ones wait to join (a live
repartition drains the pipeline so; :meth:`StepLoop.drained`, then :meth:`StepLoop.end_hold`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mlx_relay.coordinator import recovery
from mlx_relay.coordinator.client import WorkerClient
from mlx_relay.coordinator.loop_recovery import LoopRecovery
from mlx_relay.coordinator.scheduler import Scheduler, SchedulerSettings, StepPlan
from mlx_relay.coordinator.step_forward import (
    Member,
    StageView,
    forward_step,
    matching_results,
    stage_times,
    step_entries,
)
from mlx_relay.coordinator.tracing import StepTrace
from mlx_relay.core.errors import PipelineNotReady, WorkerUnavailable
from mlx_relay.proto import relay_pb2

logger = logging.getLogger(__name__)

# The longest a request joining an idle loop waits for the requests still being tokenized
# (seconds): a burst's prompts take a millisecond or less each.
ARRIVAL_WAIT = 0.05


class StepLoop(LoopRecovery):
    """Continuous batching over the pipeline: requests join with :meth:`join` and leave
    when finished, failed or after :meth:`leave`.

    Args:
        stages: the pipeline, in order.
        clients: one client per stage, same order.
        settings: the scheduler's settings.
        collector: the coordinator's MetricsCollector, or None.
        traced: record each micro-batch for its requests' traces
            (:class:`~mlx_relay.coordinator.tracing.StepTrace`).
        recovery_timeout: seconds the requests wait for a failed stage to serve again
            (``network.recovery_timeout``); 0 fails them at once.
        restore: awaited before a replay, once every stage serves: gives a restarted
            worker the layers the route names (after a live repartition).
        failover: given this loop and a failed stage's device id, another loop (a path
            through live replicas) to move the requests to, or None to wait for the stage
            (:class:`~mlx_relay.coordinator.replicas.ReplicaRouter`).
        pipeline_in_flight: the micro-batches in flight in every loop over these workers
            (each ``Forward`` carries it, for the stages' BLAS threads); default: this
            loop's own.
        arrivals: how many requests are being prepared (tokenized) right now: a request
            joining an idle loop while others are waits for them (:meth:`arrived`), at
            most :data:`ARRIVAL_WAIT`, so that a burst starts as one micro-batch.
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
        failover: Callable[[StepLoop, str], StepLoop | None] | None = None,
        pipeline_in_flight: Callable[[], int] | None = None,
        arrivals: Callable[[], int] | None = None,
    ) -> None:
        self._stages = stages
        # Micro-batches in flight in every loop over these workers: each Forward carries it,
        # so that a stage takes only the cores no other stage of its host may compute on.
        self._pipeline_in_flight = pipeline_in_flight or (lambda: self._scheduler.computing)
        self._traced = traced
        self._clients = clients
        self._route = self._routed()
        self._scheduler = Scheduler(settings)
        self._collector = collector
        self._members: dict[str, Member] = {}
        self._left: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped: str | None = None
        self._recovery_timeout = recovery_timeout
        self._failover = failover
        # While a stage failure is being recovered from: when it began, the last error.
        self._failed_at: float | None = None
        self._failure: BaseException | None = None
        self._recovering = False
        self._restore = restore
        self._held = False
        self._held_back: list[Member] = []
        self._idle: list[asyncio.Future[None]] = []
        self._arrivals = arrivals
        self._gate: asyncio.TimerHandle | None = None  # a burst's first requests wait

    def _routed(self) -> list[relay_pb2.Hop]:
        """The route of every step: each later stage's address and the layers it holds
        (a stage holding others refuses the step)."""
        return [
            relay_pb2.Hop(
                device_id=stage.device_id,
                address=client.address,
                layer_start=stage.layer_range.start,
                layer_end=stage.layer_range.end,
            )
            for stage, client in zip(self._stages[1:], self._clients[1:], strict=True)
        ]

    @property
    def in_flight(self) -> int:
        return self._scheduler.in_flight

    @property
    def computing(self) -> int:
        """Micro-batches in flight that the stages may compute now (a chained plan waits
        for the plan before it)."""
        return self._scheduler.computing

    @property
    def scheduled(self) -> int:
        """Requests the scheduler holds (running, not yet finished)."""
        return len(self._scheduler)

    @property
    def held_back(self) -> int:
        """Requests waiting to join while the loop is held."""
        return len(self._held_back)

    def join(self, member: Member) -> None:
        """Schedule a request from the next step on (from :meth:`end_hold` on while held).

        Raises:
            PipelineNotReady: the loop was stopped.
        """
        if self._stopped is not None:
            raise PipelineNotReady(self._stopped)
        if self._held:
            self._members[member.request_id] = member
            self._held_back.append(member)
            return
        self._scheduler.add(member.request_id, len(member.prompt_ids), max_steps=member.max_steps)
        self._members[member.request_id] = member
        if self._arrivals is not None and self._arrivals() and not self._scheduler.in_flight:
            # A burst on an idle pipeline: the requests still being tokenized join first,
            # then all start in one micro-batch (one prefill for all, one batch group on
            # each stage) instead of the first alone and the others merged in later.
            if self._gate is None:
                loop = asyncio.get_running_loop()
                self._gate = loop.call_later(ARRIVAL_WAIT, self._pump)
            return
        self._pump()

    def arrived(self) -> None:
        """The requests being prepared are done: those waiting to start do (see ``arrivals``)."""
        if self._gate is not None:
            self._pump()

    def hold(self) -> None:
        """From now on new requests wait to join; the scheduled ones run to their end."""
        self._held = True

    async def drained(self) -> None:
        """Wait until no request is scheduled and no micro-batch is in flight.

        Raises:
            PipelineNotReady: the loop was stopped meanwhile.
        """
        while len(self._scheduler) or self._scheduler.in_flight:
            if self._stopped is not None:
                raise PipelineNotReady(self._stopped)
            idle = asyncio.get_running_loop().create_future()
            self._idle.append(idle)
            await idle
        if self._stopped is not None:
            raise PipelineNotReady(self._stopped)

    def end_hold(self) -> None:
        """The requests that waited join, in arrival order, and new ones join at once;
        the steps from now on name the stages' layers as they are now."""
        self._route = self._routed()
        self._held = False
        waiting, self._held_back = self._held_back, []
        for member in waiting:
            if self._members.get(member.request_id) is member:
                self._scheduler.add(
                    member.request_id, len(member.prompt_ids), max_steps=member.max_steps
                )
        self._pump()

    def leave(self, request_id: str) -> asyncio.Future[None]:
        """Take a request out; the future is done once no micro-batch holds it any more
        (then its KV sessions may be ended without failing anyone else's step)."""
        self._scheduler.abort(request_id)
        self._held_back = [m for m in self._held_back if m.request_id != request_id]
        done = asyncio.get_running_loop().create_future()
        if request_id in self._scheduler:
            self._left[request_id] = done
        else:
            self._members.pop(request_id, None)
            done.set_result(None)
        self._report_held()
        return done

    def pause(self, request_id: str) -> None:
        """Take no step for the request until :meth:`resume`: its caller has not read the
        tokens it already has (``inference.stream_buffer_tokens``)."""
        self._scheduler.pause(request_id)
        self._report_held()

    def resume(self, request_id: str) -> None:
        """Schedule a paused request again."""
        self._scheduler.resume(request_id)
        self._pump()

    async def stop(self, reason: str) -> None:
        """Fail every request with :class:`PipelineNotReady` and cancel the steps in flight."""
        self._stopped = reason
        if self._gate is not None:
            self._gate.cancel()
            self._gate = None
        for member in list(self._members.values()):
            member.fail(PipelineNotReady(reason))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._held_back = []
        for future in [*self._left.values(), *self._idle]:
            if not future.done():
                future.set_result(None)
        self._idle = []
        if self._collector is not None:
            self._collector.set_requests_scheduled(0)

    @property
    def stages(self) -> Sequence[StageView]:
        return self._stages

    @property
    def clients(self) -> Sequence[WorkerClient]:
        return self._clients

    @property
    def path(self) -> tuple[str, ...]:
        """The device id of each stage this loop runs through."""
        return tuple(stage.device_id for stage in self._stages)

    def adopt(self, member: Member, generated: int) -> None:
        """Take over a request from another loop; it has ``generated`` tokens so far and
        starts with their replay (it joins as :meth:`join` otherwise)."""
        self._scheduler.add(member.request_id, len(member.prompt_ids), generated, member.max_steps)
        self._members[member.request_id] = member
        if getattr(member, "paused", False):
            self._scheduler.pause(member.request_id)
        self._pump()

    @property
    def recovering(self) -> bool:
        """Whether the loop is paused, waiting for a failed stage to serve again."""
        return self._recovering

    def _pump(self) -> None:
        """Start as many planned micro-batches as the scheduler allows."""
        if self._gate is not None:
            self._gate.cancel()
            self._gate = None
        while (
            self._stopped is None
            and not self._recovering
            and (plan := self._scheduler.schedule()) is not None
        ):
            self._spawn(self._execute(plan))
        if self._stopped is None and not self._recovering:
            # Sent right behind the plan it follows, on the same stream, so the first stage
            # has it waiting when that plan's tokens come back (scheduler.py, "Chained steps").
            chained = self._scheduler.chain()
            if chained is not None:
                self._spawn(self._execute(chained))
        self._report_held()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _report_held(self) -> None:
        """Tell the collector how many unfinished, unpaused requests the loop holds (the
        bubble is the time a stage has no Forward while this is above zero)."""
        if self._collector is not None:
            self._collector.set_requests_scheduled(self._scheduler.runnable)
        if self._idle and not len(self._scheduler) and not self._scheduler.in_flight:
            idle, self._idle = self._idle, []
            for future in idle:
                if not future.done():
                    future.set_result(None)

    async def _execute(self, plan: StepPlan) -> None:
        trace = StepTrace(plan) if self._traced else None
        try:
            results = await self._forward_all(plan, trace)
        except asyncio.CancelledError as exc:
            self._scheduler.fail(plan)
            if trace is not None:
                trace.close(exc)
            raise
        except Exception as exc:
            if trace is not None:
                trace.close(exc)
            if self._scheduler.broken(plan):
                self._drop_broken(plan)
                return
            if self._recovery_timeout > 0 and recovery.is_recoverable(exc):
                self._scheduler.rewind(plan)
                self._settle(plan)
                self._begin_recovery(exc)
                return
            failed = self._scheduler.fail(plan)
            if isinstance(exc, WorkerUnavailable):
                # The stage is down or stuck: the requests waiting for their next step would
                # only wait for it once more, a whole deadline later. They fail now with the
                # same named error; those in another micro-batch fail by their own deadline.
                for request_id in self._scheduler.idle():
                    self._scheduler.abort(request_id)
                    failed.append(request_id)
            for request_id in failed:
                member = self._members.pop(request_id, None)
                if member is not None and request_id not in self._left:
                    member.fail(exc)
                future = self._left.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(None)
            self._settle(plan)
            self._pump()
            return
        if self._scheduler.broken(plan):
            if trace is not None:
                trace.close()
            self._drop_broken(plan)
            return
        finished = []
        for step in plan.steps:
            member = self._members.get(step.request_id)
            if step.phase != "decode" or member is None or step.request_id in self._left:
                continue
            try:
                done = member.on_token(results[step.request_id])
            except Exception as exc:  # a bug in one request must not stop the others
                logger.exception("request %s failed on its token", step.request_id)
                member.fail(exc)
                done = True
            if done:
                finished.append(step.request_id)
        if trace is not None:
            trace.close()
        self._scheduler.complete(plan, finished)
        for request_id in finished:
            self._members.pop(request_id, None)
        if not self._recovering:
            self._failed_at = None  # a step after the replay went through: recovered
        self._settle(plan)
        self._pump()

    def _drop_broken(self, plan: StepPlan) -> None:
        """A chained plan whose first plan failed: its requests went the first plan's way
        (failed, or rewound for a replay), whatever this one's answer."""
        self._scheduler.rewind(plan)
        self._settle(plan)
        self._pump()

    def _settle(self, plan: StepPlan) -> None:
        """Resolve the :meth:`leave` futures of requests no micro-batch holds any more."""
        for request_id in plan.request_ids:
            if request_id in self._scheduler:
                continue
            self._members.pop(request_id, None)
            future = self._left.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(None)

    async def _forward_all(
        self, plan: StepPlan, trace: StepTrace | None = None
    ) -> dict[str, relay_pb2.ForwardResult]:
        """One step of the plan through every stage; the last stage's results by request."""
        entries = step_entries(plan, self._members, trace)
        answer = await forward_step(
            self._clients[0],
            self._stages,
            self._route,
            entries,
            self._pipeline_in_flight(),
            self._collector,
        )
        reply = answer.reply
        if trace is not None:
            trace.answered(answer.sent, answer.sent + answer.rpc_seconds, reply.stages)
        results = matching_results(self._stages[-1].device_id, entries, reply)
        for stage, compute, network in stage_times(self._stages, reply, answer.rpc_seconds):
            if self._collector is not None and stage.index == 0:
                self._collector.record_transfer(stage.device_id, network)
            for step in plan.steps:
                member_ = self._members.get(step.request_id)
                if member_ is not None:
                    member_.on_stage(stage.device_id, compute, network)
        return {step.request_id: r for step, r in zip(plan.steps, results, strict=True)}
