"""HistoryStore: the embedded time-series store on SQLite, with one writer thread.

Recording never blocks: :meth:`HistoryStore.record` and :meth:`HistoryStore.record_request`
put one item on a bounded queue (a full queue drops the item and counts it). The writer
thread alone writes: it packs samples into blocks, rolls them up into the coarser tiers and
commits every ``flush_interval`` seconds in one transaction, then evicts what is past its
tier's retention and, over ``max_bytes``, the oldest rows first, handing freed pages back
with an incremental vacuum. Readers open their own connections (WAL lets them read while
the writer writes); what they see is at most ``flush_interval`` behind.

Example::

    store = HistoryStore(path, build_tiers(1.0, [(60, 30 * 86400)], 86400))
    store.start()
    store.record(time.time(), [(spec, 0.5)])
    store.close()  # writes everything recorded
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_relay.monitoring.history import reader
from mlx_relay.monitoring.history.query import Plan, regroup
from mlx_relay.monitoring.history.schema import StoreError, connect, used_bytes
from mlx_relay.monitoring.history.series import SeriesSpec
from mlx_relay.monitoring.history.tiers import Tier
from mlx_relay.monitoring.history.writer import BlockWriter
from mlx_relay.monitoring.inference import RequestRecord

logger = logging.getLogger(__name__)

EVICT_TO_RATIO = 0.9  # over the cap, evict down to this share of it
_EVICT_BLOCKS = 64
_EVICT_REQUESTS = 512
_STOP = "stop"
_FLUSH = "flush"
_SAMPLES = "samples"
_REQUEST = "request"
_TRACE = "trace"


@dataclass(frozen=True)
class StoreStats:
    """The store's own numbers (exported as ``mlxrelay_history_*``)."""

    bytes: int
    block_rows: int
    request_rows: int
    series: int
    samples_written: int
    dropped: int
    write_lag_seconds: float | None
    queued: int
    failed_commits: int = 0


