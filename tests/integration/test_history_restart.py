"""History across a coordinator restart: a live two-worker cluster writes the store, the
coordinator stops and starts again on the same file, and what came before is still served."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import httpx
import pytest

from tests.support.dashboard_cluster import PROMPT_MARKER, wait_for
from tests.support.history_cluster import (
    coordinator,
    history_workers,
    send_completions_with_usage,
)

pytestmark = pytest.mark.asyncio

TOKENS = "chart.tokens_per_second"
CPU = 'mlxrelay_device_cpu_utilization_ratio{device="worker-0"}'
GENERATED = "mlxrelay_generation_tokens_total"


async def history(url: str, **params: object) -> dict:
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/api/history", params=params)  # type: ignore[arg-type]
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


async def test_history_and_request_log_survive_a_coordinator_restart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    store_path = tmp_path / "history.sqlite"
    async with history_workers(tiny_model_dir, store_path) as config:
        async with coordinator(config) as runtime:
            started = time.time()
            usage = await send_completions_with_usage(runtime.url, 3)
            sent = list(usage)
            async with httpx.AsyncClient(base_url=runtime.url) as http:

                async def stored() -> list[dict] | None:
                    catalogue = (await http.get("/api/history/series")).json()
                    keys = {s["key"] for s in catalogue["series"]}
                    return catalogue["series"] if {TOKENS, CPU} <= keys else None

                catalogue = await wait_for(stored, what="worker series in the history")
            await asyncio.sleep(1.0)  # a few more samples, then the coordinator stops
            stopped = time.time()
        families = {s["family"] for s in catalogue}
        # Every kind of thing kept: chart lines, devices, stages, links, inference counters.
        assert {
            "mlxrelay_stage_busy_seconds_total",
            "mlxrelay_network_requests_total",
            "mlxrelay_request_success_total",
            "mlxrelay_e2e_request_latency_seconds_count",
            "mlxrelay_history_store_bytes",
        } <= families
        units = {s["key"]: s["unit"] for s in catalogue}
        assert units[TOKENS] == "1/s"
        assert units[CPU] == "ratio"
        generated_key = next(s["key"] for s in catalogue if s["family"] == GENERATED)
        assert units[generated_key] == "1/s"  # a counter reads as a rate

        before_restart = {
            "series": [TOKENS, generated_key],
            "after": started - 1,
            "before": stopped + 0.5,
            "points": 20,
            "group": "max",
        }
        await asyncio.sleep(2.0)  # down for a while: a gap

        async with coordinator(config) as runtime:
            again = await history(runtime.url, **before_restart)
            tokens, generated = again["series"]
            assert again["tier"] == 0
            assert max(v for v in tokens["values"] if v is not None) > 0
            assert max(v for v in generated["values"] if v is not None) > 0

            await asyncio.sleep(1.0)
            whole = await history(
                runtime.url, series=TOKENS, after=started - 1, before=time.time(), points=40
            )
            values = whole["series"][0]["values"]
            times = whole["timestamps"]
            down = [
                v for t, v in zip(times, values, strict=True) if stopped + 0.6 < t < stopped + 1.8
            ]
            assert down and all(v is None for v in down)  # the restart is a gap, not a line
            assert values[-3:] != [None] * 3  # and the new process records again

            async with httpx.AsyncClient(base_url=runtime.url) as http:
                log = (await http.get("/api/requests", params={"order": "oldest"})).json()
                assert [r["request_id"] for r in log["requests"]] == sent
                # Each record holds the token counts its client was told.
                assert [(r["prompt_tokens"], r["generated_tokens"]) for r in log["requests"]] == [
                    (u["prompt_tokens"], u["completion_tokens"]) for u in usage.values()
                ]
                assert sum(u["completion_tokens"] for u in usage.values()) > 0
                first = log["requests"][0]
                assert first["status"] == "ok" and first["finish_reason"] in ("stop", "length")
                assert first["ttft_seconds"] <= first["e2e_seconds"]
                assert set(first["stage_seconds"]) == {"worker-0", "worker-1"}
                assert PROMPT_MARKER not in (await http.get("/api/requests")).text
                metrics = (await http.get("/metrics")).text
                assert "mlxrelay_history_store_bytes " in metrics
                assert "mlxrelay_history_write_lag_seconds " in metrics
    assert not math.isnan(stopped)


async def test_bad_history_parameters_answer_400_naming_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with (
        history_workers(tiny_model_dir, tmp_path / "h.sqlite") as config,
        coordinator(config) as runtime,
        httpx.AsyncClient(base_url=runtime.url) as http,
    ):
        cases = [
            ("/api/history", {"series": TOKENS, "after": "yesterday"}, "after"),
            ("/api/history", {"series": TOKENS, "after": -10, "before": -20}, "after"),
            ("/api/history", {"series": TOKENS, "points": 20000}, "points"),
            ("/api/history", {"series": TOKENS, "group": "median"}, "group"),
            ("/api/history", {"series": "no_such_series"}, "series"),
            ("/api/history", {"series": ""}, "series"),
            ("/api/requests", {"status": "weird"}, "status"),
            ("/api/requests", {"order": "random"}, "order"),
            ("/api/requests", {"limit": 0}, "limit"),
        ]
        for path, params, param in cases:
            response = await http.get(path, params=params)
            assert response.status_code == 400, (path, params, response.text)
            assert response.json()["detail"]["param"] == param, (path, params)
