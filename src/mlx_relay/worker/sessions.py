"""KV-cache sessions of one stage: one cache per live request, with limits and idle expiry.

The store is thread-safe: the MLX thread opens and advances sessions while the event loop
ends them and sweeps idle ones. It never touches MLX itself; caches come from the
``make_cache`` factory and are only handed back to the caller.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mlx_relay.core.errors import InvalidRequest, RelayError


class SessionNotFound(RelayError):
    """A step continues a request this stage holds no KV cache for."""

    def __init__(self, request_id: str, position: int) -> None:
        super().__init__(
            f"no session for request {request_id!r} at position {position} "
            "(it ended, expired, or never started with position 0)"
        )
        self.request_id = request_id


class SessionEnded(SessionNotFound):
    """A step arrives for a request whose session this stage already ended.

    Happens when a worker resumes after a stall: the coordinator gave up, sent EndSession,
    and the late Forward must not open a cache that nobody will ever end.
    """

    def __init__(self, request_id: str, position: int) -> None:
        RelayError.__init__(
            self,
            f"request {request_id!r} already ended on this stage; a new request needs a new id",
        )
        self.request_id = request_id


class SessionLimitReached(RelayError):
    """Opening another session would pass the stage's maximum session count."""


class PeerQuotaReached(SessionLimitReached):
    """Opening another session would give one peer more than its share of the stage's
    sessions (``inference.max_sessions_per_peer``)."""


class PositionMismatch(InvalidRequest):
    """A step's position is not the session's cached length."""


class ContextOverflow(InvalidRequest):
    """A step would grow a session past the model's context length."""


@dataclass(frozen=True)
class Step:
    """One request's step as the store sees it: where it starts and how many positions."""

    request_id: str
    position: int
    length: int


@dataclass
class KVSession:
    """One request's KV cache on this stage and how many positions it holds.

    ``cache`` is the request's own per-layer caches, or empty while its positions live in
    one of the stage's decode batch groups (``mlx_relay.model.batch``).
    """

    request_id: str
    cache: list[Any]
    created_at: float
    last_used: float
    length: int = 0
    steps: int = 0
    peer: str = ""


