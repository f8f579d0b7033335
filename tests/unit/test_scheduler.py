"""The scheduler's policy, step by step, without any model or gRPC."""

from __future__ import annotations

import pytest

from mlx_relay.coordinator.scheduler import (
    FIRST_TOKEN_STEPS,
    ScheduledStep,
    Scheduler,
    SchedulerSettings,
    StepPlan,
    default_micro_batches,
)


def make(batch: int = 8, chunk: int = 16, micro: int = 1, first: int = 0) -> Scheduler:
    return Scheduler(SchedulerSettings(batch, chunk, micro, first))


def shape(plan: StepPlan | None) -> list[tuple[str, str, int, int]]:
    assert plan is not None
    return [(s.request_id, s.phase, s.position, s.length) for s in plan.steps]


def run(scheduler: Scheduler, finished: tuple[str, ...] = ()) -> StepPlan:
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.complete(plan, finished)
    return plan


def test_a_request_prefills_all_but_its_last_token_then_decodes_one_position_a_step() -> None:
    scheduler = make()
    scheduler.add("a", 5)
    assert shape(run(scheduler)) == [("a", "prefill", 0, 4)]
    plan = run(scheduler)
    assert plan.steps == (ScheduledStep("a", "decode", 4, 1, 0),)
    plan = run(scheduler, finished=("a",))
    assert plan.steps == (ScheduledStep("a", "decode", 5, 1, 1),)
    assert "a" not in scheduler and scheduler.schedule() is None


def test_a_one_token_prompt_starts_with_its_decode_step() -> None:
    scheduler = make()
    scheduler.add("a", 1)
    assert shape(run(scheduler)) == [("a", "decode", 0, 1)]


def test_new_requests_join_at_step_boundaries_and_finished_ones_leave() -> None:
    scheduler = make()
    scheduler.add("a", 2)
    scheduler.add("b", 3)
    assert shape(run(scheduler)) == [("a", "prefill", 0, 1), ("b", "prefill", 0, 2)]
    assert shape(run(scheduler)) == [("a", "decode", 1, 1), ("b", "decode", 2, 1)]
    plan = scheduler.schedule()
    scheduler.add("c", 1)  # arrives while a micro-batch is in flight: joins the next one
    assert shape(plan) == [("a", "decode", 2, 1), ("b", "decode", 3, 1)]
    assert plan is not None
    scheduler.complete(plan, finished=("a",))  # a finishes with this step
    assert shape(run(scheduler)) == [("b", "decode", 4, 1), ("c", "decode", 0, 1)]
    assert [s.step for s in run(scheduler).steps] == [3, 1]


def test_a_long_prompt_is_chunked_and_never_stalls_running_streams() -> None:
    scheduler = make(batch=8, chunk=16)
    for rid in ("a", "b", "c"):
        scheduler.add(rid, 2)
    run(scheduler)  # their one-token prefills
    scheduler.add("long", 61)  # 60 positions to prefill
    chunks = []
    while True:
        plan = run(scheduler)
        # Every step carries every running stream's decode step.
        assert plan.decode_count >= 3
        assert plan.prefill_tokens <= 16
        chunks += [(s.position, s.length) for s in plan.steps if s.phase == "prefill"]
        if any(s.request_id == "long" and s.phase == "decode" for s in plan.steps):
            break
    assert chunks == [(0, 16), (16, 16), (32, 16), (48, 12)]


def test_the_prefill_budget_is_shared_and_started_prompts_go_first() -> None:
    scheduler = make(batch=8, chunk=10)
    scheduler.add("a", 8)  # 7 to prefill
    scheduler.add("b", 9)  # 8 to prefill
    assert shape(run(scheduler)) == [("a", "prefill", 0, 7), ("b", "prefill", 0, 3)]
    scheduler.add("c", 4)
    # b already started: it goes before c, which gets what is left of the budget.
    assert shape(run(scheduler)) == [
        ("a", "decode", 7, 1),
        ("b", "prefill", 3, 5),
        ("c", "prefill", 0, 3),
    ]


def test_max_batch_size_rotates_the_least_recently_served_and_keeps_a_row_for_prompts() -> None:
    scheduler = make(batch=3, chunk=64)
    for rid in "abcd":
        scheduler.add(rid, 1)
    first = run(scheduler)
    assert first.request_ids == ["a", "b", "c"]
    # Round robin over d, a, b, c, d, a, b, c, ... (rows listed in arrival order).
    assert run(scheduler).request_ids == ["a", "b", "d"]
    assert run(scheduler).request_ids == ["a", "c", "d"]
    assert run(scheduler).request_ids == ["b", "c", "d"]
    served = [0, 0, 0, 0]
    for _ in range(4):
        for rid in run(scheduler).request_ids:
            served["abcd".index(rid)] += 1
    assert served == [3, 3, 3, 3]
    scheduler.add("e", 5)
    plan = run(scheduler)
    assert len(plan.steps) == 3 and plan.decode_count == 2
    assert shape(plan)[-1] == ("e", "prefill", 0, 4)


