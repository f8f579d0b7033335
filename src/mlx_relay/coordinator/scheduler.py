"""Continuous batching as a pure policy: which requests' steps go into the next micro-batch.

The scheduler decides and never runs the model: :meth:`Scheduler.schedule` returns a
:class:`StepPlan` (plain data: for each request, which positions this step covers), the
caller runs it through the stages and reports back with :meth:`Scheduler.complete`. It
knows positions, not token ids, and nothing of gRPC or time.

Policy, for each micro-batch:

- New requests join at step boundaries, in arrival order; finished or aborted ones leave.
- A request's prompt, all but its last token, is prefilled in chunks; its last prompt token
  is its first decode step, which samples its first token (the split a single process uses,
  so batched runs give the same tokens).
- Every decode-ready request that is not in flight gets a step (the least recently served
  first, at most ``max_batch_size`` rows, one fewer while a prompt waits so that prompts
  always advance); prefill chunks fill what is left of the rows and of
  ``prefill_chunk_tokens``, prompts already started first. A long prompt therefore never
  stalls the streams already running: it advances one chunk per step alongside them.
- First-token priority: a new request whose prompt prefills in at most
  ``first_token_tokens`` positions, arriving while other streams run, takes its prefill and
  its first decode step in micro-batches of its own (with any other such newcomers), ahead
  of the running streams, at most :data:`FIRST_TOKEN_STEPS` such micro-batches in a row. A
  short chat turn answers under load nearly as fast as on an idle pipeline; the running
  streams wait those two short steps once. Longer prompts take the chunked path above.
- A paused request (its client has not read the tokens it already has,
  :meth:`Scheduler.pause`) takes no step and holds no row until :meth:`Scheduler.resume`.
- Up to ``max_micro_batches`` plans are in flight at once, and a request is in at most one
  of them (but for chained steps, below): the requests are shared out, each plan taking at
  most ``ceil(requests / max_micro_batches)`` rows. By default one per machine the stages run on
  (:func:`default_micro_batches`): stages on separate machines all have work, while stages
  sharing one machine's cores get one larger batch instead of smaller overlapping ones.

Chained steps (``chain_max_batch``): while one all-decode plan of at most that many rows
holds every running request and nothing else waits, :meth:`Scheduler.chain` plans their
next decode step before this one is back. The first stage starts it from the tokens the
step before samples as soon as they come back to it from the later stages
(:mod:`mlx_relay.worker.chain`): the coordinator is off the token's critical path. A
request is then in two plans, the second following the first; a request that reaches
``max_steps`` is not chained, and one that finishes early (EOS, stop string) leaves once
the plan chained to it is back (its token is not used). A chained plan takes no slot while
it waits for its first plan. A newcomer ends the chain: it waits for the plans already
sent (at most one small step more than without chaining) and then joins them. Only small
batches chain: there the coordinator's round trip is the largest share of a step, and a
newcomer's first token waits for a short step only. When the first plan fails, the one
chained to it is :meth:`Scheduler.broken`: it is rewound whatever its answer.

Recovery: when a stage fails and comes back (:mod:`mlx_relay.coordinator.recovery`), the
requests of a failed micro-batch are put back (:meth:`Scheduler.rewind`) and every request
starts over from position 0 (:meth:`Scheduler.replay`): its prompt plus the tokens it has
generated are prefilled in chunks like a new prompt, and its next decode step samples the
token number it was at, so a stream goes on where it stopped.

Admission (how many requests may run or wait, 429 past that) stays with
:mod:`mlx_relay.coordinator.admission`; the scheduler batches the admitted ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from mlx_relay.coordinator.step_plan import (
    FIRST_TOKEN_STEPS,
    Phase,
    RequestState,
    ScheduledStep,
    SchedulerSettings,
    StepPlan,
    default_micro_batches,
)

__all__ = [
    "FIRST_TOKEN_STEPS",
    "Phase",
    "ScheduledStep",
    "Scheduler",
    "SchedulerSettings",
    "StepPlan",
    "default_micro_batches",
]


@dataclass
class Scheduler:
    """Continuous batching over the requests it was given (see the module docstring)."""

    settings: SchedulerSettings
    _requests: dict[str, RequestState] = field(default_factory=dict)
    _in_flight: dict[int, StepPlan] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _arrivals: itertools.count[int] = field(default_factory=itertools.count)
    _stamps: itertools.count[int] = field(default_factory=itertools.count)
    _first_token_run: int = 0  # first-token micro-batches scheduled in a row
    _followers: dict[int, int] = field(default_factory=dict)  # plan id -> chained plan id
    _broken: set[int] = field(default_factory=set)  # chained plans whose first plan failed

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    @property
    def runnable(self) -> int:
        """Requests held that are not paused."""
        return sum(1 for r in self._requests.values() if not r.paused)

    @property
    def in_flight(self) -> int:
        """Micro-batches scheduled and not yet completed."""
        return len(self._in_flight)

    @property
    def computing(self) -> int:
        """Micro-batches in flight that do not wait for another (a chained plan waits for
        its first plan until that one completes): those the stages may compute at once."""
        return sum(1 for p in self._in_flight.values() if p.follows not in self._in_flight)

    def add(
        self,
        request_id: str,
        prompt_length: int,
        generated: int = 0,
        max_steps: int | None = None,
    ) -> None:
        """A new request; it joins the next micro-batch that has room. A request that has
        already ``generated`` tokens elsewhere (moved from another replica's pipeline)
        starts with their replay, as after :meth:`replay`. ``max_steps``: the most decode
        steps it takes (its ``max_tokens``); none is chained past it.

        Raises:
            ValueError: the id is taken, or the prompt is empty.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already scheduled")
        if prompt_length < 1:
            raise ValueError("a request needs at least one prompt token")
        request = RequestState(request_id, prompt_length - 1, next(self._arrivals))
        request.generated = generated
        request.max_steps = max_steps
        request.prefill_length = request.prompt_prefill + generated
        limit = min(self.settings.first_token_tokens, self.settings.prefill_chunk_tokens)
        request.urgent = limit > 0 and generated == 0 and request.prompt_prefill <= limit
        self._requests[request_id] = request

    def hand_over(self) -> list[tuple[str, int, bool]]:
        """Take every request out (they move to another pipeline); each one's
        ``(request_id, tokens generated, whether it took a step)``. Call with no
        micro-batch in flight.

        Raises:
            RuntimeError: a micro-batch is still in flight.
        """
        if self._in_flight:
            raise RuntimeError(f"{len(self._in_flight)} micro-batches are still in flight")
        held = [(r.request_id, r.generated, r.sent) for r in self._requests.values()]
        self._requests.clear()
        return held

    def idle(self) -> list[str]:
        """The requests in no micro-batch now (waiting for their next step)."""
        return [r.request_id for r in self._requests.values() if r.in_flight is None]

    def abort(self, request_id: str) -> bool:
        """Take a request out (finished early, cancelled, failed). One in flight leaves
        when its micro-batch completes. Returns whether the scheduler held it."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        if request.in_flight is None:
            del self._requests[request_id]
        else:
            request.aborted = True
        return True

    def pause(self, request_id: str) -> None:
        """Take no further step for the request until :meth:`resume` (a step in flight
        completes). Unknown ids are ignored."""
        request = self._requests.get(request_id)
        if request is not None:
            request.paused = True

    def resume(self, request_id: str) -> None:
        """Schedule a paused request again from the next micro-batch on."""
        request = self._requests.get(request_id)
        if request is not None:
            request.paused = False

    def schedule(self) -> StepPlan | None:
        """The next micro-batch, or None when ``max_micro_batches`` are in flight or no
        request has a step to take."""
        settings = self.settings
        # A chained plan takes no slot while it waits for the plan it follows.
        if self.computing >= settings.max_micro_batches:
            return None
        free = [
            r
            for r in self._requests.values()
            if r.in_flight is None and not r.aborted and not r.paused
        ]
        urgent = [r for r in free if r.urgent]
        first = []
        if urgent and self._first_token_run < FIRST_TOKEN_STEPS and self._streams_running():
            first = self._first_token_steps(urgent)
        if first:  # empty only if no urgent prefill fits the budget, which add() rules out
            self._first_token_run += 1
            return self._plan(first)
        self._first_token_run = 0
        prefill = sorted(
            (r for r in free if not r.decoding), key=lambda r: (r.computed == 0, r.arrival)
        )
        # The requests are shared out over the micro-batches, so that each stage has one.
        live = sum(1 for r in self._requests.values() if not r.aborted and not r.paused)
        batch_rows = min(settings.max_batch_size, -(-live // settings.max_micro_batches))
        # With a prompt waiting, one row stays free for it: decodes never starve a prefill.
        decode_rows = batch_rows - (1 if prefill and batch_rows > 1 else 0)
        decode = sorted((r for r in free if r.decoding), key=lambda r: (r.last_served, r.arrival))[
            :decode_rows
        ]
        for request in decode:  # in round-robin order, before the rows are sorted
            request.last_served = next(self._stamps)
        decode.sort(key=lambda r: r.arrival)
        steps = [ScheduledStep(r.request_id, "decode", r.computed, 1, r.generated) for r in decode]
        rows = batch_rows - len(steps)
        budget = settings.prefill_chunk_tokens
        for request in prefill:
            if rows == 0 or budget == 0:
                break
            length = min(request.prefill_length - request.computed, budget)
            steps.append(ScheduledStep(request.request_id, "prefill", request.computed, length))
            rows -= 1
            budget -= length
        return self._plan(steps)

    def _streams_running(self) -> bool:
        """Whether a request that already has its first token would wait for this step."""
        return any(
            not r.aborted and not r.paused and not r.urgent and (r.generated > 0 or r.decoding)
            for r in self._requests.values()
        )

    def _first_token_steps(self, urgent: list[RequestState]) -> list[ScheduledStep]:
        """A first-token micro-batch: the newcomers' first decode steps, then their prefills
        (each whole: it fits the budget), in arrival order, as many as the rows allow."""
        steps: list[ScheduledStep] = []
        budget = self.settings.prefill_chunk_tokens
        for request in sorted(urgent, key=lambda r: (not r.decoding, r.arrival)):
            if len(steps) == self.settings.max_batch_size:
                break
            if request.decoding:
                step = ScheduledStep(request.request_id, "decode", request.computed, 1, 0)
                steps.append(step)
                continue
            length = request.prefill_length - request.computed
            if length > budget:
                break
            steps.append(ScheduledStep(request.request_id, "prefill", request.computed, length))
            budget -= length
        return steps

    def _plan(self, steps: list[ScheduledStep]) -> StepPlan | None:
        if not steps:
            return None
        plan = StepPlan(next(self._ids), tuple(steps))
        for step in steps:
            request = self._requests[step.request_id]
            request.in_flight = plan.plan_id
            request.sent = True
        self._in_flight[plan.plan_id] = plan
        return plan

    def chain(self) -> StepPlan | None:
        """The next decode step of the requests of the one plan in flight, planned before
        that plan is back (see the module docstring), or None: another plan is in flight,
        the plan has more than ``chain_max_batch`` requests or a prefill, another request
        waits, or none of its requests has a step left under its ``max_steps``."""
        if len(self._in_flight) != 1:
            return None
        (plan,) = self._in_flight.values()
        if len(plan.steps) > self.settings.chain_max_batch or plan.plan_id in self._broken:
            return None
        if any(step.phase != "decode" for step in plan.steps):
            return None
        members = set(plan.request_ids)
        live = [r for r in self._requests.values() if not r.aborted and not r.paused]
        if any(r.request_id not in members for r in live):
            return None  # it joins the next plan, with these
        steps = []
        for step in plan.steps:
            request = self._requests.get(step.request_id)
            if (
                request is None
                or request.aborted
                or request.paused
                or request.in_flight != plan.plan_id
                or request.chained is not None
                or (request.max_steps is not None and step.step + 1 >= request.max_steps)
            ):
                continue
            request.last_served = next(self._stamps)
            steps.append(
                ScheduledStep(request.request_id, "decode", step.position + 1, 1, step.step + 1)
            )
        if not steps:
            return None
        chained = StepPlan(next(self._ids), tuple(steps), follows=plan.plan_id)
        for step in steps:
            self._requests[step.request_id].chained = chained.plan_id
        self._in_flight[chained.plan_id] = chained
        self._followers[plan.plan_id] = chained.plan_id
        return chained

    def broken(self, plan: StepPlan) -> bool:
        """Whether ``plan`` was chained to a plan that failed (or is not back yet): its
        answer must not count."""
        return plan.plan_id in self._broken or (
            plan.follows is not None and plan.follows in self._in_flight
        )

    def _out_of_flight(self, plan: StepPlan, failed: bool) -> None:
        """``plan`` is back: its chained plan no longer waits for it (and is broken when
        ``plan`` failed)."""
        del self._in_flight[plan.plan_id]
        self._broken.discard(plan.plan_id)
        follower = self._followers.pop(plan.plan_id, None)
        if failed and follower is not None and follower in self._in_flight:
            self._broken.add(follower)
        if plan.follows is not None and self._followers.get(plan.follows) == plan.plan_id:
            # Back before the plan it follows (a failure): its requests stay in that one.
            del self._followers[plan.follows]
            for step in plan.steps:
                request = self._requests.get(step.request_id)
                if request is not None and request.chained == plan.plan_id:
                    request.chained = None

    def _next_plan(self, request: RequestState) -> None:
        """The request's plan is back: it is in its chained plan now, if any."""
        request.in_flight, request.chained = request.chained, None

    def complete(self, plan: StepPlan, finished: Iterable[str] = ()) -> None:
        """A micro-batch ran: its requests advance; ``finished`` ones (EOS, stop string,
        ``max_tokens``) leave, as do those aborted meanwhile (once a plan chained to this
        one is back too).

        Raises:
            KeyError: the plan is not in flight.
        """
        self._out_of_flight(plan, failed=False)
        done = set(finished)
        for step in plan.steps:
            request = self._requests.get(step.request_id)
            if request is None or request.in_flight != plan.plan_id:
                continue
            self._next_plan(request)
            request.computed += step.length
            if step.phase == "decode":
                request.generated += 1
                request.urgent = False
            if request.aborted or step.request_id in done:
                if request.in_flight is None:
                    del self._requests[step.request_id]
                else:
                    request.aborted = True

    def rewind(self, plan: StepPlan) -> None:
        """A micro-batch failed but its requests stay: they are back out of flight, with
        nothing advanced (aborted ones leave). See :meth:`replay`.

        Raises:
            KeyError: the plan is not in flight.
        """
        self._out_of_flight(plan, failed=True)
        for step in plan.steps:
            request = self._requests.get(step.request_id)
            if request is None or request.in_flight != plan.plan_id:
                continue
            self._next_plan(request)
            if request.aborted and request.in_flight is None:
                del self._requests[step.request_id]

    def replay(self) -> list[str]:
        """Every request that took a step starts over at position 0: its prompt and the
        tokens it generated, all but the last, are prefilled again, then its next decode
        step samples the token it was at. Call with no micro-batch in flight. Returns the
        ids of the requests replayed (those never scheduled have nothing to replay).

        Raises:
            RuntimeError: a micro-batch is still in flight.
        """
        if self._in_flight:
            raise RuntimeError(f"{len(self._in_flight)} micro-batches are still in flight")
        replayed = []
        for request in self._requests.values():
            if request.sent:
                request.sent = False
                request.computed = 0
                request.prefill_length = request.prompt_prefill + request.generated
                replayed.append(request.request_id)
        return replayed

    def fail(self, plan: StepPlan) -> list[str]:
        """A micro-batch failed: its requests leave (their caches cannot be trusted).
        Returns their ids."""
        if plan.plan_id in self._in_flight:
            self._out_of_flight(plan, failed=True)
        failed = []
        for step in plan.steps:
            request = self._requests.get(step.request_id)
            if request is not None and request.in_flight == plan.plan_id:
                del self._requests[step.request_id]
                failed.append(step.request_id)
        return failed
