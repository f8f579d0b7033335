"""The monitoring system: collectors, health checks, dashboard and Prometheus export.

Depends only on :mod:`mlx_relay.core`; the pipeline calls into it through a narrow
recording API.
"""
