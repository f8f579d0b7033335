"""Sampling: greedy is argmax, seeded draws are reproducible per (seed, step), filters keep
the right tokens, and log-probabilities are those of the model's distribution."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from mlx_relay.core.errors import InvalidRequest
from mlx_relay.model.sampling import SamplingParams, greedy_rows, sample

LOGITS = [1.0, 3.0, 2.5, -1.0, 0.0, 2.9, -4.0, 0.5]


def _log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    total = math.log(sum(math.exp(v - top) for v in values)) + top
    return [v - total for v in values]


def _logits(values: list[float] = LOGITS) -> mx.array:
    return mx.array(values)


def test_greedy_is_argmax_with_the_exact_logprob() -> None:
    token = sample(_logits(), SamplingParams(), step=0)
    assert token.token_id == 1
    assert token.logprob == pytest.approx(_log_softmax(LOGITS)[1], abs=1e-6)
    assert token.top_logprobs == []


def test_top_logprobs_are_the_most_likely_tokens_in_order() -> None:
    token = sample(_logits(), SamplingParams(top_logprobs=3), step=0)
    expected = _log_softmax(LOGITS)
    assert [t for t, _ in token.top_logprobs] == [1, 5, 2]
    for token_id, logprob in token.top_logprobs:
        assert logprob == pytest.approx(expected[token_id], abs=1e-6)


def test_logprob_ignores_temperature() -> None:
    params = SamplingParams(temperature=0.7, seed=3, top_logprobs=2)
    token = sample(_logits(), params, step=0)
    assert token.logprob == pytest.approx(_log_softmax(LOGITS)[token.token_id], abs=1e-6)
    assert [t for t, _ in token.top_logprobs] == [1, 5]


def test_half_precision_logits_are_handled() -> None:
    token = sample(_logits().astype(mx.float16), SamplingParams(top_logprobs=1), step=0)
    assert token.token_id == 1
    assert token.logprob == pytest.approx(_log_softmax(LOGITS)[1], abs=1e-3)


def test_seeded_sampling_is_reproducible_per_step_and_varies_across_steps() -> None:
    flat = _logits([0.0] * 64)  # uniform: every step's draw depends only on the key
    params = SamplingParams(temperature=1.0, seed=1234)
    first = [sample(flat, params, step).token_id for step in range(40)]
    again = [sample(flat, params, step).token_id for step in range(40)]
    assert first == again
    assert len(set(first)) > 10, "steps must draw with different keys"
    other_seed = [
        sample(flat, SamplingParams(temperature=1.0, seed=1235), s).token_id for s in range(40)
    ]
    assert other_seed != first


def test_seeded_sampling_is_the_same_in_another_process() -> None:
    code = (
        "import mlx.core as mx\n"
        "from mlx_relay.model.sampling import SamplingParams, greedy_rows, sample\n"
        "p = SamplingParams(temperature=1.0, seed=99)\n"
        "print([sample(mx.zeros(64), p, s).token_id for s in range(10)])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    here = [
        sample(mx.zeros(64), SamplingParams(temperature=1.0, seed=99), s).token_id
        for s in range(10)
    ]
    assert out.stdout.strip() == str(here)


def test_sampling_follows_the_distribution() -> None:
    logits = _logits([math.log(0.7), math.log(0.2), math.log(0.1)])
    params = SamplingParams(temperature=1.0, seed=7)
    counts = Counter(sample(logits, params, step).token_id for step in range(600))
    assert counts[0] / 600 == pytest.approx(0.7, abs=0.07)
    assert counts[1] / 600 == pytest.approx(0.2, abs=0.06)
    assert counts[2] / 600 == pytest.approx(0.1, abs=0.05)


def test_top_k_one_is_greedy() -> None:
    params = SamplingParams(temperature=5.0, top_k=1, seed=0)
    assert {sample(_logits(), params, step).token_id for step in range(30)} == {1}


def test_top_k_keeps_only_the_k_most_likely() -> None:
    params = SamplingParams(temperature=50.0, top_k=3, seed=0)
    drawn = {sample(_logits(), params, step).token_id for step in range(200)}
    assert drawn == {1, 5, 2}


def test_tiny_top_p_is_greedy() -> None:
    params = SamplingParams(temperature=5.0, top_p=1e-6, seed=0)
    assert {sample(_logits(), params, step).token_id for step in range(30)} == {1}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two (0.5 < 0.75 <= 0.8).
    logits = _logits([math.log(p) for p in (0.15, 0.5, 0.05, 0.3)])
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=0)
    drawn = Counter(sample(logits, params, step).token_id for step in range(300))
    assert set(drawn) == {1, 3}
    assert drawn[1] / 300 == pytest.approx(0.5 / 0.8, abs=0.1)


def test_unseeded_sampling_draws_fresh_randomness() -> None:
    params = SamplingParams(temperature=1.0)
    flat = _logits([0.0] * 1000)
    assert len({sample(flat, params, step=0).token_id for _ in range(20)}) > 1


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_logprobs": -2}, "top_logprobs"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, float], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param


@pytest.mark.parametrize("shape", [(6, 384), (16, 49153)])
def test_greedy_rows_pick_what_sample_picks_row_by_row(shape: tuple[int, int]) -> None:
    """The same token and the same logprob bits, a row in a batch or alone."""
    mx.random.seed(3)
    logits = mx.random.normal(shape) * 4
    rows = greedy_rows(logits)
    assert rows == [sample(logits[i], SamplingParams(), step=i) for i in range(shape[0])]
    exact = np.asarray(logits).astype(np.float64)  # the log-softmax in double precision
    exact -= np.log(np.exp(exact).sum(axis=-1, keepdims=True))
    for i, row in enumerate(rows):
        assert row.token_id == int(exact[i].argmax())
        assert row.logprob == pytest.approx(exact[i, row.token_id], abs=2e-6)


def test_greedy_rows_break_ties_as_sample_does() -> None:
    """A maximum that occurs twice: the first occurrence, in a batch as alone. The pick is
    over log-probabilities: maxima 1e-7 above the rest round to the rest's value there."""
    logits = mx.zeros((3, 1000))
    logits[0, 7] = logits[0, 500] = 3.0
    logits[1, 999] = logits[1, 0] = 2.5
    logits[2, 3] = logits[2, 4] = 1e-7
    rows = greedy_rows(logits)
    assert [r.token_id for r in rows] == [7, 0, 0]
    assert rows == [sample(logits[i], SamplingParams(), step=i) for i in range(3)]
