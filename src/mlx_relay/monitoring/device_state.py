"""How healthy a device in the cluster view is: one rule for the JSON API and Prometheus."""

from __future__ import annotations

from mlx_relay.monitoring.snapshot import DeviceStatus


def device_health_state(device: DeviceStatus, own_device_id: str) -> str:
    """``critical`` for a device that stopped answering, else its own verdict.

    The process reading its own status is up by definition; a device never polled has no
    verdict yet (``unknown``).
    """
    if device.device_id != own_device_id and device.up is False:
        return "critical"
    if device.health_status:
        return device.health_status
    return "healthy" if device.is_healthy else "unknown"
