"""Where a request's end-to-end time went: queue, coordinator, compute per stage, network per
link, bubble (pure functions over a :class:`~.timeline.RequestTimeline`).

Each part is measured, not derived from the others: the queue is the admission wait; the
coordinator's share is tokenizing plus each step's time outside its call to the first stage;
a stage's compute is its own time answering less its queue and its call to the next stage; a
link's network time is the call as its caller timed it less the callee's own time (both
directions, gRPC included); the bubble is the time the request waited inside the pipeline
with nothing done for it: before and between its steps, and in a stage's queue while that
stage computed another micro-batch. A chained step (sent before the step before it was
back) counts from that step's end: its wait on the first stage is left out, and its parts
are scaled to the rest of its time. ``residual_s`` is what none of them covers; it stays
within a few per cent of ``e2e_s`` (the tests check 2 %).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mlx_relay.monitoring.traces.timeline import RequestStep, RequestTimeline, StageTimes


@dataclass
class Attribution:
    """One request's (or many requests', summed) time by where it went, in seconds."""

    e2e_s: float = 0.0
    queue_s: float = 0.0
    coordinator_s: float = 0.0
    compute_s: dict[str, float] = field(default_factory=dict)
    network_s: dict[str, float] = field(default_factory=dict)
    bubble_s: float = 0.0

    @property
    def accounted_s(self) -> float:
        return (
            self.queue_s
            + self.coordinator_s
            + sum(self.compute_s.values())
            + sum(self.network_s.values())
            + self.bubble_s
        )

    @property
    def residual_s(self) -> float:
        return self.e2e_s - self.accounted_s

    def add(self, other: Attribution) -> None:
        self.e2e_s += other.e2e_s
        self.queue_s += other.queue_s
        self.coordinator_s += other.coordinator_s
        self.bubble_s += other.bubble_s
        for key, value in other.compute_s.items():
            self.compute_s[key] = self.compute_s.get(key, 0.0) + value
        for key, value in other.network_s.items():
            self.network_s[key] = self.network_s.get(key, 0.0) + value

    def scaled(self, factor: float) -> Attribution:
        return Attribution(
            e2e_s=self.e2e_s * factor,
            queue_s=self.queue_s * factor,
            coordinator_s=self.coordinator_s * factor,
            compute_s={k: v * factor for k, v in self.compute_s.items()},
            network_s={k: v * factor for k, v in self.network_s.items()},
            bubble_s=self.bubble_s * factor,
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "e2e_s": self.e2e_s,
            "queue_s": self.queue_s,
            "coordinator_s": self.coordinator_s,
            "compute_s": dict(self.compute_s),
            "network_s": dict(self.network_s),
            "bubble_s": self.bubble_s,
            "residual_s": self.residual_s,
        }


@dataclass(frozen=True, slots=True)
class CallSplit:
    """One stage's part of one micro-batch's call: its compute, the network time of the
    link into it, its queue wait, and when (from the call's start) it began handling the
    call (after a chained step's wait) and answered it (the network assumed symmetric:
    half the link's time each way). ``call_begin`` and ``call`` place the call into it; all
    times are seconds from the first call's start."""

    device_id: str
    compute: float
    network: float
    queue: float
    call_begin: float
    call: float
    begin: float
    end: float
    stage: StageTimes


def split_call(rpc: float, stages: tuple[StageTimes, ...]) -> list[CallSplit]:
    """Each stage's share of a relayed call that took ``rpc`` seconds at the coordinator.

    A stage that did not report its own time (``handler == 0``) counts its compute only,
    and its link the rest.
    """
    calls = [rpc] + [s.call for s in stages[1:]] + [0.0]
    splits = []
    begin = 0.0
    for i, stage in enumerate(stages):
        call, inner = calls[i], calls[i + 1]
        wait = min(stage.chain_wait, call)
        handler = (
            stage.handler - wait if stage.handler > 0 else min(call - wait, stage.compute + inner)
        )
        network = max(0.0, call - wait - handler)
        start = begin + network / 2 + wait
        splits.append(
            CallSplit(
                stage.device_id,
                compute=max(0.0, handler - stage.queue - inner),
                network=network,
                queue=stage.queue,
                call_begin=begin,
                call=call,
                begin=start,
                end=start + handler,
                stage=stage,
            )
        )
        begin = start + (stage.relay_offset - wait if stage.relay_offset > 0 else handler - inner)
    return splits


def attribute(timeline: RequestTimeline) -> Attribution:
    """The request's time by where it went (see the module docstring)."""
    finished = timeline.finished if timeline.finished is not None else timeline.arrival
    result = Attribution(e2e_s=finished - timeline.arrival)
    prepared = min(timeline.prepared or timeline.arrival, finished)
    result.coordinator_s = prepared - timeline.arrival
    admitted = timeline.admitted if timeline.admitted is not None else finished
    admitted = min(admitted, finished)
    result.queue_s = max(0.0, admitted - prepared)
    links = timeline.links
    for device_id in timeline.stages:
        result.compute_s[device_id] = 0.0
    for link in links:
        result.network_s[link] = 0.0
    last_end = admitted
    for step in timeline.steps:
        record = step.record
        if record.started >= finished:
            break
        end = min(record.ended or finished, finished)
        result.bubble_s += max(0.0, record.started - last_end)
        if end > last_end:
            # A chained step began before the step before it ended: only the rest is its.
            parts = Attribution()
            _step_parts(parts, step, end, links)
            window = end - max(record.started, last_end)
            if parts.accounted_s > window > 0:
                parts = parts.scaled(window / parts.accounted_s)
            result.add(parts)
        last_end = max(last_end, end)
    result.bubble_s += max(0.0, finished - last_end)
    return result


def _step_parts(result: Attribution, step: RequestStep, end: float, links: list[str]) -> None:
    """Add one step's ``[started, end)`` to ``result``: the coordinator's part around the
    call, each stage's and link's part of the call (scaled down when the request ended
    during the call)."""
    record = step.record
    sent = min(record.sent or end, end)
    received = min(record.received or end, end)
    result.coordinator_s += (sent - record.started) + (end - received)
    rpc = received - sent
    full = (record.received - record.sent) if record.received else 0.0
    if rpc <= 0:
        return
    if not record.stages or full <= 0:
        first = links[0] if links else "network"
        result.network_s[first] = result.network_s.get(first, 0.0) + rpc
        return
    share = rpc / full
    for link, split in zip(links, split_call(full, record.stages), strict=False):
        result.compute_s[split.device_id] = (
            result.compute_s.get(split.device_id, 0.0) + split.compute * share
        )
        result.network_s[link] = result.network_s.get(link, 0.0) + split.network * share
        result.bubble_s += split.queue * share


def total(attributions: Iterable[Attribution]) -> Attribution:
    summed = Attribution()
    for one in attributions:
        summed.add(one)
    return summed