class KVSessionStore:
    """KV caches keyed by request id.

    Args:
        make_cache: builds an empty cache for a new session.
        max_sessions: most sessions held at once; past it :class:`SessionLimitReached`.
        max_per_peer: most sessions one peer (who opened them) holds at once; past it
            :class:`PeerQuotaReached`. None: no quota but ``max_sessions``.
        ttl_seconds: a session unused this long is freed by :meth:`expire`.
        max_length: most positions one session may hold (the model's context), or None.
        clock: monotonic time source, replaceable in tests.
    """

    def __init__(
        self,
        make_cache: Callable[[], list[Any]],
        *,
        max_sessions: int,
        max_per_peer: int | None = None,
        ttl_seconds: float,
        max_length: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0")
        self._make_cache = make_cache
        self.max_sessions = max_sessions
        self.max_per_peer = max_per_peer
        self.ttl_seconds = ttl_seconds
        self.max_length = max_length
        self._clock = clock
        self._sessions: dict[str, KVSession] = {}
        self._per_peer: Counter[str] = Counter()
        # Ids of recently ended requests (bounded, oldest forgotten first).
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._ended_limit = max(1024, 8 * max_sessions)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def __contains__(self, request_id: object) -> bool:
        with self._lock:
            return request_id in self._sessions

    def get(self, request_id: str) -> KVSession | None:
        with self._lock:
            return self._sessions.get(request_id)

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def held_by(self, peer: str) -> int:
        """How many sessions ``peer`` opened that are still held."""
        with self._lock:
            return self._per_peer[peer]

    def open(self, steps: Sequence[Step], peer: str = "") -> list[KVSession]:
        """Check a call's steps against the sessions, then open or fetch a session for each.

        All steps are checked before any session is created, so a rejected call changes
        nothing. A step at position 0 with an unknown request id opens a new session, held
        by ``peer`` (the caller's identity) until it ends.

        Raises:
            InvalidRequest: a request id is empty or appears twice.
            SessionNotFound: a step at position > 0 names an unknown request.
            SessionEnded: a step names a request whose session was already ended.
            PositionMismatch: a step's position is not the session's cached length.
            ContextOverflow: a step would pass ``max_length``.
            SessionLimitReached: the new sessions would pass ``max_sessions``.
            PeerQuotaReached: they would give ``peer`` more than ``max_per_peer``.
        """
        with self._lock:
            seen: set[str] = set()
            new = 0
            for step in steps:
                if not step.request_id:
                    raise InvalidRequest("request_id must not be empty")
                if step.request_id in seen:
                    raise InvalidRequest(
                        f"request {step.request_id!r} appears more than once in one call"
                    )
                seen.add(step.request_id)
                if step.length < 1:
                    raise InvalidRequest(
                        f"request {step.request_id!r}: a step needs at least one position"
                    )
                session = self._sessions.get(step.request_id)
                cached = session.length if session is not None else 0
                if session is None:
                    if step.request_id in self._ended:
                        raise SessionEnded(step.request_id, step.position)
                    if step.position > 0:
                        raise SessionNotFound(step.request_id, step.position)
                    new += 1
                if step.position != cached:
                    raise PositionMismatch(
                        f"request {step.request_id!r}: position {step.position} does not match "
                        f"the {cached} tokens cached on this stage"
                    )
                if self.max_length is not None and cached + step.length > self.max_length:
                    raise ContextOverflow(
                        f"request {step.request_id!r}: {cached} cached + {step.length} new "
                        f"tokens exceed the model's context of {self.max_length}"
                    )
            if new and len(self._sessions) + new > self.max_sessions:
                raise SessionLimitReached(
                    f"this stage already holds {len(self._sessions)} of at most "
                    f"{self.max_sessions} sessions; end finished requests or retry later"
                )
            held = self._per_peer[peer]
            if new and self.max_per_peer is not None and held + new > self.max_per_peer:
                raise PeerQuotaReached(
                    f"peer {peer or '(unnamed)'} already holds {held} of its quota of "
                    f"{self.max_per_peer} sessions on this stage "
                    "(inference.max_sessions_per_peer); end finished requests or retry later"
                )
            now = self._clock()
            opened = []
            for step in steps:
                session = self._sessions.get(step.request_id)
                if session is None:
                    session = KVSession(step.request_id, self._make_cache(), now, now, peer=peer)
                    self._sessions[step.request_id] = session
                    self._per_peer[peer] += 1
                session.last_used = now
                opened.append(session)
            return opened

    def advance(self, session: KVSession, length: int) -> int:
        """Record that ``length`` positions were added to the session's cache.

        Returns:
            The session's new cached length.
        """
        with self._lock:
            session.length += length
            session.steps += 1
            session.last_used = self._clock()
            return session.length

    def end(self, request_id: str) -> bool:
        """Free a session's cache and refuse later steps of the request (also when the
        EndSession overtakes the request's first step). Returns whether it existed."""
        with self._lock:
            self._ended[request_id] = None
            self._ended.move_to_end(request_id)
            if len(self._ended) > self._ended_limit:
                self._ended.popitem(last=False)
            session = self._sessions.pop(request_id, None)
            if session is not None:
                self._release(session)
            return session is not None

    def expire(self) -> list[str]:
        """Free every session idle for longer than the TTL; returns their request ids."""
        with self._lock:
            deadline = self._clock() - self.ttl_seconds
            expired = [rid for rid, s in self._sessions.items() if s.last_used < deadline]
            for rid in expired:
                self._release(self._sessions.pop(rid))
            return expired

    def clear(self) -> int:
        """Free every session; returns how many there were."""
        with self._lock:
            count = len(self._sessions)
            self._sessions.clear()
            self._per_peer.clear()
            return count

    def _release(self, session: KVSession) -> None:
        # Under the lock: the session's peer holds one session fewer.
        self._per_peer[session.peer] -= 1
        if self._per_peer[session.peer] <= 0:
            del self._per_peer[session.peer]
