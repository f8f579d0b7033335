"""The single-process reference generator gives mlx-lm's own tokens and stops where asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from mlx_relay.core.errors import InvalidRequest
from mlx_relay.model.generate import generate_tokens
from mlx_relay.model.load import load_model
from mlx_relay.model.sampling import SamplingParams, sample

PROMPT = [5, 17, 42, 3, 99, 7, 250, 11]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return load_model(tiny_model_dir)


def _mlx_lm_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=make_sampler(temp=0.0))
    return [int(token) for token, _ in steps]


@pytest.mark.parametrize("prompt", [PROMPT, PROMPT[:1]], ids=["prompt", "one-token"])
def test_greedy_tokens_equal_mlx_lm(model: Any, prompt: list[int]) -> None:
    ours = [t.token_id for t in generate_tokens(model, prompt, 10)]
    assert ours == _mlx_lm_greedy(model, prompt, 10)
    assert len(ours) == 10


def test_logprobs_are_those_of_the_full_forward(model: Any) -> None:
    first = next(generate_tokens(model, PROMPT, 1, SamplingParams(top_logprobs=2)))
    logits = model(mx.array([PROMPT]))[0, -1]
    expected = sample(logits, SamplingParams(top_logprobs=2), step=0)
    assert first.token_id == expected.token_id
    assert first.logprob == pytest.approx(expected.logprob, abs=1e-5)
    assert [t for t, _ in first.top_logprobs] == [t for t, _ in expected.top_logprobs]


def test_stops_after_an_eos_token_and_yields_it(model: Any) -> None:
    greedy = [t.token_id for t in generate_tokens(model, PROMPT, 10)]
    stop = greedy[3]
    cut = greedy.index(stop)
    got = [t.token_id for t in generate_tokens(model, PROMPT, 10, eos_ids={stop})]
    assert got == greedy[: cut + 1]


def test_seeded_generation_is_reproducible(model: Any) -> None:
    params = SamplingParams(temperature=1.0, seed=5)
    first = [t.token_id for t in generate_tokens(model, PROMPT, 8, params)]
    assert first == [t.token_id for t in generate_tokens(model, PROMPT, 8, params)]


def test_limits(model: Any) -> None:
    assert list(generate_tokens(model, PROMPT, 0)) == []
    with pytest.raises(InvalidRequest, match="no tokens"):
        next(generate_tokens(model, [], 4))
