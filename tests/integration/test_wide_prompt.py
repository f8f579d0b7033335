"""A 4,000-token prompt on a model wide enough that its prefill's hidden states, sent as one
message, would exceed the default ``network.max_message_mb``: on the default limits it
completes on 2 stages in chunks, every message measured under the limit, every call inside
its deadline, with the tokens one process gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_relay.coordinator.orchestrator import InferenceRequest
from mlx_relay.core.config import InferenceConfig, NetworkConfig
from tests.support.cluster import local_cluster
from tests.support.reference import reference_tokens
from tests.support.tiny_model import make_tiny_model_dir

PROMPT_TOKENS = 4000
# Wide residual stream, narrow everything else: 2 heads of 32, a 64-wide MLP, 1 layer per
# stage. The hidden states are what travels between stages, so only their width matters.
HIDDEN = 4608
WIDE = {
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "intermediate_size": 64,
    "max_position_embeddings": 8192,
}
FLOAT32_BYTES = 4


class CallLog:
    """Every RPC a collector records, as the client interceptor passes it (peer, method,
    seconds, code, sent bytes, received bytes), passed on to the collector unchanged."""

    def __init__(self, collector: Any) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self._record = collector.record_rpc
        collector.record_rpc = self.record

    def record(self, *call: Any) -> None:
        self.calls.append(call)
        self._record(*call)


async def test_a_4000_token_prompt_on_a_wide_model_completes_on_the_default_limits(
    tmp_path: Path,
) -> None:
    model_dir = make_tiny_model_dir(
        tmp_path / "wide", num_layers=2, hidden_size=HIDDEN, config_overrides=WIDE
    )
    prompt = [(7 * i) % 300 + 10 for i in range(PROMPT_TOKENS)]
    defaults = NetworkConfig()
    limit = defaults.max_message_mb * 1024 * 1024
    # The whole prefill's hidden states in one message would not fit.
    assert limit < (PROMPT_TOKENS - 1) * HIDDEN * FLOAT32_BYTES
    network = {"request_timeout": defaults.request_timeout}

    async with local_cluster(model_dir, 2, enable_monitoring=True, network=network) as cluster:
        assert cluster.config.network.max_message_mb == defaults.max_message_mb
        assert cluster.config.network.request_timeout == defaults.request_timeout
        assert cluster.config.inference.prefill_chunk_tokens == (
            InferenceConfig().prefill_chunk_tokens
        )
        first, _second = cluster.workers
        hops = CallLog(first.collector)
        coordinator = CallLog(cluster.orchestrator.metrics_collector)
        response = await cluster.orchestrator.process_request(
            InferenceRequest(prompt_tokens=prompt, max_tokens=4)
        )
        sessions = sum(w.kv_sessions for w in cluster.workers)
        chunk = cluster.config.inference.prefill_chunk_tokens

    assert sessions == 0
    assert response.usage.prompt_tokens == PROMPT_TOKENS
    assert response.token_ids == [t.token_id for t in reference_tokens(model_dir, prompt, 4)]

    # The coordinator sent token ids only, and each step came back inside its deadline.
    steps = [c for c in coordinator.calls if c[:2] == ("worker-0", "Forward")]
    assert steps and all(c[3] == "OK" and c[2] < defaults.request_timeout for c in steps)
    assert max(c[4] for c in steps) < HIDDEN * FLOAT32_BYTES  # not one position's hidden state

    # The stage-to-stage hop carried the hidden states: several prefill chunks of more than
    # a megabyte each, every one under the limit, every call OK inside its deadline.
    forwards = [c for c in hops.calls if c[:2] == ("worker-1", "Forward")]
    assert len(forwards) >= (PROMPT_TOKENS - 1) // chunk
    sent = [c[4] for c in forwards]
    assert max(sent) >= chunk * HIDDEN * FLOAT32_BYTES
    assert sum(sent) > limit
    assert all(size < limit for size in sent), max(sent)
    assert all(c[5] < limit for c in forwards)
    assert all(c[3] == "OK" for c in forwards), [c[3] for c in forwards]
    assert all(c[2] < defaults.request_timeout for c in forwards)
