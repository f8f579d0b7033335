"""The monitoring HTTP API: one router per resource, composed by :func:`mount_monitoring`."""

from mlx_relay.monitoring.api.context import MonitoringContext
from mlx_relay.monitoring.api.mount import mount_monitoring

__all__ = ["MonitoringContext", "mount_monitoring"]