def test_micro_batches_in_flight_hold_each_request_once() -> None:
    scheduler = make(batch=2, chunk=64, micro=2)
    for rid in "abcd":
        scheduler.add(rid, 1)
    one = scheduler.schedule()
    two = scheduler.schedule()
    assert one is not None and two is not None
    assert one.request_ids == ["a", "b"] and two.request_ids == ["c", "d"]
    assert scheduler.in_flight == 2 and scheduler.schedule() is None
    scheduler.complete(one)
    three = scheduler.schedule()
    assert three is not None and three.request_ids == ["a", "b"]
    assert [s.position for s in three.steps] == [1, 1]
    scheduler.complete(two)
    scheduler.complete(three)
    assert scheduler.in_flight == 0


def test_requests_are_shared_out_over_the_micro_batches() -> None:
    scheduler = make(batch=16, chunk=64, micro=3)
    for i in range(7):
        scheduler.add(f"r{i}", 1)
    plans = [scheduler.schedule() for _ in range(3)]
    assert [len(p.steps) for p in plans if p is not None] == [3, 3, 1]
    assert sorted(r for p in plans if p is not None for r in p.request_ids) == [
        f"r{i}" for i in range(7)
    ]


def test_with_more_micro_batches_than_requests_nothing_is_scheduled_twice() -> None:
    scheduler = make(batch=4, chunk=64, micro=3)
    scheduler.add("a", 1)
    plan = scheduler.schedule()
    assert plan is not None and scheduler.schedule() is None
    scheduler.complete(plan)
    assert scheduler.schedule() is not None


def test_an_aborted_request_in_flight_leaves_when_its_micro_batch_completes() -> None:
    scheduler = make()
    scheduler.add("a", 1)
    scheduler.add("b", 1)
    plan = scheduler.schedule()
    assert plan is not None
    assert scheduler.abort("a")
    assert "a" in scheduler
    scheduler.complete(plan)
    assert "a" not in scheduler and "b" in scheduler
    assert run(scheduler).request_ids == ["b"]
    assert scheduler.idle() == ["b"]
    assert scheduler.abort("b") and not scheduler.abort("b")
    assert len(scheduler) == 0 and scheduler.schedule() is None


def test_a_failed_micro_batch_drops_its_requests_only() -> None:
    scheduler = make(batch=1, micro=2)
    scheduler.add("a", 1)
    scheduler.add("b", 1)
    one, two = scheduler.schedule(), scheduler.schedule()
    assert one is not None and two is not None
    assert scheduler.fail(one) == ["a"]
    scheduler.complete(two)
    assert list(run(scheduler).request_ids) == ["b"]


def test_settings_and_requests_are_checked() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        SchedulerSettings(0, 16)
    scheduler = make()
    scheduler.add("a", 3)
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add("a", 3)
    with pytest.raises(ValueError, match="at least one prompt token"):
        scheduler.add("b", 0)


def test_a_paused_request_takes_no_step_and_no_row_until_resumed() -> None:
    scheduler = make(batch=2, micro=2)
    scheduler.add("a", 1)
    scheduler.add("b", 1)
    scheduler.pause("a")
    # "a" holds no row: "b" has the whole share of the two micro-batches' rows.
    assert shape(run(scheduler)) == [("b", "decode", 0, 1)]
    assert shape(run(scheduler)) == [("b", "decode", 1, 1)]
    assert scheduler.runnable == 1 and len(scheduler) == 2
    scheduler.resume("a")
    assert shape(run(scheduler)) == [("a", "decode", 0, 1)]


def test_a_request_paused_in_flight_finishes_that_step_then_waits() -> None:
    scheduler = make()
    scheduler.add("a", 1)
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.pause("a")
    scheduler.complete(plan)
    assert scheduler.schedule() is None
    assert scheduler.abort("a") and "a" not in scheduler  # leaves at once: not in flight
    scheduler.pause("gone")  # unknown ids are ignored
    scheduler.resume("gone")


