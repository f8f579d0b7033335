"""What a request's trace is made of, as plain data: its own moments and the steps it ran in.

The coordinator fills a :class:`RequestTimeline` as the request runs. A micro-batch serves
many requests at once, so each of its :class:`StepRecord` is shared by the timelines of all
its requests (one record per micro-batch, not per request); a timeline holds a
:class:`RequestStep` per step it took part in. Times are seconds on the coordinator's
monotonic clock; a stage's own times are durations (:class:`StageTimes`), so no clock is
shared between processes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class StageTimes:
    """Where one micro-batch's call spent its time on one stage (seconds).

    ``call`` is the call as its caller timed it (the coordinator for the first stage, the
    stage before otherwise); ``handler`` the stage's own time answering it, its call to the
    next stage included (0 from a stage that does not report it); ``check``, ``queue`` (the
    MLX thread busy with another micro-batch) and ``compute`` follow each other inside it;
    ``encode`` and ``sample`` are parts of ``compute``; ``relay_offset`` is when, after
    receiving the call, the stage called the next one; ``chain_wait``, first in
    ``handler``, is a chained step's wait on the first stage for the step before it
    (it overlaps that step).
    """

    device_id: str
    call: float
    compute: float
    handler: float = 0.0
    check: float = 0.0
    queue: float = 0.0
    encode: float = 0.0
    sample: float = 0.0
    relay_offset: float = 0.0
    chain_wait: float = 0.0


@dataclass(slots=True)
class StepRecord:
    """One micro-batch through the pipeline (coordinator clock): started building it,
    ``sent`` to the first stage, ``received`` the answer, ``ended`` handing out its tokens."""

    plan_id: int
    batch_size: int
    decode_rows: int
    prefill_tokens: int
    started: float
    sent: float = 0.0
    received: float = 0.0
    ended: float = 0.0
    stages: tuple[StageTimes, ...] = ()
    error: str | None = None


@dataclass(slots=True)
class RequestStep:
    """A request's part of one micro-batch, with the ids of its spans there."""

    record: StepRecord
    phase: str  # "prefill" or "decode"
    position: int
    length: int
    span_id: int
    hop_span_id: int


@dataclass
class RequestTimeline:
    """One request from arrival to its end (coordinator clock; ``start_unix`` is the
    arrival in unix seconds).

    ``arrival``: the request reached the coordinator (tokenizing starts); ``prepared``:
    tokenized and checked; ``admitted``: it left the queue for a running slot;
    ``finished``: its last token was handed out, or it failed or was aborted.
    """

    request_id: str
    trace_id: int
    root_span_id: int
    model: str
    operation: str
    coordinator: str
    stages: tuple[str, ...]
    arrival: float
    start_unix: float
    prompt_tokens: int
    prepared: float = 0.0
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    finished_unix: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    error_type: str | None = None
    steps: list[RequestStep] = field(default_factory=list)

    @property
    def e2e(self) -> float:
        return (self.finished or self.arrival) - self.arrival

    @property
    def links(self) -> list[str]:
        """Each link's name in pipeline order: ``"coordinator → worker-0"``..."""
        hops = (self.coordinator, *self.stages)
        return [f"{a} → {b}" for a, b in itertools.pairwise(hops)]

    @property
    def lanes(self) -> list[str]:
        """The waterfall's lanes in pipeline order: the coordinator, then each link and the
        stage it leads to."""
        lanes = ["coordinator"]
        for index, (link, stage) in enumerate(zip(self.links, self.stages, strict=True)):
            lanes += [f"link {link}", stage_lane(index, stage)]
        return lanes


def stage_lane(index: int, device_id: str) -> str:
    return f"stage {index} · {device_id}"
