"""Recovery by replay: which stage failures a request survives, and waiting for the stages.

When a stage fails while requests run (its connection is lost, it answers UNAVAILABLE, it
misses a deadline, or it answers NOT_FOUND for a session it no longer holds because it was
restarted), the step loop (:mod:`mlx_relay.coordinator.step_loop`) keeps the requests for up
to ``network.recovery_timeout`` seconds: it lets the micro-batches still in flight finish,
waits until every stage answers SERVING (:func:`wait_until_serving`), ends the requests'
old KV sessions on every stage (:func:`end_old_sessions`), then rebuilds each request's
caches on every stage by replaying its prompt and the tokens it has generated so far as a
chunked prefill under a new session id
(:meth:`mlx_relay.coordinator.scheduler.Scheduler.replay`) and goes on.
The caller sees a pause, not an error. Past the window the requests fail with the stage's
named error, as without recovery.

What holds after a replay: the stream goes on with the next token, none repeated or
missing; greedy decoding gives the tokens of an unbroken run, and seeded sampling draws the
same random numbers (its key depends on the seed and the token's index only), so it too
continues as an unbroken run would wherever the rebuilt caches give the same logits (the
prefill computes in another order than the decode steps did, so they match up to rounding).
Unseeded sampling continues with fresh randomness.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from mlx_relay.coordinator.client import StageError, WorkerClient
from mlx_relay.core.errors import RelayError, WorkerUnavailable

logger = logging.getLogger(__name__)

# A stage answers NOT_FOUND for a step of a session it does not hold: it restarted.
_LOST_SESSION_CODES = frozenset({"NOT_FOUND"})
# Pause between two rounds of asking the stages for their health (s).
POLL_INTERVAL = 0.1


def is_recoverable(exc: BaseException) -> bool:
    """Whether a failed step is worth a replay: the stage was unreachable or too slow, or
    lost the requests' sessions. A rejected step (bad input, a bug) is not."""
    if isinstance(exc, WorkerUnavailable):
        return True
    return isinstance(exc, StageError) and exc.code in _LOST_SESSION_CODES


def replay_session_id(request_id: str, replays: int) -> str:
    """The session id of a request's ``replays``-th replay (its own id before any): a new
    id, so that a late step of the old session can never land in the new one."""
    return request_id if replays == 0 else f"{request_id}~r{replays}"


async def wait_until_serving(clients: Sequence[WorkerClient], deadline: float) -> bool:
    """Ask every stage for its health until all answer SERVING (True), or until the
    monotonic ``deadline`` passes (False)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        answers = await asyncio.gather(
            *(_serving(c, min(c.network.ping_timeout, remaining)) for c in clients)
        )
        if all(answers):
            return True
        await asyncio.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))


async def _serving(client: WorkerClient, timeout: float) -> bool:
    try:
        return await client.health(timeout=timeout, retry=False) == "SERVING"
    except RelayError:
        return False


async def end_old_sessions(clients: Sequence[WorkerClient], session_ids: Sequence[str]) -> None:
    """EndSession of each old session on every stage (a restarted stage holds none; a
    surviving one frees them); failures are logged, not raised (the TTL frees the rest)."""
    calls = [(c, sid) for sid in session_ids for c in clients]
    results = await asyncio.gather(
        *(c.end_session(sid, timeout=c.network.ping_timeout) for c, sid in calls),
        return_exceptions=True,
    )
    for (client, sid), result in zip(calls, results, strict=True):
        if isinstance(result, BaseException):
            logger.debug("EndSession of %s on %s failed: %s", sid, client.device_id, result)
