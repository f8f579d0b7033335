"""Admission control: bounded running slots, a bounded FIFO queue, QueueFull past both."""

from __future__ import annotations

import asyncio

import pytest

from mlx_relay.coordinator.admission import Admission
from mlx_relay.core.errors import QueueFull


async def hold(admission: Admission, name: str, order: list[str], release: asyncio.Event) -> None:
    async with admission.slot():
        order.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_limits_running_and_serves_waiters_in_order() -> None:
    changes: list[tuple[int, int]] = []
    admission = Admission(2, 2, on_change=lambda r, w: changes.append((r, w)))
    order: list[str] = []
    gates = {name: asyncio.Event() for name in "abcd"}
    tasks = {}
    for name in "abcd":
        tasks[name] = asyncio.create_task(hold(admission, name, order, gates[name]))
        await settle()
    assert order == ["a", "b"]
    assert (admission.running, admission.waiting) == (2, 2)
    with pytest.raises(QueueFull, match="2 requests running and 2 waiting"):
        admission.check()
    gates["b"].set()
    await settle()
    assert order == ["a", "b", "c"]
    gates["a"].set()
    await settle()
    assert order == ["a", "b", "c", "d"]
    for gate in gates.values():
        gate.set()
    await asyncio.gather(*tasks.values())
    assert (admission.running, admission.waiting) == (0, 0)
    assert changes[-1] == (0, 0)
    assert max(w for _, w in changes) == 2


async def test_full_queue_raises_at_once() -> None:
    admission = Admission(1, 0)
    release = asyncio.Event()
    task = asyncio.create_task(hold(admission, "a", [], release))
    await settle()
    with pytest.raises(QueueFull):
        async with admission.slot():
            pass
    release.set()
    await task
    async with admission.slot():
        assert admission.running == 1


async def test_cancelled_waiter_leaves_the_queue() -> None:
    admission = Admission(1, 5)
    order: list[str] = []
    release = asyncio.Event()
    first = asyncio.create_task(hold(admission, "a", order, release))
    await settle()
    waiter = asyncio.create_task(hold(admission, "b", order, asyncio.Event()))
    third = asyncio.create_task(hold(admission, "c", order, release))
    await settle()
    assert admission.waiting == 2
    waiter.cancel()
    await settle()
    assert admission.waiting == 1
    release.set()
    await asyncio.gather(first, third)
    assert order == ["a", "c"]
    assert (admission.running, admission.waiting) == (0, 0)


async def test_slot_handed_over_then_cancelled_is_passed_on() -> None:
    admission = Admission(1, 5)
    order: list[str] = []
    release = asyncio.Event()
    slot = admission.slot()
    await slot.__aenter__()
    second = asyncio.create_task(hold(admission, "b", order, release))
    third = asyncio.create_task(hold(admission, "c", order, release))
    await settle()
    assert admission.waiting == 2
    # Releasing hands the slot to "b"; "b" is cancelled before it gets to run.
    await slot.__aexit__(None, None, None)
    second.cancel()
    release.set()
    await asyncio.gather(second, third, return_exceptions=True)
    assert second.cancelled()
    assert order == ["c"]
    assert (admission.running, admission.waiting) == (0, 0)
