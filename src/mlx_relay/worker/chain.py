"""Chained steps on the first stage: a decode step that starts from the token the step
before it samples, without that token going through the coordinator first.

The coordinator sends a request's next decode step while its current one is still on the
later stages, the entry marked ``chained`` and without token ids. The first stage relays the
current step and gets its answer (the last stage's sampled tokens) from the next stage:
:meth:`ChainedTokens.answered` keeps each request's token under the position it is the
input of, and the chained step, waiting in :meth:`ChainedTokens.take`, starts at once. Per
token this saves the first stage's answer to the coordinator and the coordinator's next
call (two of the four messages on a 2-stage pipeline's critical path, about a millisecond
on loopback; docs/architecture.md, "Chained steps").

A step that fails fails the steps chained to it with the same status
(:meth:`ChainedTokens.failed`), and a chained step whose token does not come within its
deadline fails DEADLINE_EXCEEDED: nothing waits forever.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import grpc

from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.wire import encode_token_ids
from mlx_relay.worker.forward_call import CallFailed

# Tokens and failures kept for chained steps not yet arrived (a chained step is normally
# sent right behind the step it follows, so it is already waiting): the oldest go first.
KEPT = 4096


class ChainedTokens:
    """Each request's next input token, by ``(request_id, position)``, for chained steps."""

    def __init__(self, kept: int = KEPT) -> None:
        self._kept = kept
        self._known: OrderedDict[tuple[str, int], int | CallFailed] = OrderedDict()
        self._waiting: dict[tuple[str, int], asyncio.Future[int]] = {}

    def __len__(self) -> int:
        return len(self._known) + len(self._waiting)

    def answered(self, request_id: str, position: int, token_id: int) -> bool:
        """The last stage sampled ``token_id``: the input of ``request_id`` at ``position``.
        True when a chained step was waiting for it."""
        return self._settle((request_id, position), token_id)

    def failed(self, request_id: str, position: int, failure: CallFailed) -> None:
        """The step that was to sample the input at ``position`` failed with ``failure``."""
        self._settle((request_id, position), failure)

    def _settle(self, key: tuple[str, int], outcome: int | CallFailed) -> bool:
        future = self._waiting.pop(key, None)
        if future is not None:
            if not future.done():
                if isinstance(outcome, CallFailed):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            return True
        self._known[key] = outcome
        self._known.move_to_end(key)
        while len(self._known) > self._kept:
            self._known.popitem(last=False)
        return False

    async def take(self, request_id: str, position: int, deadline: float | None) -> int:
        """The input token of ``request_id`` at ``position``, once the step before it is
        answered. ``deadline``: ``time.monotonic()`` by which it must come (None: none).

        Raises:
            CallFailed: the step before it failed (its status), it did not come by the
                deadline (DEADLINE_EXCEEDED), or another chained step already waits for it
                (INVALID_ARGUMENT).
        """
        key = (request_id, position)
        outcome = self._known.pop(key, None)
        if isinstance(outcome, CallFailed):
            raise outcome
        if outcome is not None:
            return outcome
        if key in self._waiting:
            raise CallFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {request_id!r}: a chained step at position {position} is already waiting",
            )
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise CallFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request {request_id!r}: the step before the chained step at position "
                f"{position} was not answered within the deadline",
            ) from None
        finally:
            if self._waiting.get(key) is future:
                del self._waiting[key]


async def chained_inputs(
    chain: ChainedTokens, request: pb.ForwardRequest, is_first: bool, deadline: float | None
) -> float:
    """Give each chained entry of ``request`` its input token, once the step before it is
    answered; the seconds waited.

    Raises:
        CallFailed: a chained entry on a later stage or with a tensor (INVALID_ARGUMENT), or
            as :meth:`ChainedTokens.take`.
    """
    chained = [entry for entry in request.entries if entry.chained]
    if not chained:
        return 0.0
    for entry in chained:
        problem = (
            "goes to the first stage only"
            if not is_first
            else "carries no tensor (its input is the step before's token)"
            if entry.HasField("tensor")
            else ""
        )
        if problem:
            raise CallFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {entry.request_id!r}: a chained entry {problem}",
            )
    started = time.perf_counter()
    for entry in chained:
        token = await chain.take(entry.request_id, entry.position, deadline)
        entry.tensor.CopyFrom(encode_token_ids([token]))
    return time.perf_counter() - started


def record_answer(
    chain: ChainedTokens, request: pb.ForwardRequest, response: pb.ForwardResponse
) -> bool:
    """The first stage's step was answered: each decode entry's sampled token is the input
    of the request's next position. True when a chained step was waiting for one."""
    woke = False
    for entry, result in zip(request.entries, response.results, strict=False):
        if _positions(entry) == 1:
            woke |= chain.answered(entry.request_id, entry.position + 1, result.token_id)
    return woke


def record_failure(chain: ChainedTokens, request: pb.ForwardRequest, failure: CallFailed) -> None:
    """The first stage's step failed: a step chained to one of its decode entries fails the
    same way."""
    for entry in request.entries:
        if _positions(entry) == 1:
            chain.failed(entry.request_id, entry.position + 1, failure)


def _positions(entry: pb.ForwardEntry) -> int:
    if entry.chained:
        return 1
    shape = entry.tensor.shape
    return int(shape[1]) if len(shape) == 2 else 0
