"""Batched decode on the stages: requests of different lengths that join, pause, leave and
end at different steps give exactly the tokens (and log-probs) each gets alone in one
process, on 1, 2 and 3 stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mlx_relay import wire
from mlx_relay.core.types import LayerRange
from mlx_relay.model.generate import generate_tokens
from mlx_relay.model.sampling import SampledToken, SamplingParams
from mlx_relay.model.shard import Shard
from mlx_relay.proto import relay_pb2 as pb
from mlx_relay.worker.stage import StageCall, StageLimits, StageRuntime
from tests.support.reference import cached_model
from tests.support.tiny_model import VARIANTS, make_tiny_model_dir

LIMITS = StageLimits(max_prompt_tokens=256, max_sessions=64, session_ttl_seconds=600.0)

# Float32 and quantized, tied and untied heads, sliding-window layers.
BATCH_VARIANTS = ["llama", "qwen3", "llama-4bit", "qwen3-4bit", "llama-sliding"]
SPLITS = {
    1: [LayerRange(0, 4)],
    2: [LayerRange(0, 2), LayerRange(2, 4)],
    3: [LayerRange(0, 1), LayerRange(1, 3), LayerRange(3, 4)],
}
# How each variant computes (model.compute), the same alone and batched. Float32 matmuls
# run on the BLAS (OpenBLAS in tests), whose rows can round differently with the number of
# rows in the call (up to ~1e-6 here); MLX's own quantized kernels compute every row the
# same way whatever the batch, so there the batch must be bit-identical.
COMPUTE = {"llama": "auto", "qwen3": "auto", "llama-4bit": "quantized", "qwen3-4bit": "auto"}
COMPUTE["llama-sliding"] = "quantized"
BIT_EXACT = {"llama-4bit"}
GREEDY = SamplingParams()
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234, top_logprobs=2)


@dataclass
class Plan:
    """One request as the test's coordinator drives it."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    arrives: int = 0
    params: SamplingParams = GREEDY
    skips: set[int] = field(default_factory=set)  # ticks it sends nothing (leaves the batch)
    cancel_after: int | None = None  # end it after this many tokens


@dataclass
class _Live:
    plan: Plan
    position: int = 0
    token: int = 0
    tokens: list[SampledToken] = field(default_factory=list)
    prefilled: bool = False


def _entry(live: _Live, token_ids: list[int]) -> pb.ForwardEntry:
    return pb.ForwardEntry(
        request_id=live.plan.request_id,
        position=live.position,
        tensor=wire.encode_token_ids(token_ids),
        sampling=wire.encode_sampling(live.plan.params),
        step=len(live.tokens),
    )


def _through(
    stages: list[StageRuntime],
    entries: list[pb.ForwardEntry],
    calls: list[StageCall] | None = None,
) -> list[pb.ForwardResult]:
    request = pb.ForwardRequest(entries=entries)
    results: list[pb.ForwardResult] = []
    for stage in stages:
        outcome = stage.forward(stage.check(request))
        results = outcome.results
        if calls is not None:
            calls += outcome.calls
        assert [r.request_id for r in results] == [e.request_id for e in request.entries]
        request = pb.ForwardRequest(
            entries=[
                pb.ForwardEntry(
                    request_id=e.request_id,
                    position=e.position,
                    tensor=r.tensor,
                    sampling=e.sampling,
                    step=e.step,
                )
                for e, r in zip(request.entries, results, strict=True)
            ]
        )
    return results


