"""A smaller version of bench/load.py: 200 requests of the mix (valid streamed and unstreamed
chat and text completions, invalid and oversized ones, clients that disconnect mid-stream) at
concurrency 16 on a 2-worker tiny-model cluster, every part its own process."""

from __future__ import annotations

from pathlib import Path

from tests.support.load import load_cluster, run_load

REQUESTS = 200
CONCURRENCY = 16
# The coordinator's memory growth over the run that would mean a leak (bench/load.py's
# 1,000 requests stay well under it).
RSS_GROWTH_LIMIT_MB = 50


async def test_a_mixed_load_leaves_nothing_behind(tiny_model_dir: Path, tmp_path: Path) -> None:
    async with load_cluster(tiny_model_dir, tmp_path) as cluster:
        report = await run_load(cluster, REQUESTS, CONCURRENCY)
        alive = cluster.coordinator.poll() is None
    summary = "\n".join(report.lines())
    assert alive, summary
    assert len(report.outcomes) == REQUESTS, summary
    assert report.server_errors == 0, summary
    assert not report.unexpected, [(o.kind, o.status, o.detail) for o in report.unexpected]
    assert report.valid and not report.incomplete, summary
    kinds = {o.kind for o in report.outcomes}
    assert kinds == {
        "chat",
        "chat_stream",
        "completion",
        "completion_stream",
        "invalid",
        "oversized",
        "disconnect",
    }, summary
    disconnects = sum(1 for o in report.outcomes if o.kind == "disconnect")
    assert report.aborted == disconnects, summary
    assert report.sessions_left == [0, 0], summary
    assert report.rss_growth_mb < RSS_GROWTH_LIMIT_MB, summary
