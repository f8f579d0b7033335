"""One step of the pipeline on the wire: its entries, the relayed ``Forward``, its answer.

The coordinator sends a micro-batch's entries (token ids) and the route (the later stages'
ids, addresses and layers) to the first stage; each stage relays its hidden states to the
next (:mod:`mlx_relay.worker.relay`) and the answer comes back up the chain with the last
stage's results and every stage's timing. :func:`step_entries` builds the entries from the
requests (:class:`Member`), :func:`forward_step` makes the call and keeps the
collector's view of the micro-batch outstanding on every stage; :func:`stage_times` and
:func:`matching_results` check and read the answer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mlx_relay.coordinator.client import StageError, WorkerClient
from mlx_relay.coordinator.compute_windows import Window, compute_windows
from mlx_relay.coordinator.scheduler import StepPlan
from mlx_relay.coordinator.tracing import RequestSpans, StepTrace
from mlx_relay.core.types import LayerRange
from mlx_relay.proto import relay_pb2
from mlx_relay.wire import encode_token_ids

if TYPE_CHECKING:
    from mlx_relay.coordinator.step_loop import StepLoop


class Member(Protocol):
    """A request as the step loop drives it (``RequestRun``)."""

    request_id: str
    prompt_ids: list[int]
    sampling: relay_pb2.SamplingParams
    max_steps: int | None  # the most tokens it generates (no step is chained past them)
    spans: RequestSpans | None  # its trace, when tracing is on

    @property
    def session_id(self) -> str:
        """The id of the request's KV sessions on the stages (new after each replay)."""

    def prefill_ids(self, position: int, length: int) -> list[int]:
        """The token ids at ``[position, position + length)`` of the prompt followed by
        the tokens generated so far (what a prefill step, or a replay's, computes)."""

    def next_token(self) -> int:
        """The input of the request's next decode step."""

    def replay(self, failed_at: float) -> None:
        """The stages lost the request's caches at ``failed_at`` (monotonic s): it moves to
        a new session id, and its next token ends the pause."""

    def moved(self, loop: StepLoop) -> None:
        """The request now runs in ``loop`` (another path through the stages' replicas)."""

    def on_token(self, result: relay_pb2.ForwardResult) -> bool:
        """The last stage sampled the request's next token; True when it is finished."""

    def on_stage(self, device_id: str, compute: float, network: float) -> None:
        """One of the request's steps spent this long on a stage and on the wire."""

    def fail(self, error: BaseException) -> None:
        """The request cannot go on (a stage failed, the coordinator stops)."""


class StageView(Protocol):
    """What a step needs of a stage (``pipeline.Stage``)."""

    @property
    def device_id(self) -> str: ...

    @property
    def index(self) -> int: ...

    @property
    def layer_range(self) -> LayerRange: ...


def step_entries(
    plan: StepPlan, members: Mapping[str, Member], trace: StepTrace | None = None
) -> list[relay_pb2.ForwardEntry]:
    """The first stage's entry for each step of ``plan``: the prompt chunk's or the next
    token's ids (none for a chained plan's: the first stage takes the tokens its first plan
    samples), the request's sampling and its trace context."""
    entries = []
    chained = plan.follows is not None
    for step in plan.steps:
        member = members[step.request_id]
        entry = relay_pb2.ForwardEntry(
            request_id=member.session_id,
            position=step.position,
            sampling=member.sampling,
            step=step.step,
            traceparent=trace.join(member.spans, step) if trace is not None else "",
            chained=chained,
        )
        if not chained:
            ids = (
                member.prefill_ids(step.position, step.length)
                if step.phase == "prefill"
                else [member.next_token()]
            )
            entry.tensor.CopyFrom(encode_token_ids(ids))
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class Answer:
    """A relayed step's reply and how long the coordinator's call took."""

    reply: relay_pb2.ForwardResponse
    rpc_seconds: float
    sent: float  # time.monotonic() when the call started (the traces' clock)


async def forward_step(
    client: WorkerClient,
    stages: Sequence[StageView],
    route: Sequence[relay_pb2.Hop],
    entries: list[relay_pb2.ForwardEntry],
    in_flight: int,
    collector: Any | None = None,
) -> Answer:
    """One relayed ``Forward``: token ids to the first stage (``client``), the route to the
    others. ``in_flight``: the micro-batches in the pipeline, for the stages' BLAS threads.
    The collector sees the micro-batch outstanding on every stage until it is back.

    Raises:
        RelayError: as :meth:`WorkerClient.forward` (the failing stage named).
    """
    tokens: list[int] = []
    if collector is not None:
        tokens = [
            collector.stage_forward_started(stage.device_id, stage.index, len(entries))
            for stage in stages
        ]
    reply: relay_pb2.ForwardResponse | None = None
    first = stages[0]
    sent = time.monotonic()
    started = time.perf_counter()
    try:
        reply = await client.forward(
            relay_pb2.ForwardRequest(
                entries=entries,
                route=route,
                layer_start=first.layer_range.start,
                layer_end=first.layer_range.end,
                microbatches_in_flight=in_flight,
            ),
            traceparent=entries[0].traceparent if entries else "",
        )
    finally:
        seconds = time.perf_counter() - started
        if collector is not None:
            windows = _windows_by_stage(reply, seconds)
            for stage, token in zip(stages, tokens, strict=True):
                collector.stage_forward_finished(
                    stage.device_id, token, windows.get(stage.device_id)
                )
    return Answer(reply, seconds, sent)


def stage_times(
    stages: Sequence[StageView], reply: relay_pb2.ForwardResponse, rpc_seconds: float
) -> list[tuple[StageView, float, float]]:
    """Each stage's compute and network seconds in one relayed step: a stage's network
    time is its call's time less its compute, less the call it made to the next and less
    a chained step's wait for its input.

    Raises:
        StageError: the reply does not time the stages of the route, in order.
    """
    timings = list(reply.stages)
    if [t.device_id for t in timings] != [s.device_id for s in stages]:
        raise StageError(
            stages[0].device_id,
            "Forward",
            "BAD_RESPONSE",
            f"expected timings of stages {[s.device_id for s in stages]}, "
            f"got {[t.device_id for t in timings]}",
        )
    calls = [rpc_seconds] + [t.rpc_seconds for t in timings[1:]] + [0.0]
    # A chained step's wait for the step before it is neither compute nor network.
    return [
        (
            stage,
            t.compute_seconds,
            max(0.0, calls[i] - t.compute_seconds - calls[i + 1] - t.chain_wait_seconds),
        )
        for i, (stage, t) in enumerate(zip(stages, timings, strict=True))
    ]


def _windows_by_stage(
    reply: relay_pb2.ForwardResponse | None, rpc_seconds: float
) -> dict[str, Window | None]:
    """When each stage computed, in seconds after the send; empty after an error."""
    if reply is None:
        return {}
    windows = compute_windows(reply.stages, rpc_seconds)
    return {t.device_id: w for t, w in zip(reply.stages, windows, strict=True)}


def matching_results(
    device_id: str,
    entries: Sequence[relay_pb2.ForwardEntry],
    response: relay_pb2.ForwardResponse,
) -> list[relay_pb2.ForwardResult]:
    """The last stage's (``device_id``) results, one per entry in the entries' order.

    Raises:
        StageError: the results do not answer the entries.
    """
    got = [r.request_id for r in response.results]
    wanted = [e.request_id for e in entries]
    if got != wanted:
        raise StageError(
            device_id,
            "Forward",
            "BAD_RESPONSE",
            f"expected results for {len(wanted)} requests in order, got {len(got)}",
        )
    return list(response.results)
