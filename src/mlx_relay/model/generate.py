"""Single-process generation over the whole model: the reference the pipeline must match."""

from __future__ import annotations

from collections.abc import Iterator, Set

import mlx.core as mx
import mlx.nn as nn

from mlx_relay.core.errors import InvalidRequest
from mlx_relay.core.types import LayerRange
from mlx_relay.model.sampling import SampledToken, SamplingParams, sample
from mlx_relay.model.shard import Shard


def generate_tokens(
    model: nn.Module,
    prompt_ids: list[int],
    max_tokens: int,
    params: SamplingParams = SamplingParams(),
    eos_ids: Set[int] = frozenset(),
) -> Iterator[SampledToken]:
    """Generate tokens with the whole model in this process.

    The prompt is run as ``prompt_ids[:-1]`` in one prefill call, then the last prompt
    token as the first decode call, then one token per call: the same split mlx-lm and the
    distributed pipeline use, so all three give identical tokens.

    Args:
        model: A whole mlx-lm model (from ``load_model`` without ``layers``).
        prompt_ids: The prompt's token ids (at least one).
        max_tokens: The most tokens to generate.
        params: Sampling parameters; token ``i`` is sampled with ``step=i``.
        eos_ids: Token ids that end the generation (the eos token is yielded).

    Yields:
        Each generated token, as soon as it is sampled.

    Raises:
        InvalidRequest: ``prompt_ids`` is empty.
    """
    if not prompt_ids:
        raise InvalidRequest("the prompt has no tokens", param="prompt")
    shard = Shard(model, LayerRange(0, len(model.model.layers)))
    cache = shard.make_cache()
    if len(prompt_ids) > 1:
        shard(mx.array([prompt_ids[:-1]], dtype=mx.int32), cache)
        mx.eval([c.state for c in cache])
    token = prompt_ids[-1]
    for step in range(max_tokens):
        logits = shard(mx.array([[token]], dtype=mx.int32), cache)
        sampled = sample(logits[0, -1], params, step)
        yield sampled
        if sampled.token_id in eos_ids:
            return
        token = sampled.token_id
