"""Two in-process workers and a coordinator that can be stopped and started again on the
same history store, as ``mlx-relay coordinator`` would be.

async with history_workers(model_dir, tmp_path / "history.sqlite") as config:
    async with coordinator(config) as runtime:
        await send_completions(runtime.url, 3)
    async with coordinator(config) as runtime:  # restarted: the history is still there
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.history_config import HistoryConfig
from mlx_relay.server.runtime import CoordinatorRuntime
from tests.support.cluster import local_cluster
from tests.support.dashboard_cluster import FAST_MONITORING, PROMPT_MARKER


@contextlib.asynccontextmanager
async def history_workers(
    model_dir: Path, store_path: Path, *, flush_interval: float = 0.25
) -> AsyncIterator[ClusterConfig]:
    """Workers with monitoring on; yields the coordinator's configuration (HTTP port 0,
    history at ``store_path``)."""
    async with local_cluster(
        model_dir, 2, enable_monitoring=True, monitoring=FAST_MONITORING, initialize=False
    ) as cluster:
        history = HistoryConfig(path=str(store_path), flush_interval=flush_interval)
        yield cluster.config.model_copy(update={"history": history})


@contextlib.asynccontextmanager
async def coordinator(config: ClusterConfig) -> AsyncIterator[CoordinatorRuntime]:
    """A coordinator (pipeline, monitoring, history, HTTP app) until the block ends."""
    runtime = CoordinatorRuntime(config, "127.0.0.1", 0)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


def with_token(config: ClusterConfig, token: str) -> ClusterConfig:
    """The configuration with the app's bearer token set."""
    return config.model_copy(update={"http": config.http.model_copy(update={"auth_token": token})})


async def send_completions(
    url: str, count: int, max_tokens: int = 6, token: str | None = None
) -> list[str]:
    """``count`` greedy completions through the OpenAI API; returns their request ids."""
    return list(await send_completions_with_usage(url, count, max_tokens, token))


async def send_completions_with_usage(
    url: str, count: int, max_tokens: int = 6, token: str | None = None
) -> dict[str, dict[str, int]]:
    """``count`` greedy completions, in order; each request id with the usage its client got."""
    sent: dict[str, dict[str, int]] = {}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        for i in range(count):
            body: dict[str, Any] = {
                "model": model,
                "prompt": f"{PROMPT_MARKER} history {i}",
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            sent[response.headers["X-Request-Id"]] = response.json()["usage"]
    return sent
