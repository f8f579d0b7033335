"""KV session store: position checks, limits, expiry, and all-or-nothing opening."""

from __future__ import annotations

import pytest

from mlx_relay.core.errors import InvalidRequest
from mlx_relay.worker.sessions import (
    ContextOverflow,
    KVSessionStore,
    PeerQuotaReached,
    PositionMismatch,
    SessionEnded,
    SessionLimitReached,
    SessionNotFound,
    Step,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(
    max_sessions: int = 3, ttl: float = 10.0, max_length: int | None = None
) -> tuple[KVSessionStore, FakeClock]:
    clock = FakeClock()
    caches = iter(range(1000))
    store = KVSessionStore(
        lambda: [next(caches)],
        max_sessions=max_sessions,
        ttl_seconds=ttl,
        max_length=max_length,
        clock=clock,
    )
    return store, clock


def test_new_session_then_continue_at_cached_length() -> None:
    store, _ = make_store()
    (session,) = store.open([Step("a", 0, 5)])
    assert session.cache == [0] and session.length == 0
    assert store.advance(session, 5) == 5
    (again,) = store.open([Step("a", 5, 1)])
    assert again is session
    assert store.advance(again, 1) == 6
    assert session.steps == 2
    assert len(store) == 1 and "a" in store


def test_unknown_request_past_position_zero_is_not_found() -> None:
    store, _ = make_store()
    with pytest.raises(SessionNotFound, match="no session for request 'x' at position 3"):
        store.open([Step("x", 3, 1)])
    assert len(store) == 0


@pytest.mark.parametrize("position", [0, 4, 6])
def test_position_must_equal_cached_length(position: int) -> None:
    store, _ = make_store()
    (session,) = store.open([Step("a", 0, 5)])
    store.advance(session, 5)
    with pytest.raises(PositionMismatch, match=f"position {position} does not match the 5"):
        store.open([Step("a", position, 1)])
    assert isinstance(PositionMismatch("x"), InvalidRequest)


def test_session_limit_counts_new_sessions_only() -> None:
    store, _ = make_store(max_sessions=2)
    a, _ = store.open([Step("a", 0, 1), Step("b", 0, 1)])
    store.advance(a, 1)
    with pytest.raises(SessionLimitReached, match="already holds 2 of at most 2"):
        store.open([Step("c", 0, 1)])
    # Continuing existing sessions is still allowed at the limit.
    assert store.open([Step("a", 1, 1)]) == [a]
    assert store.end("b") is True
    assert store.open([Step("c", 0, 1)])[0].request_id == "c"


def test_rejected_call_opens_nothing() -> None:
    store, _ = make_store(max_sessions=2)
    with pytest.raises(SessionNotFound):
        store.open([Step("a", 0, 1), Step("b", 2, 1)])
    with pytest.raises(SessionLimitReached):
        store.open([Step("a", 0, 1), Step("b", 0, 1), Step("c", 0, 1)])
    assert len(store) == 0


@pytest.mark.parametrize(
    ("steps", "fragment"),
    [
        ([Step("", 0, 1)], "must not be empty"),
        ([Step("a", 0, 1), Step("a", 0, 1)], "more than once"),
        ([Step("a", 0, 0)], "at least one position"),
    ],
)
def test_malformed_steps(steps: list[Step], fragment: str) -> None:
    store, _ = make_store()
    with pytest.raises(InvalidRequest, match=fragment):
        store.open(steps)


def test_context_overflow() -> None:
    store, _ = make_store(max_length=8)
    with pytest.raises(ContextOverflow, match=r"0 cached \+ 9 new tokens exceed .* 8"):
        store.open([Step("a", 0, 9)])
    (session,) = store.open([Step("a", 0, 8)])
    store.advance(session, 8)
    with pytest.raises(ContextOverflow):
        store.open([Step("a", 8, 1)])


def test_idle_sessions_expire_and_use_refreshes() -> None:
    store, clock = make_store(ttl=10.0)
    a, b = store.open([Step("a", 0, 1), Step("b", 0, 1)])
    store.advance(a, 1)
    store.advance(b, 1)
    clock.now += 6
    store.open([Step("a", 1, 1)])
    clock.now += 6
    assert store.expire() == ["b"]
    assert store.request_ids() == ["a"]
    clock.now += 10.5
    assert store.expire() == ["a"]
    assert len(store) == 0
    with pytest.raises(SessionNotFound):
        store.open([Step("a", 2, 1)])


def test_end_and_clear() -> None:
    store, _ = make_store()
    store.open([Step("a", 0, 1), Step("b", 0, 1)])
    assert store.end("a") is True
    assert store.end("a") is False
    assert store.get("a") is None
    assert store.clear() == 1
    assert len(store) == 0


def test_an_ended_request_cannot_reopen_a_session() -> None:
    store, _ = make_store()
    store.open([Step("a", 0, 2)])
    store.end("a")
    # A late first step (the worker stalled, the coordinator gave up and ended it) must not
    # leave a cache nobody will end.
    with pytest.raises(SessionEnded, match="already ended"):
        store.open([Step("a", 0, 2)])
    # EndSession that overtakes the request's first step works the same way.
    store.end("b")
    with pytest.raises(SessionEnded):
        store.open([Step("b", 0, 1)])
    assert len(store) == 0
    store.open([Step("c", 0, 1)])
    assert len(store) == 1


def test_ended_ids_are_bounded() -> None:
    store, _ = make_store(max_sessions=1)
    for i in range(1025):
        store.end(f"r{i}")
    store.open([Step("r0", 0, 1)])  # the oldest id was forgotten
    with pytest.raises(SessionEnded):
        store.open([Step("r1024", 0, 1)])


def test_invalid_limits() -> None:
    with pytest.raises(ValueError):
        KVSessionStore(list, max_sessions=0, ttl_seconds=1)
    with pytest.raises(ValueError):
        KVSessionStore(list, max_sessions=1, ttl_seconds=0)


def test_each_peer_holds_at_most_its_quota_until_its_sessions_end_or_expire() -> None:
    clock = FakeClock()
    store = KVSessionStore(
        lambda: [], max_sessions=8, max_per_peer=2, ttl_seconds=10.0, clock=clock
    )
    store.open([Step("a1", 0, 3), Step("a2", 0, 3)], peer="a")
    with pytest.raises(PeerQuotaReached, match="peer a already holds 2 of its quota of 2"):
        store.open([Step("a3", 0, 3)], peer="a")
    # Continuing its own sessions is no new session; another peer has its own share.
    (a1,) = store.open([Step("a1", 0, 3)], peer="a")
    store.advance(a1, 3)
    store.open([Step("a1", 3, 1)], peer="a")
    store.open([Step("b1", 0, 3), Step("b2", 0, 3)], peer="b")
    assert (store.held_by("a"), store.held_by("b"), len(store)) == (2, 2, 4)
    store.end("a1")
    store.open([Step("a3", 0, 3)], peer="a")
    clock.now += 11
    assert sorted(store.expire()) == ["a2", "a3", "b1", "b2"]
    assert store.held_by("a") == store.held_by("b") == 0
    store.open([Step("a4", 0, 1), Step("a5", 0, 1)], peer="a")
    assert store.clear() == 2 and store.held_by("a") == 0