class HistoryStore:
    """An SQLite file of tiered series and a request log.

    Args:
        path: The database file (its directory is created).
        tiers: Tier 0 (raw, at the collection interval) first.
        max_bytes: Cap on the database's pages in use; the oldest rows go first.
        flush_interval: Seconds between the writer's commits.
        requests_retention: Seconds the request log keeps a request.
        block_samples: Samples (or points) packed into one row.
        queue_size: Items the writer may lag behind before new ones are dropped.
        wall_clock: Unix time, for retention.
    """

    def __init__(
        self,
        path: str | Path,
        tiers: Sequence[Tier],
        *,
        max_bytes: int = 1 << 30,
        flush_interval: float = 10.0,
        requests_retention: float = 30 * 86400.0,
        block_samples: int = 240,
        queue_size: int = 4096,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not tiers or not tiers[0].raw:
            raise ValueError("the first tier must be the raw one")
        self.path = Path(path)
        self.tiers = list(tiers)
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self.requests_retention = requests_retention
        self.block_samples = block_samples
        self.max_gap = 3.0 * tiers[0].interval
        self._wall_clock = wall_clock
        self._queue: queue.Queue[tuple[str, float, Any]] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._stats = StoreStats(0, 0, 0, 0, 0, 0, None, 0)
        self._dropped = 0
        self.failed_commits = 0
        self._failure: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open (or create) the file and start the writer thread.

        Raises:
            StoreError: the file cannot be created or opened, or is from a newer version.
        """
        if self._thread is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = connect(self.path, writer=True)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the history store: {exc}") from None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(connection, ready), name="history-writer", daemon=True
        )
        self._thread.start()
        ready.wait()
        logger.info("history store %s open (%d tiers)", self.path, len(self.tiers))

    def close(self, timeout: float = 30.0) -> None:
        """Write everything recorded so far, stop the writer and close every connection."""
        thread, self._thread = self._thread, None
        if thread is not None:
            if thread.is_alive():
                with contextlib.suppress(queue.Full):
                    self._queue.put((_STOP, time.monotonic(), None), timeout=timeout)
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("history writer still busy after %.0f s", timeout)
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for connection in readers:
            connection.close()

    # -- recording (any thread, never blocks) ------------------------------------------------

    def record(self, timestamp: float, samples: Sequence[tuple[SeriesSpec, float]]) -> None:
        """One sample of each series at ``timestamp`` (unix seconds)."""
        if samples:
            self._put((_SAMPLES, time.monotonic(), (timestamp, samples)), len(samples))

    def record_request(self, record: RequestRecord) -> None:
        """One finished request for the request log (usable as a collector's request log)."""
        self._put((_REQUEST, time.monotonic(), record), 1)

    def record_trace(self, request_id: str, arrival: float, summary: dict[str, Any]) -> None:
        """A finished request's trace summary (its attribution; a trace store's archive),
        kept as long as the request log keeps requests."""
        self._put((_TRACE, time.monotonic(), (request_id, arrival, json.dumps(summary))), 1)

    def _put(self, item: tuple[str, float, Any], count: int) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._dropped += count
            if self._dropped == count or self._dropped % 10_000 < count:
                logger.warning("history writer behind: %d samples dropped so far", self._dropped)

    def flush(self, timeout: float = 30.0) -> bool:
        """Block until everything recorded before this call is committed; False on timeout."""
        if self._thread is None or not self._thread.is_alive():
            return False
        done = threading.Event()
        try:
            self._queue.put((_FLUSH, time.monotonic(), done), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    # -- writer thread -----------------------------------------------------------------------

    def _new_writer(self, connection: sqlite3.Connection) -> BlockWriter:
        return BlockWriter(
            connection, self.tiers, block_samples=self.block_samples, max_gap=self.max_gap
        )

    def _run(self, connection: sqlite3.Connection, ready: threading.Event) -> None:
        writer = self._new_writer(connection)
        requests: list[RequestRecord] = []
        traces: list[tuple[str, float, str]] = []
        oldest: float | None = None
        next_commit = time.monotonic() + self.flush_interval
        self._refresh_stats(connection, writer, None)
        ready.set()
        try:
            while True:
                try:
                    kind, enqueued, payload = self._queue.get(
                        timeout=max(0.0, next_commit - time.monotonic())
                    )
                except queue.Empty:
                    kind, enqueued, payload = "", 0.0, None
                if kind == _SAMPLES:
                    writer.add(*payload)
                elif kind == _REQUEST:
                    requests.append(payload)
                elif kind == _TRACE:
                    traces.append(payload)
                if kind in (_SAMPLES, _REQUEST, _TRACE) and oldest is None:
                    oldest = enqueued
                if kind == _STOP:
                    writer.close_rollups()
                if kind in (_STOP, _FLUSH) or time.monotonic() >= next_commit:
                    try:
                        self._commit(connection, writer, (requests, traces), oldest)
                    except sqlite3.Error as exc:
                        # Disk full, file removed, I/O error: this batch is lost, the store
                        # goes on with what it has written (a gap in the history).
                        self.failed_commits += 1
                        logger.warning("history write failed (%s): %s", self.path, exc)
                        writer = self._new_writer(connection)
                    requests, traces, oldest = [], [], None
                    next_commit = time.monotonic() + self.flush_interval
                if kind == _FLUSH:
                    payload.set()
                if kind == _STOP:
                    break
        except Exception as exc:
            self._failure = exc
            logger.exception("history writer stopped: %s", self.path)
        finally:
            connection.close()

    def _commit(
        self,
        connection: sqlite3.Connection,
        writer: BlockWriter,
        rows: tuple[list[RequestRecord], list[tuple[str, float, str]]],
        oldest: float | None,
    ) -> None:
        requests, traces = rows
        connection.execute("BEGIN IMMEDIATE")
        try:
            writer.write()
            connection.executemany(
                "INSERT INTO requests (request_id, arrival, status, finish_reason, error_type,"
                " queue_seconds, ttft_seconds, e2e_seconds, prompt_tokens, generated_tokens,"
                " stage_seconds, network_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_request_row(r) for r in requests],
            )
            connection.executemany(
                "INSERT OR REPLACE INTO trace_summaries (request_id, arrival, summary)"
                " VALUES (?, ?, ?)",
                traces,
            )
            self._evict_by_age(connection)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        lag = None if oldest is None else time.monotonic() - oldest
        if used_bytes(connection) > self.max_bytes:
            self._evict_by_size(connection)
        self._refresh_stats(connection, writer, lag)

    def _evict_by_age(self, connection: sqlite3.Connection) -> None:
        now = self._wall_clock()
        for tier in self.tiers:
            cutoff = (now - tier.retention, tier.index)
            connection.execute("DELETE FROM blocks WHERE end < ? AND tier = ?", cutoff)
            connection.execute("DELETE FROM partials WHERE start < ? AND tier = ?", cutoff)
        for table in ("requests", "trace_summaries"):
            connection.execute(
                f"DELETE FROM {table} WHERE arrival < ?", (now - self.requests_retention,)
            )

    def _evict_by_size(self, connection: sqlite3.Connection) -> None:
        """Delete the oldest rows (samples or requests, whichever is older) under the cap."""
        target = int(self.max_bytes * EVICT_TO_RATIO)
        connection.execute("BEGIN IMMEDIATE")
        try:
            while used_bytes(connection) > target:
                block = connection.execute("SELECT MIN(end) FROM blocks").fetchone()[0]
                request = connection.execute("SELECT MIN(arrival) FROM requests").fetchone()[0]
                if block is None and request is None:
                    break
                if request is None or (block is not None and block <= request):
                    connection.execute(
                        "DELETE FROM blocks WHERE id IN"
                        " (SELECT id FROM blocks ORDER BY end LIMIT ?)",
                        (_EVICT_BLOCKS,),
                    )
                else:
                    connection.execute(
                        "DELETE FROM requests WHERE id IN"
                        " (SELECT id FROM requests ORDER BY arrival LIMIT ?)",
                        (_EVICT_REQUESTS,),
                    )
                    # Trace summaries go with the requests they describe.
                    connection.execute(
                        "DELETE FROM trace_summaries WHERE arrival <"
                        " COALESCE((SELECT MIN(arrival) FROM requests), 1e300)"
                    )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("PRAGMA incremental_vacuum")

    def _refresh_stats(
        self, connection: sqlite3.Connection, writer: BlockWriter, lag: float | None
    ) -> None:
        blocks = connection.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
        requests = connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        self._stats = StoreStats(
            bytes=used_bytes(connection),
            block_rows=int(blocks),
            request_rows=int(requests),
            series=writer.series,
            samples_written=writer.samples_written,
            dropped=self._dropped,
            write_lag_seconds=lag if lag is not None else self._stats.write_lag_seconds,
            queued=self._queue.qsize(),
            failed_commits=self.failed_commits,
        )

    # -- reading (any thread, its own connection) --------------------------------------------

    def stats(self) -> StoreStats:
        """The numbers as of the writer's last commit (dropped items counted live)."""
        return dataclasses.replace(
            self._stats,
            dropped=self._dropped,
            queued=self._queue.qsize(),
            failed_commits=self.failed_commits,
        )

    @property
    def healthy(self) -> bool:
        """False once the writer thread has failed (it logs why)."""
        return self._failure is None

    def _reader(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = connect(self.path, writer=False)
            self._local.connection = connection
            with self._readers_lock:
                self._readers.append(connection)
        return connection

    def catalogue(self) -> list[SeriesSpec]:
        """Every stored series, by key."""
        return [s.spec for s in reader.catalogue(self._reader())]

    def query(
        self, keys: Sequence[str], plan: Plan, group: str
    ) -> list[tuple[SeriesSpec, list[float | None]]]:
        """Each series' values at ``plan``'s points (None where nothing was stored).

        Raises:
            QueryError: an unknown series or group.
        """
        connection = self._reader()
        out = []
        for series in reader.find_series(connection, keys):
            points = reader.read_points(
                connection, series, plan.tier, plan.after, plan.before, self.max_gap
            )
            out.append((series.spec, regroup(points, plan, group)))
        return out

    def requests(self, **filters: Any) -> tuple[list[dict[str, Any]], int]:
        """A page of the request log; see :func:`reader.query_requests` for the filters."""
        return reader.query_requests(self._reader(), **filters)

    def trace_summary(self, request_id: str) -> dict[str, Any] | None:
        """A request's trace summary, once committed (see :meth:`record_trace`)."""
        return reader.trace_summary(self._reader(), request_id)


def _request_row(record: RequestRecord) -> tuple[Any, ...]:
    return (
        record.request_id,
        record.arrival,
        record.status,
        record.finish_reason,
        record.error_type,
        record.queue_seconds,
        record.ttft_seconds,
        record.e2e_seconds,
        record.prompt_tokens,
        record.generated_tokens,
        json.dumps(record.stage_seconds),
        record.network_seconds,
    )