def drive(
    stages: list[StageRuntime], plans: list[Plan], calls: list[StageCall] | None = None
) -> tuple[dict[str, list], list[int]]:
    """Run the plans tick by tick, every live request's step in one Forward per stage.

    Returns each request's sampled tokens and the number of decode entries per tick;
    ``calls`` gets every stage's MLX calls.
    """
    live: dict[str, _Live] = {}
    done: dict[str, list[SampledToken]] = {}
    widths: list[int] = []
    tick = 0
    while len(done) < len(plans):
        for plan in plans:
            if plan.arrives == tick:
                live[plan.request_id] = _Live(plan, token=plan.prompt[-1])
        entries: list[pb.ForwardEntry] = []
        stepping: list[_Live] = []
        for state in live.values():
            if tick in state.plan.skips:
                continue
            if not state.prefilled and len(state.plan.prompt) > 1:
                entries.append(_entry(state, state.plan.prompt[:-1]))
            else:
                entries.append(_entry(state, [state.token]))
                stepping.append(state)
        widths.append(len(stepping))
        results = _through(stages, entries, calls) if entries else []
        by_id = {r.request_id: r for r in results}
        for state in list(live.values()):
            result = by_id.get(state.plan.request_id)
            if result is None:
                continue
            if state not in stepping:
                state.prefilled = True
                state.position = len(state.plan.prompt) - 1
                continue
            state.position += 1
            state.token = result.token_id
            state.tokens.append(
                SampledToken(
                    result.token_id,
                    result.logprob,
                    [(t.token_id, t.logprob) for t in result.top_logprobs],
                )
            )
            cancelled = state.plan.cancel_after == len(state.tokens)
            if len(state.tokens) == state.plan.max_tokens or cancelled:
                for stage in stages:
                    stage.sessions.end(state.plan.request_id)
                done[state.plan.request_id] = state.tokens
                del live[state.plan.request_id]
        tick += 1
        assert tick < 500
    return done, widths


def alone(model_dir: Path, plan: Plan) -> list[SampledToken]:
    model = cached_model(model_dir, COMPUTE[model_dir.name])
    return list(generate_tokens(model, plan.prompt, plan.max_tokens, plan.params))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batch-models")
    return {
        name: make_tiny_model_dir(root / name, num_layers=4, seed=10 + i, **kwargs)  # type: ignore[arg-type]
        for i, (name, kwargs) in enumerate((v, VARIANTS[v]) for v in BATCH_VARIANTS)
    }


def runtimes(model_dir: Path, splits: list[LayerRange]) -> list[StageRuntime]:
    compute = COMPUTE[model_dir.name]
    return [StageRuntime(Shard.load(model_dir, r, compute), LIMITS) for r in splits]


def mixed_plans() -> list[Plan]:
    """Eight requests: prompt lengths 1 to 23, arriving at different ticks, stopping at
    different lengths, one pausing now and then, one seeded, one cancelled mid-way."""
    prompts = [
        [5, 17, 42, 3, 99, 7, 250, 11, 64],
        [8],
        [100, 101, 102, 103, 104],
        [7] * 23,
        [33, 34],
        [200, 3, 200, 3, 200, 3, 200],
        [61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73],
        [12, 250, 300],
    ]
    plans = [
        Plan(f"r{i}", prompt, max_tokens=6 + (5 * i) % 11, arrives=(3 * i) % 4)
        for i, prompt in enumerate(prompts)
    ]
    plans[2].skips = {4, 5, 9}
    plans[5].params = SEEDED
    plans[6].cancel_after = 3
    plans[6].max_tokens = 12
    return plans


@pytest.mark.parametrize("variant", BATCH_VARIANTS)
@pytest.mark.parametrize("stage_count", [1, 2, 3])
def test_a_batch_gives_each_request_its_tokens_alone(
    variant: str, stage_count: int, model_dirs: dict[str, Path]
) -> None:
    stages = runtimes(model_dirs[variant], SPLITS[stage_count])
    plans = mixed_plans()
    calls: list[StageCall] = []
    got, widths = drive(stages, plans, calls)

    assert max(widths) >= 5, "the plans must really batch several decode steps"
    assert max(c.batch_size for c in calls if c.phase == "prefill") >= 2, "and prefills"
    for plan in plans:
        expected = alone(model_dirs[variant], plan)[: len(got[plan.request_id])]
        tokens = [t.token_id for t in got[plan.request_id]]
        assert tokens == [t.token_id for t in expected], plan.request_id
        if variant in BIT_EXACT:
            # Padded keys add exact zeros and rows never mix: bit-identical log-probs.
            assert got[plan.request_id] == expected, plan.request_id
        else:
            # BLAS rounding (see COMPUTE) or, for sliding windows, a ring buffer rotated
            # differently (the same keys summed in another order): last bits only.
            for mine, theirs in zip(got[plan.request_id], expected, strict=True):
                assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-5)
    assert len(got["r6"]) == 3
    for stage in stages:
        assert len(stage.sessions) == 0
        stage.batches.retain(set())
        assert len(stage.batches) == 0


