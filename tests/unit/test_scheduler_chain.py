"""Chained steps in the scheduler: a lone small decode batch's next step planned before
this one is back, and how finishing, newcomers and failures end or break a chain."""

from __future__ import annotations

from mlx_relay.coordinator.scheduler import ScheduledStep, Scheduler, SchedulerSettings, StepPlan


def make(chain: int = 4, batch: int = 8, micro: int = 1) -> Scheduler:
    return Scheduler(SchedulerSettings(batch, 16, micro, 0, chain_max_batch=chain))


def decoding(scheduler: Scheduler, *requests: tuple[str, int | None]) -> StepPlan:
    """Requests with one-token prompts (their first step is a decode step): that plan."""
    for request_id, max_steps in requests:
        scheduler.add(request_id, 1, max_steps=max_steps)
    first = scheduler.schedule()
    assert first is not None
    return first


def test_a_lone_decode_batch_chains_its_next_step_until_max_steps() -> None:
    scheduler = make()
    scheduler.add("a", 3, max_steps=3)
    prefill = scheduler.schedule()
    assert prefill is not None
    assert scheduler.chain() is None  # a prefill is never chained
    scheduler.complete(prefill)
    step0 = scheduler.schedule()
    assert step0 is not None and step0.steps == (ScheduledStep("a", "decode", 2, 1, 0),)
    step1 = scheduler.chain()
    assert step1 is not None
    assert step1.follows == step0.plan_id
    assert step1.steps == (ScheduledStep("a", "decode", 3, 1, 1),)
    assert scheduler.chain() is None  # one chained plan at a time
    assert scheduler.in_flight == 2 and scheduler.computing == 1
    assert scheduler.schedule() is None
    scheduler.complete(step0)
    assert scheduler.computing == 1 and not scheduler.broken(step1)
    step2 = scheduler.chain()
    assert step2 is not None and step2.steps == (ScheduledStep("a", "decode", 4, 1, 2),)
    scheduler.complete(step1)
    assert scheduler.chain() is None  # token 3 would be past max_steps
    scheduler.complete(step2, finished=("a",))
    assert "a" not in scheduler and scheduler.in_flight == 0


def test_no_chain_when_off_over_the_batch_limit_or_beside_other_work() -> None:
    off = make(chain=0)
    decoding(off, ("a", None))
    assert off.chain() is None

    big = make(chain=2)
    decoding(big, ("a", None), ("b", None), ("c", None))
    assert big.chain() is None

    two = make(batch=1, micro=2)
    decoding(two, ("a", None), ("b", None))
    assert two.schedule() is not None  # b's plan beside a's
    assert two.chain() is None

    waiting = make()
    decoding(waiting, ("a", None))
    waiting.add("b", 1)  # a newcomer: it joins the next plan, with a
    assert waiting.chain() is None


def test_a_newcomer_waits_for_the_chained_plan_then_joins_the_batch() -> None:
    scheduler = make()
    first = decoding(scheduler, ("a", None))
    chained = scheduler.chain()
    assert chained is not None
    scheduler.add("b", 1)
    assert scheduler.schedule() is None
    scheduler.complete(first)
    assert scheduler.schedule() is None  # the chained plan computes now: the slot is taken
    assert scheduler.chain() is None  # b waits: the chain ends
    scheduler.complete(chained)
    plan = scheduler.schedule()
    assert plan is not None and [(s.request_id, s.position) for s in plan.steps] == [
        ("a", 2),
        ("b", 0),
    ]


def test_a_request_finished_early_stays_until_its_chained_step_is_back() -> None:
    scheduler = make()
    first = decoding(scheduler, ("a", None), ("b", None))
    chained = scheduler.chain()
    assert chained is not None
    scheduler.complete(first, finished=("a",))  # a sampled EOS: its chained step is wasted
    assert "a" in scheduler  # its sessions must outlive the chained step
    next_chain = scheduler.chain()
    assert next_chain is not None and next_chain.request_ids == ["b"]
    scheduler.complete(chained)
    assert "a" not in scheduler and "b" in scheduler


def test_an_aborted_request_leaves_once_both_of_its_plans_are_back() -> None:
    scheduler = make()
    first = decoding(scheduler, ("a", None))
    chained = scheduler.chain()
    assert chained is not None
    assert scheduler.abort("a")
    scheduler.complete(first)
    assert "a" in scheduler and scheduler.chain() is None
    scheduler.complete(chained)
    assert "a" not in scheduler and scheduler.in_flight == 0


def test_a_failed_first_plan_breaks_the_chained_one() -> None:
    scheduler = make()
    first = decoding(scheduler, ("a", None))
    chained = scheduler.chain()
    assert chained is not None
    assert scheduler.broken(chained)  # its first plan is not back yet
    scheduler.rewind(first)  # a stage failed: a replay follows
    assert scheduler.broken(chained)
    assert scheduler.chain() is None  # nothing chains on a broken plan
    scheduler.rewind(chained)
    assert scheduler.in_flight == 0 and not scheduler.broken(chained)
    assert scheduler.replay() == ["a"]
    plan = scheduler.schedule()
    assert plan is not None and plan.steps == (ScheduledStep("a", "decode", 0, 1, 0),)


def test_a_chained_plan_back_before_its_first_leaves_the_requests_in_that_one() -> None:
    scheduler = make()
    first = decoding(scheduler, ("a", None))
    chained = scheduler.chain()
    assert chained is not None
    scheduler.rewind(chained)  # its call failed first (a race of two failures)
    scheduler.complete(first)
    assert scheduler.in_flight == 0
    plan = scheduler.schedule()  # not stuck in the chained plan: a's next step is planned
    assert plan is not None and plan.steps == (ScheduledStep("a", "decode", 1, 1, 1),)


def test_a_failed_first_plan_drops_its_requests_and_the_chained_plan_holds_none() -> None:
    scheduler = make()
    first = decoding(scheduler, ("a", None))
    chained = scheduler.chain()
    assert chained is not None
    assert scheduler.fail(first) == ["a"]
    assert scheduler.broken(chained)
    assert scheduler.fail(chained) == []
    assert len(scheduler) == 0 and scheduler.in_flight == 0
