"""The pure side of tracing: attribution of a timeline, the call split between stages, the
waterfall document, its Chrome form and the bounded store."""

from __future__ import annotations

import pytest

from mlx_relay.monitoring.traces import (
    RequestStep,
    RequestTimeline,
    StageTimes,
    StepRecord,
    TraceStore,
    attribute,
    chrome_trace,
    trace_document,
)
from mlx_relay.monitoring.traces.attribution import split_call


def two_stages(call: float = 0.1) -> tuple[StageTimes, ...]:
    # Stage 0: 0.01 check, 0.02 queue, 0.03 compute, calls stage 1 at 0.065 for 0.03 (its
    # caller's timing); answers after 0.1 in all. Stage 1: 0.02 in all, 0.005 queue.
    first = StageTimes(
        "w0", call=0.0, compute=0.03, handler=0.1, check=0.01, queue=0.02, relay_offset=0.065
    )
    second = StageTimes("w1", call=0.03, compute=0.01, handler=0.02, queue=0.005, sample=0.004)
    return (first, second)


def timeline(steps: int = 2, **overrides: object) -> RequestTimeline:
    line = RequestTimeline(
        request_id="r1",
        trace_id=0xABC,
        root_span_id=0x1,
        model="tiny",
        operation="chat",
        coordinator="coord",
        stages=("w0", "w1"),
        arrival=100.0,
        start_unix=1_700_000_000.0,
        prompt_tokens=5,
        prepared=100.01,
        admitted=100.05,
    )
    start = 100.06
    for i in range(steps):
        record = StepRecord(i, 1, 1, 0, started=start, sent=start + 0.002)
        record.received = record.sent + 0.12
        record.ended = record.received + 0.003
        record.stages = two_stages()
        line.steps.append(RequestStep(record, "decode", 4 + i, 1, 0x100 + i, 0x200 + i))
        start = record.ended + 0.01  # waits 10 ms for its next step
    line.finished = line.steps[-1].record.ended
    line.first_token = line.steps[0].record.ended
    line.output_tokens = steps
    line.finish_reason = "length"
    for key, value in overrides.items():
        setattr(line, key, value)
    return line


def test_split_call_gives_each_stage_and_link_its_share() -> None:
    first, second = split_call(0.12, two_stages())
    # Link into w0: the call less w0's own time; w0 computes its time less queue and hop.
    assert first.network == pytest.approx(0.02)
    assert first.compute == pytest.approx(0.1 - 0.02 - 0.03)
    assert first.begin == pytest.approx(0.01)  # half the link's time after the call began
    assert first.end == pytest.approx(0.11)
    assert second.network == pytest.approx(0.01)
    assert second.compute == pytest.approx(0.015)
    assert second.call_begin == pytest.approx(0.01 + 0.065)
    assert second.begin == pytest.approx(0.075 + 0.005)


def test_attribution_of_a_timeline_sums_to_its_e2e() -> None:
    result = attribute(timeline())
    assert result.e2e_s == pytest.approx(0.05 + 0.002 * 2 + 0.12 * 2 + 0.003 * 2 + 0.01 + 0.01)
    assert result.queue_s == pytest.approx(0.04)
    assert result.coordinator_s == pytest.approx(0.01 + 2 * 0.005)
    assert result.compute_s == pytest.approx({"w0": 0.1, "w1": 0.03})
    assert result.network_s == pytest.approx({"coord → w0": 0.04, "w0 → w1": 0.02})
    # Before the first step, between the steps, and in each stage's queue.
    assert result.bubble_s == pytest.approx(0.01 + 0.01 + 2 * (0.02 + 0.005))
    assert result.residual_s == pytest.approx(0.0, abs=1e-12)


def test_a_request_ending_during_a_call_counts_only_its_part() -> None:
    line = timeline(1)
    record = line.steps[0].record
    line.finished = record.sent + 0.06  # aborted half-way through the call
    result = attribute(line)
    assert result.e2e_s == pytest.approx(line.finished - line.arrival)
    assert sum(result.compute_s.values()) == pytest.approx(0.065 / 2)
    assert result.residual_s == pytest.approx(0.0, abs=1e-12)


def test_a_stage_without_its_own_times_counts_compute_and_leaves_the_rest_to_its_link() -> None:
    old = (StageTimes("w0", call=0.0, compute=0.04),)
    (split,) = split_call(0.1, old)
    assert split.compute == pytest.approx(0.04) and split.network == pytest.approx(0.06)


