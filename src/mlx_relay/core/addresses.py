"""Network addresses as people and programs write them: ``host:port``, URLs, loopback."""

from __future__ import annotations

import ipaddress


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:8080``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def http_url(host: str, port: int) -> str:
    """The ``http://`` URL of a server bound to ``host:port``."""
    return f"http://{host_port(host, port)}"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may resolve to anything


def exposure_warning(host: str, guarded: bool, exposed: str, remedy: str) -> str | None:
    """The warning for a server bound to ``host``, or None when loopback or ``guarded``.

    The HTTP app and the workers' gRPC servers warn in these same words.

    Args:
        host: the bind address.
        guarded: a token (or other access control) is configured.
        exposed: what anyone who can reach the address can do.
        remedy: how to guard it.
    """
    if is_loopback(host) or guarded:
        return None
    return (
        f"binding {host} with no auth token: anyone who can reach this address can "
        f"{exposed}. {remedy}, or bind 127.0.0.1."
    )
