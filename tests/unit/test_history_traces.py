"""Trace summaries in the history store: kept across a restart, evicted with the requests."""

from __future__ import annotations

from pathlib import Path

from mlx_relay.monitoring.history import HistoryStore, build_tiers

DAY = 86400.0
NOW = 1_800_000_000.0
TIERS = build_tiers(1.0, [(60.0, 30 * DAY)], DAY)


def summary(request_id: str) -> dict[str, object]:
    return {"request_id": request_id, "attribution": {"e2e_s": 1.5, "compute_s": {"w0": 1.0}}}


def test_summaries_survive_a_restart_and_leave_with_the_request_retention(tmp_path: Path) -> None:
    now = [NOW]
    path = tmp_path / "history.sqlite"
    store = HistoryStore(path, TIERS, wall_clock=lambda: now[0], requests_retention=DAY)
    store.start()
    store.record_trace("old", NOW - 2 * DAY, summary("old"))
    store.record_trace("new", NOW - 10.0, summary("new"))
    store.record_trace("new", NOW - 5.0, {**summary("new"), "duration_s": 2.0})  # replaced
    assert store.flush()
    assert store.trace_summary("old") is None  # past requests_retention at the commit
    store.close()
    reopened = HistoryStore(path, TIERS, wall_clock=lambda: now[0], requests_retention=DAY)
    reopened.start()
    try:
        kept = reopened.trace_summary("new")
        assert kept is not None and kept["duration_s"] == 2.0
        assert kept["attribution"] == {"e2e_s": 1.5, "compute_s": {"w0": 1.0}}
        assert reopened.trace_summary("missing") is None
    finally:
        reopened.close()
