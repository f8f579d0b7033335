"""A trace document as Chrome trace-event JSON (opens in Perfetto and chrome://tracing).

One process per request, one thread per lane (in pipeline order), one complete event
(``"ph": "X"``) per span, times in microseconds from the request's arrival.
"""

from __future__ import annotations

from typing import Any

PROCESS_ID = 1


def chrome_trace(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (:func:`~.spans.trace_document`) in the trace-event format."""
    lanes: list[str] = list(document["lanes"])
    for span in document["spans"]:
        if span["lane"] not in lanes:
            lanes.append(span["lane"])
    thread = {lane: index + 1 for index, lane in enumerate(lanes)}
    events: list[dict[str, Any]] = [
        {
            "name": "process_name",
            "ph": "M",
            "pid": PROCESS_ID,
            "tid": 0,
            "args": {"name": f"request {document['request_id']}"},
        }
    ]
    for lane, tid in thread.items():
        events.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": PROCESS_ID,
                "tid": tid,
                "args": {"name": lane},
            }
        )
        events.append(
            {
                "name": "thread_sort_index",
                "ph": "M",
                "pid": PROCESS_ID,
                "tid": tid,
                "args": {"sort_index": tid},
            }
        )
    for span in document["spans"]:
        events.append(
            {
                "name": span["name"],
                "cat": span["lane"],
                "ph": "X",
                "ts": span["start_s"] * 1e6,
                "dur": span["duration_s"] * 1e6,
                "pid": PROCESS_ID,
                "tid": thread[span["lane"]],
                "args": {
                    "span_id": span["span_id"],
                    "parent_id": span["parent_id"],
                    **span["attributes"],
                },
            }
        )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "request_id": document["request_id"],
            "trace_id": document["trace_id"],
            "start_unix": document["start_unix"],
            "model": document["model"],
        },
    }