def test_a_seeded_request_samples_the_same_alone_and_in_a_batch(
    model_dirs: dict[str, Path],
) -> None:
    path = model_dirs["llama-4bit"]  # bit-exact
    seeded = Plan("s", [5, 6, 7, 8], max_tokens=12, params=SEEDED)
    solo, _ = drive(runtimes(path, SPLITS[2]), [seeded])
    others = [Plan(f"g{i}", [9 + i] * (2 + 3 * i), 12, arrives=i) for i in range(5)]
    batched, widths = drive(runtimes(path, SPLITS[2]), [*others, seeded])
    assert max(widths) == 6
    assert batched["s"] == solo["s"] == alone(path, seeded)
    assert len({t.token_id for t in solo["s"]}) > 3, "sampling must not be greedy-like"


def test_rows_move_between_groups_and_back(model_dirs: dict[str, Path]) -> None:
    """Two alternating micro-batches keep two stable groups; requests moving from one to
    the other keep their exact tokens."""
    path = model_dirs["llama-4bit"]
    (stage,) = runtimes(path, SPLITS[1])
    plans = [Plan(f"m{i}", [20 + i] * (1 + 2 * i), 10) for i in range(6)]
    states = {p.request_id: _Live(p, token=p.prompt[-1]) for p in plans}
    for state in states.values():
        if len(state.plan.prompt) > 1:
            _through([stage], [_entry(state, state.plan.prompt[:-1])])
            state.position = len(state.plan.prompt) - 1
    a, b = ["m0", "m1", "m2"], ["m3", "m4", "m5"]
    for tick in range(10):
        if tick == 5:
            a, b = ["m0", "m1", "m3"], ["m2", "m4", "m5"]  # m2 and m3 swap micro-batches
        for ids in (a, b):
            results = _through([stage], [_entry(states[rid], [states[rid].token]) for rid in ids])
            for rid, result in zip(ids, results, strict=True):
                state = states[rid]
                state.position += 1
                state.token = result.token_id
                state.tokens.append(SampledToken(result.token_id, result.logprob, []))
        assert sorted(stage.batches.group_sizes) == [3, 3]
    for plan in plans:
        assert states[plan.request_id].tokens == alone(path, plan)


def test_a_multi_position_step_takes_its_row_out_of_the_batch(
    model_dirs: dict[str, Path],
) -> None:
    path = model_dirs["llama-4bit"]
    (stage,) = runtimes(path, SPLITS[1])
    plans = [Plan(f"t{i}", [40 + i] * (2 + i), 8) for i in range(3)]
    expected = {p.request_id: alone(path, p) for p in plans}
    states = {p.request_id: _Live(p, token=p.prompt[-1]) for p in plans}
    for state in states.values():
        _through([stage], [_entry(state, state.plan.prompt[:-1])])
        state.position = len(state.plan.prompt) - 1

    def decode(ids: list[str]) -> None:
        results = _through([stage], [_entry(states[rid], [states[rid].token]) for rid in ids])
        for rid, result in zip(ids, results, strict=True):
            states[rid].position += 1
            states[rid].token = result.token_id
            states[rid].tokens.append(SampledToken(result.token_id, result.logprob, []))

    for _ in range(3):
        decode(["t0", "t1", "t2"])
    # t1 feeds two known tokens at once (its next input and the token after it).
    t1 = states["t1"]
    known = [t.token_id for t in expected["t1"]]
    (result,) = _through([stage], [_entry(t1, [t1.token, known[3]])])
    assert "t1" not in stage.batches and stage.batches.group_sizes == [2]
    assert result.token_id == known[4]
    assert result.logprob == pytest.approx(expected["t1"][4].logprob, abs=1e-5)
    t1.position += 2
    t1.token = result.token_id
    for _ in range(3):
        decode(["t0", "t1", "t2"])
    assert [t.token_id for t in t1.tokens] == known[:3] + known[5:8]
    for rid in ("t0", "t2"):
        assert states[rid].tokens == expected[rid][:6]
