"""``GET /api/requests/{id}/trace`` (JSON and Chrome trace-event download) and
``GET /api/profile`` on a real coordinator app (HTTP on port 0, real gRPC workers), with the
history store keeping the summaries of traces older than the last ``tracing.max_traces``."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_relay.core.tracing_config import TracingConfig
from tests.support.history_cluster import coordinator, history_workers, send_completions_with_usage

HEX16 = re.compile(r"^[0-9a-f]{16}$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def parts_sum(attribution: dict[str, Any]) -> float:
    return float(
        attribution["queue_s"]
        + attribution["coordinator_s"]
        + sum(attribution["compute_s"].values())
        + sum(attribution["network_s"].values())
        + attribution["bubble_s"]
    )


async def test_trace_chrome_and_profile_endpoints(tiny_model_dir: Path, tmp_path: Path) -> None:
    async with history_workers(tiny_model_dir, tmp_path / "history.sqlite") as config:
        config = config.model_copy(update={"tracing": TracingConfig(max_traces=2)})
        async with coordinator(config) as runtime:
            usage = await send_completions_with_usage(runtime.url, 3, max_tokens=4)
            first, second, third = usage
            services = runtime.services
            assert services is not None and services.history is not None
            assert await asyncio.to_thread(services.history.store.flush)
            async with httpx.AsyncClient(base_url=runtime.url, timeout=30) as http:
                trace = await http.get(f"/api/requests/{third}/trace")
                chrome = await http.get(f"/api/requests/{third}/trace", params={"format": "chrome"})
                archived = await http.get(f"/api/requests/{first}/trace")
                unknown = await http.get("/api/requests/no-such-request/trace")
                bad_format = await http.get(f"/api/requests/{third}/trace?format=xml")
                profile = await http.get("/api/profile", params={"window": "600"})
                default_profile = await http.get("/api/profile")
                bad_windows = [
                    await http.get("/api/profile", params={"window": w})
                    for w in ("soon", "0", "-5", "inf")
                ]

    assert trace.status_code == 200, trace.text
    document = trace.json()
    assert document["request_id"] == third
    assert HEX32.match(document["trace_id"])
    assert document["spans_kept"] is True
    assert document["output_tokens"] == usage[third]["completion_tokens"]
    assert document["prompt_tokens"] == usage[third]["prompt_tokens"]
    assert document["start_unix"] > 1.6e9 and document["duration_s"] > 0
    spans = document["spans"]
    assert all(HEX16.match(s["span_id"]) for s in spans)
    roots = [s for s in spans if s["parent_id"] is None]
    assert len(roots) == 1 and roots[0]["attributes"]["gen_ai.request.model"] == document["model"]
    ids = {s["span_id"] for s in spans}
    assert all(s["parent_id"] in ids for s in spans if s["parent_id"] is not None)
    assert all(s["start_s"] >= 0 and s["duration_s"] >= 0 for s in spans)
    assert {s["lane"] for s in spans} == set(document["lanes"])
    assert document["lanes"][0] == "coordinator"
    assert "stage 1 · worker-1" in document["lanes"]
    attribution = document["attribution"]
    assert abs(parts_sum(attribution) - attribution["e2e_s"]) <= 0.02 * attribution["e2e_s"]

    assert chrome.status_code == 200
    assert chrome.headers["content-disposition"] == f'attachment; filename="trace-{third}.json"'
    events = chrome.json()["traceEvents"]
    threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert list(threads.values()) == document["lanes"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == len(spans)
    root_event = next(e for e in complete if e["args"]["span_id"] == roots[0]["span_id"])
    assert root_event["dur"] == pytest.approx(document["duration_s"] * 1e6)

    # Older than the last 2 in memory: the history store's summary, without spans.
    assert archived.status_code == 200, archived.text
    summary = archived.json()
    assert summary["request_id"] == first and summary["spans_kept"] is False
    assert summary["spans"] == [] and summary["lanes"] == document["lanes"]
    assert summary["output_tokens"] == usage[first]["completion_tokens"]
    assert (
        abs(parts_sum(summary["attribution"]) - summary["duration_s"])
        <= 0.02 * summary["duration_s"]
    )

    assert unknown.status_code == 404
    detail = unknown.json()["detail"]
    assert detail["request_id"] == "no-such-request" and "no-such-request" in detail["message"]
    assert bad_format.status_code == 400 and bad_format.json()["detail"]["param"] == "format"

    assert profile.status_code == 200, profile.text
    body = profile.json()
    assert body["window_s"] == 600 and body["requests"] == 2  # the traces kept in memory
    tokens = usage[second]["completion_tokens"] + usage[third]["completion_tokens"]
    assert body["output_tokens"] == tokens
    totals = body["totals"]
    assert abs(parts_sum(totals) - totals["e2e_s"]) <= 0.02 * totals["e2e_s"]
    assert body["per_output_token"]["e2e_s"] == pytest.approx(totals["e2e_s"] / tokens)
    assert body["per_request"]["e2e_s"] == pytest.approx(totals["e2e_s"] / 2)
    assert set(body["shares"]["compute"]) == {"worker-0", "worker-1"}
    assert default_profile.status_code == 200 and default_profile.json()["window_s"] == 300
    for response in bad_windows:
        assert response.status_code == 400, response.text
        assert response.json()["detail"]["param"] == "window"
