"""The scheduler's data: its settings, the plans it returns and what it keeps of each request.

Plain data (no policy: :mod:`mlx_relay.coordinator.scheduler` decides), and how many
micro-batches run at once by default (:func:`default_micro_batches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mlx_relay.core.blas import same_host

Phase = Literal["prefill", "decode"]


def default_micro_batches(stage_hosts: Sequence[str]) -> int:
    """Micro-batches in flight when ``inference.micro_batches`` is unset: one per machine
    among the stages' hosts (loopback names are one machine).

    Overlapping micro-batches only pay where they compute on different cores. Two stages on
    one 2-core machine, the bundled model, 16 requests in flight: 95.6 tok/s with two
    micro-batches of 8 (a core each), 101.5 with one of 16 (both cores per step); 4 in
    flight: 38.4 vs 42.7.
    """
    machines: list[str] = []
    for host in stage_hosts:
        if not any(same_host(host, known) for known in machines):
            machines.append(host)
    return max(1, len(machines))


# Most first-token micro-batches in a row: a newcomer's prefill and its first decode step,
# then the running streams get a step whatever arrives (they are never starved).
FIRST_TOKEN_STEPS = 2


@dataclass(frozen=True)
class SchedulerSettings:
    """The policy's knobs (``inference`` in the cluster config, stage count for the last).

    Attributes:
        max_batch_size: most requests in one micro-batch.
        prefill_chunk_tokens: most prompt positions one micro-batch prefills, over all its
            requests.
        max_micro_batches: most micro-batches in flight at once.
        first_token_tokens: the longest prefill (a prompt's positions but its last) that gets
            first-token priority; 0: none does.
        chain_max_batch: the most requests in a decode batch whose next step is planned
            before this one is back (:meth:`Scheduler.chain`); 0: none.
    """

    max_batch_size: int
    prefill_chunk_tokens: int
    max_micro_batches: int = 1
    first_token_tokens: int = 0
    chain_max_batch: int = 0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "prefill_chunk_tokens", "max_micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("first_token_tokens", "chain_max_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ScheduledStep:
    """One request's part of a micro-batch: positions ``[position, position + length)``.

    A decode step has length 1 and samples the request's token number ``step``.
    """

    request_id: str
    phase: Phase
    position: int
    length: int
    step: int = 0


@dataclass(frozen=True)
class StepPlan:
    """What one micro-batch runs: the scheduler's whole decision for one step.
    ``follows``: a chained plan's first plan, whose sampled tokens are its inputs."""

    plan_id: int
    steps: tuple[ScheduledStep, ...]
    follows: int | None = None

    @property
    def request_ids(self) -> list[str]:
        return [s.request_id for s in self.steps]

    @property
    def decode_count(self) -> int:
        return sum(1 for s in self.steps if s.phase == "decode")

    @property
    def prefill_tokens(self) -> int:
        return sum(s.length for s in self.steps if s.phase == "prefill")


@dataclass
class RequestState:
    """What the scheduler keeps of one request: positions computed, steps taken, plans."""

    request_id: str
    prompt_prefill: int  # the prompt's positions before its first decode step
    arrival: int
    prefill_length: int = -1  # positions to prefill before the next decode step
    computed: int = 0  # positions the stages hold
    generated: int = 0  # decode steps completed
    in_flight: int | None = None  # plan id
    chained: int | None = None  # the plan chained to that one (its next decode step)
    max_steps: int | None = None  # decode steps it may take at most (None: no limit known)
    last_served: int = -1  # when it was last scheduled (a counter)
    aborted: bool = False
    paused: bool = False
    sent: bool = False  # scheduled since it joined or was last replayed
    urgent: bool = False  # has first-token priority until its first token

    def __post_init__(self) -> None:
        if self.prefill_length < 0:
            self.prefill_length = self.prompt_prefill

    @property
    def decoding(self) -> bool:
        return self.computed >= self.prefill_length
