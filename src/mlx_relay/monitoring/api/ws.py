"""``WebSocket /ws``: the full snapshot on connect, then an update every interval."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket, status

from mlx_relay.core.http_access import websocket_allowed
from mlx_relay.monitoring.api.deps import ContextDep

router = APIRouter(tags=["monitoring"])


@router.websocket("/ws")
async def live_updates(websocket: WebSocket, context: ContextDep) -> None:
    """Each message is a :class:`~mlx_relay.monitoring.api.views.LiveUpdate` as JSON.

    With a token configured, present it as ``Authorization: Bearer`` or ``?token=``; a
    refused handshake is closed with code 1008 (policy violation) before it is accepted.
    Past ``http.max_websocket_clients`` live clients, one more is accepted and closed at once
    with code 1013 (try again later).
    """
    if not websocket_allowed(websocket):
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION)
        return
    await websocket.accept()
    await context.broadcaster.serve(websocket)