def test_a_failed_micro_batch_is_put_back_and_replay_prefills_prompt_and_tokens_again() -> None:
    scheduler = make(chunk=4)
    scheduler.add("a", 5)  # prefill 4, then decode from position 4
    run(scheduler)
    run(scheduler)  # token 0 sampled at position 4
    run(scheduler)  # token 1 sampled at position 5
    failed = scheduler.schedule()
    assert failed is not None and failed.steps == (ScheduledStep("a", "decode", 6, 1, 2),)
    scheduler.add("new", 3)  # joins while the stage is down: nothing to replay
    scheduler.rewind(failed)
    assert scheduler.in_flight == 0 and "a" in scheduler
    assert scheduler.replay() == ["a"]
    # The prompt (5) and the tokens it generated but the last (1): 6 positions, in chunks of
    # at most 4 next to the new prompt; then the decode step it was at: token number 2.
    assert shape(run(scheduler)) == [("a", "prefill", 0, 4)]
    assert shape(run(scheduler)) == [("a", "prefill", 4, 2), ("new", "prefill", 0, 2)]
    plan = run(scheduler)
    assert ScheduledStep("a", "decode", 6, 1, 2) in plan.steps


def test_replay_needs_every_micro_batch_back_and_drops_the_aborted() -> None:
    scheduler = make()
    scheduler.add("a", 3)
    scheduler.add("b", 3)
    plan = scheduler.schedule()
    assert plan is not None
    with pytest.raises(RuntimeError, match="in flight"):
        scheduler.replay()
    scheduler.abort("b")
    scheduler.rewind(plan)
    assert "b" not in scheduler
    assert scheduler.replay() == ["a"]
    assert shape(run(scheduler)) == [("a", "prefill", 0, 2)]


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        (["127.0.0.1", "localhost"], 1),  # loopback names are one machine
        (["127.0.0.1", "::1", "127.0.0.1"], 1),
        (["10.0.0.1", "10.0.0.2"], 2),
        (["10.0.0.1", "10.0.0.1", "10.0.0.2"], 2),
        (["mac-a.local", "127.0.0.1", "mac-b.local"], 3),
        ([], 1),
    ],
)
def test_by_default_one_micro_batch_per_machine_of_the_stages(
    hosts: list[str], expected: int
) -> None:
    assert default_micro_batches(hosts) == expected


def running(first: int = 8) -> Scheduler:
    """Streams a and b past their first token, first-token priority up to ``first``."""
    scheduler = make(batch=16, chunk=16, first=first)
    scheduler.add("a", 3)
    scheduler.add("b", 2)
    run(scheduler)  # their prefills (nothing runs yet: no priority, one micro-batch)
    run(scheduler)  # their first tokens
    return scheduler


def test_a_short_newcomer_gets_its_first_token_ahead_of_the_running_streams() -> None:
    scheduler = running()
    scheduler.add("new", 9)  # 8 positions to prefill: within first_token_tokens
    assert shape(run(scheduler)) == [("new", "prefill", 0, 8)]
    assert run(scheduler).steps == (ScheduledStep("new", "decode", 8, 1, 0),)
    # Then back to one micro-batch for everyone.
    assert shape(run(scheduler)) == [
        ("a", "decode", 3, 1),
        ("b", "decode", 2, 1),
        ("new", "decode", 9, 1),
    ]


def test_newcomers_arriving_at_every_step_never_starve_the_running_streams() -> None:
    scheduler = running()
    served = []
    for i in range(3 * FIRST_TOKEN_STEPS + 3):
        scheduler.add(f"n{i}", 4)
        plan = run(scheduler)
        served.append("a" in plan.request_ids and "b" in plan.request_ids)
    # At most FIRST_TOKEN_STEPS first-token micro-batches in a row, then the streams step.
    assert served == ([False] * FIRST_TOKEN_STEPS + [True]) * 3


def test_a_longer_prompt_takes_the_chunked_path_beside_the_streams() -> None:
    scheduler = running(first=8)
    scheduler.add("long", 10)  # 9 positions to prefill: over first_token_tokens
    assert shape(run(scheduler)) == [
        ("a", "decode", 3, 1),
        ("b", "decode", 2, 1),
        ("long", "prefill", 0, 9),
    ]


def test_with_no_stream_running_newcomers_share_micro_batches_as_without_priority() -> None:
    with_priority, without = make(first=8), make()
    for scheduler in (with_priority, without):
        scheduler.add("a", 5)
        scheduler.add("b", 1)
    expected = [("b", "decode", 0, 1), ("a", "prefill", 0, 4)]
    assert shape(run(with_priority)) == shape(run(without)) == expected


def test_first_token_priority_needs_a_prefill_within_the_chunk_budget() -> None:
    scheduler = make(batch=8, chunk=4, first=64)
    scheduler.add("a", 2)
    run(scheduler)
    run(scheduler)
    scheduler.add("new", 7)  # 6 to prefill: more than one chunk, so chunked beside a
    assert shape(run(scheduler)) == [("a", "decode", 2, 1), ("new", "prefill", 0, 4)]
    with pytest.raises(ValueError, match="first_token_tokens must be >= 0"):
        SchedulerSettings(8, 16, 1, -1)