def test_trace_document_and_its_chrome_form() -> None:
    document = trace_document(timeline())
    assert document["trace_id"] == f"{0xABC:032x}"
    assert document["lanes"] == [
        "coordinator",
        "link coord → w0",
        "stage 0 · w0",
        "link w0 → w1",
        "stage 1 · w1",
    ]
    root = document["spans"][0]
    assert root["parent_id"] is None and root["name"] == "chat tiny"
    assert root["attributes"]["gen_ai.response.finish_reasons"] == ["length"]
    tpot = root["attributes"]["gen_ai.server.time_per_output_token"]
    assert tpot == pytest.approx(0.12 + 0.005 + 0.01)
    names = [s["name"] for s in document["spans"] if s["lane"] == "stage 1 · w1"]
    assert names.count("sample") == 2 and names.count("queue wait") == 2
    # The second stage's server span hangs under the first stage's call to it.
    by_id = {s["span_id"]: s for s in document["spans"]}
    server = next(s for s in document["spans"] if s["name"] == "stage 1 forward")
    assert by_id[server["parent_id"]]["name"] == "Forward w1"
    assert trace_document(timeline())["spans"] == document["spans"]  # stable ids
    chrome = chrome_trace(document)
    complete = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == len(document["spans"])
    assert complete[0]["dur"] == pytest.approx(document["duration_s"] * 1e6)


def test_store_keeps_the_newest_and_profiles_a_window() -> None:
    now = [2_000.0]
    store = TraceStore(2, clock=lambda: now[0])
    for i, finished in enumerate((1_000.0, 1_990.0, 1_995.0)):
        store.add(timeline(request_id=f"r{i}", finished_unix=finished))
    assert len(store) == 2 and store.get("r0") is None and store.get("r2") is not None
    profile = store.profile(8.0)
    assert profile["requests"] == 1 and profile["output_tokens"] == 2
    assert profile["per_output_token"]["e2e_s"] == pytest.approx(profile["totals"]["e2e_s"] / 2)
    assert store.profile(100.0)["requests"] == 2
    assert store.profile(1.0)["per_output_token"] is None


def test_store_keeps_fewer_traces_when_they_hold_too_many_steps() -> None:
    store = TraceStore(10, max_steps=5)
    for i in range(3):
        store.add(timeline(2, request_id=f"r{i}"))
    assert len(store) == 2 and store.get("r0") is None  # 4 steps kept, 6 would be too many
    store.add(timeline(7, request_id="long"))
    assert len(store) == 1 and store.get("long") is not None  # the newest stays


def test_a_chained_step_leaves_its_wait_out_of_the_split_and_the_attribution() -> None:
    # Stage 0 waited 0.05 for the step before's tokens, then answered as in two_stages.
    first, second = two_stages()
    waited = StageTimes(
        "w0",
        call=0.0,
        compute=0.03,
        handler=0.15,
        check=0.01,
        queue=0.02,
        relay_offset=0.115,
        chain_wait=0.05,
    )
    plain, chained = split_call(0.12, (first, second)), split_call(0.17, (waited, second))
    for a, b in zip(plain, chained, strict=True):
        assert (b.compute, b.network) == pytest.approx((a.compute, a.network))
        assert b.begin == pytest.approx(a.begin + 0.05)
        assert b.end == pytest.approx(a.end + 0.05)

    line = timeline()
    one, two = (step.record for step in line.steps)
    # The second step was sent 0.05 after the first, long before the first was back.
    two.started, two.sent = one.started + 0.05, one.sent + 0.05
    two.received = one.received + 0.05  # its call: 0.05 waiting, then as the first's
    two.ended = two.received + 0.003
    two.stages = (waited, second)
    line.finished = two.ended
    result = attribute(line)
    assert result.e2e_s == pytest.approx(line.finished - line.arrival)
    assert abs(result.residual_s) <= 0.02 * result.e2e_s
    # No time between the steps: the bubble is the stages' queue waits, at most both steps'.
    assert 0 < result.bubble_s <= 2 * (0.02 + 0.005) + 1e-9
    # The overlap is counted once: less compute than two whole steps.
    assert result.compute_s["w0"] < 2 * plain[0].compute
