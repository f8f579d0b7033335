"""``GET /``: the dashboard page. Its script and styles are served from ``/static``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from mlx_relay import __version__
from mlx_relay.monitoring.api.deps import PLACEMENT_ATTRIBUTE, ContextDep
from mlx_relay.monitoring.api.history import STATE_ATTRIBUTE as HISTORY_ATTRIBUTE
from mlx_relay.monitoring.api.traces import STATE_ATTRIBUTE as TRACES_ATTRIBUTE

PACKAGE_DIR = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
STATIC_PATH = "/static"

# The token may travel in the page's query string: never leak it through a Referer.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    ),
}

router = APIRouter(tags=["dashboard"])
templates = Jinja2Templates(directory=TEMPLATES_DIR)


def static_files() -> StaticFiles:
    """The page's scripts and styles (no data in them, so they need no token)."""
    return StaticFiles(directory=STATIC_DIR)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard_page(request: Request, context: ContextDep) -> HTMLResponse:
    response = templates.TemplateResponse(
        request,
        "index.html",
        {
            "device_id": context.collector.device_id,
            "version": __version__,
            "static": STATIC_PATH,
            "update_interval": context.broadcaster.interval,
            "history": hasattr(request.app.state, HISTORY_ATTRIBUTE),
            "placement": hasattr(request.app.state, PLACEMENT_ATTRIBUTE),
            "traces": hasattr(request.app.state, TRACES_ATTRIBUTE),
        },
        headers=PAGE_HEADERS,
    )
    return response
