"""The store's SQLite schema: series, blocks of packed samples, the request log and each
request's trace summary (its time attribution, as JSON).

One row of ``blocks`` holds up to a block's worth of samples (or rollup points) of one
series in one tier, packed by :mod:`mlx_relay.monitoring.history.codec`; the row overhead is
spread over hundreds of samples. ``partials`` holds each rollup's open bucket so far, one
row per series and tier, replaced at every commit until the bucket closes.
``auto_vacuum=INCREMENTAL`` lets eviction give pages back to the filesystem without
rewriting the whole file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mlx_relay.core.errors import RelayError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_SECONDS = 10.0

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    family TEXT NOT NULL,
    labels TEXT NOT NULL,
    kind TEXT NOT NULL,
    unit TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blocks (
    id INTEGER PRIMARY KEY,
    series INTEGER NOT NULL,
    tier INTEGER NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL,
    n INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS blocks_by_series ON blocks (series, tier, start);
CREATE INDEX IF NOT EXISTS blocks_by_end ON blocks (end);
CREATE TABLE IF NOT EXISTS partials (
    series INTEGER NOT NULL,
    tier INTEGER NOT NULL,
    start REAL NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    PRIMARY KEY (series, tier)
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    arrival REAL NOT NULL,
    status TEXT NOT NULL,
    finish_reason TEXT,
    error_type TEXT,
    queue_seconds REAL,
    ttft_seconds REAL,
    e2e_seconds REAL NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    generated_tokens INTEGER NOT NULL,
    stage_seconds TEXT NOT NULL,
    network_seconds REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_arrival ON requests (arrival);
CREATE INDEX IF NOT EXISTS requests_by_e2e ON requests (e2e_seconds);
CREATE TABLE IF NOT EXISTS trace_summaries (
    request_id TEXT PRIMARY KEY,
    arrival REAL NOT NULL,
    summary TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS trace_summaries_by_arrival ON trace_summaries (arrival);
"""


class StoreError(RelayError):
    """The history store cannot be opened or written (path, permissions, a newer schema)."""


def connect(path: Path, *, writer: bool) -> sqlite3.Connection:
    """A connection to the store; the writer's creates the schema."""
    connection = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False, isolation_level=None
    )
    if writer:
        # auto_vacuum must be chosen before the first table exists.
        connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(_TABLES)
        row = connection.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            connection.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )
        elif int(row[0]) > SCHEMA_VERSION:
            connection.close()
            raise StoreError(
                f"{path}: written by a newer mlx-relay (history schema {row[0]}, "
                f"this version reads {SCHEMA_VERSION})"
            )
    else:
        connection.execute("PRAGMA query_only=ON")
    return connection


def used_bytes(connection: sqlite3.Connection) -> int:
    """Bytes of the database's pages in use (what ``max_bytes`` caps)."""
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    free = connection.execute("PRAGMA freelist_count").fetchone()[0]
    size = connection.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)
