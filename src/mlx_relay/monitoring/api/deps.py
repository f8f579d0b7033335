"""Dependencies of the monitoring routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from mlx_relay.monitoring.api.context import MonitoringContext
from mlx_relay.monitoring.snapshot import Snapshot

STATE_ATTRIBUTE = "monitoring"
# Set by the coordinator's app when it serves GET /api/placement (the dashboard shows a panel).
PLACEMENT_ATTRIBUTE = "placement"


def get_context(connection: HTTPConnection) -> MonitoringContext:
    """The :class:`MonitoringContext` that :func:`mount_monitoring` stored on the app."""
    context: MonitoringContext = getattr(connection.app.state, STATE_ATTRIBUTE)
    return context


def get_snapshot(context: Annotated[MonitoringContext, Depends(get_context)]) -> Snapshot:
    return context.snapshot()


ContextDep = Annotated[MonitoringContext, Depends(get_context)]
SnapshotDep = Annotated[Snapshot, Depends(get_snapshot)]
