"""The OpenAI-compatible inference API under ``/v1``.

``api`` holds the routes, ``models`` the request and response bodies, ``format`` turns the
orchestrator's results into those bodies, ``stream`` serves them as server-sent events, and
``errors`` answers every failure in OpenAI's error shape.
"""

from mlx_relay.server.openai.api import router
from mlx_relay.server.openai.errors import install_unmatched_errors

__all__ = ["install_unmatched_errors", "router"]
