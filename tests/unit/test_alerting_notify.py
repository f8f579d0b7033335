"""Notification timing (group_wait, group_interval, repeat_interval, send_resolved) on a fake
clock, the v4 payload, the Alertmanager push rule and the bounded delivery queue."""

from __future__ import annotations

import asyncio

import httpx

from mlx_relay.core.alerting_config import ReceiverConfig
from mlx_relay.monitoring.alerting.alertmanager import alertmanager_batch
from mlx_relay.monitoring.alerting.delivery import DeliveryQueue
from mlx_relay.monitoring.alerting.state import Alert, AlertState
from mlx_relay.monitoring.alerting.webhook import WebhookGrouper, fingerprint


def alert(device: str, state: AlertState = AlertState.FIRING, active_at: float = 0.0) -> Alert:
    return Alert(
        rule="StageDown",
        labels={"alertname": "StageDown", "device": device, "severity": "critical"},
        annotations={"summary": f"Device {device} is down"},
        state=state,
        value=0.0,
        active_at=active_at,
    )


def receiver(**settings: object) -> ReceiverConfig:
    base: dict[str, object] = {
        "name": "ops",
        "url": "http://127.0.0.1:9/hook",
        "group_wait": 30,
        "group_interval": 300,
        "repeat_interval": 3600,
    }
    return ReceiverConfig.model_validate({**base, **settings})


def test_group_wait_then_group_interval_then_resolved() -> None:
    grouper = WebhookGrouper(receiver(), "http://relay:8080")
    w0 = alert("worker-0", active_at=100.0)
    grouper.observe([w0], 100.0)
    assert grouper.flush(129.0) == []  # inside group_wait
    (first,) = grouper.flush(130.0)
    assert first["version"] == "4" and first["status"] == "firing"
    assert first["receiver"] == "ops" and first["groupLabels"] == {"alertname": "StageDown"}
    assert first["groupKey"] == '{}:{alertname="StageDown"}'
    assert first["commonLabels"]["device"] == "worker-0"
    assert first["externalURL"] == "http://relay:8080"
    (entry,) = first["alerts"]
    assert entry["status"] == "firing" and entry["endsAt"] == "0001-01-01T00:00:00Z"
    assert entry["startsAt"] == "1970-01-01T00:01:40Z"
    assert entry["annotations"] == {"summary": "Device worker-0 is down"}
    assert entry["fingerprint"] == fingerprint(w0.labels) and len(entry["fingerprint"]) == 16
    # a second alert of the group waits for the next group_interval
    w1 = alert("worker-1", active_at=200.0)
    grouper.observe([w0, w1], 200.0)
    assert grouper.flush(200.0) == []
    (second,) = grouper.flush(430.0)
    assert [a["labels"]["device"] for a in second["alerts"]] == ["worker-0", "worker-1"]
    assert "device" not in second["commonLabels"]
    # nothing new: no notification until repeat_interval
    assert grouper.flush(730.0) == []
    # both resolve: one resolved notification, then the group is gone
    for a in (w0, w1):
        a.state, a.resolved_at = AlertState.INACTIVE, 800.0
    grouper.observe([w0, w1], 800.0)
    (resolved,) = grouper.flush(1030.0)
    assert resolved["status"] == "resolved"
    assert [a["endsAt"] for a in resolved["alerts"]] == ["1970-01-01T00:13:20Z"] * 2
    assert grouper.groups == {}


def test_repeat_interval_resends_a_still_firing_group() -> None:
    grouper = WebhookGrouper(receiver(group_wait=0, group_interval=10, repeat_interval=60))
    w0 = alert("worker-0")
    grouper.observe([w0], 0.0)
    assert len(grouper.flush(0.0)) == 1
    sent = [t for t in range(10, 130, 10) if grouper.flush(float(t))]
    assert sent == [60, 120]


def test_an_old_alert_skips_group_wait() -> None:
    grouper = WebhookGrouper(receiver(group_wait=30))
    grouper.observe([alert("worker-0", active_at=0.0)], 100.0)
    assert len(grouper.flush(100.0)) == 1


def test_send_resolved_false_sends_no_resolved_notification() -> None:
    grouper = WebhookGrouper(receiver(group_wait=0, group_interval=10, send_resolved=False))
    w0 = alert("worker-0")
    grouper.observe([w0], 0.0)
    assert len(grouper.flush(0.0)) == 1
    w0.state, w0.resolved_at = AlertState.INACTIVE, 5.0
    grouper.observe([w0], 5.0)
    assert grouper.flush(10.0) == []
    assert grouper.groups == {}


def test_a_resolved_alert_that_never_fired_here_is_not_notified() -> None:
    grouper = WebhookGrouper(receiver(group_wait=0))
    late = alert("worker-0", AlertState.INACTIVE)
    late.resolved_at = 3.0
    grouper.observe([late], 5.0)
    assert grouper.flush(5.0) == [] and grouper.groups == {}


def test_pending_alerts_are_never_notified() -> None:
    grouper = WebhookGrouper(receiver(group_wait=0))
    grouper.observe([alert("worker-0", AlertState.PENDING)], 0.0)
    assert grouper.flush(0.0) == []


def test_alertmanager_push_resends_and_reports_resolution() -> None:
    w0 = alert("worker-0", active_at=0.0)
    (first,) = alertmanager_batch([w0], 10.0, evaluation_interval=10)
    assert first["endsAt"] == "1970-01-01T00:04:10Z"  # now + 4 x max(60 s resend, 10 s)
    assert alertmanager_batch([w0], 20.0, evaluation_interval=10) == []
    assert len(alertmanager_batch([w0], 70.0, evaluation_interval=10)) == 1
    w0.state, w0.resolved_at = AlertState.INACTIVE, 75.0
    (resolved,) = alertmanager_batch([w0], 80.0, evaluation_interval=10)
    assert resolved["endsAt"] == "1970-01-01T00:01:15Z"
    assert alertmanager_batch([w0], 200.0, evaluation_interval=10) == []
    assert alertmanager_batch([alert("w", AlertState.PENDING)], 0.0, evaluation_interval=10) == []


async def test_delivery_retries_with_backoff_then_counts_the_outcome() -> None:
    answers = [503, 500, 200, 500, 500, 500]
    bodies: list[bytes] = []

    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(answers.pop(0))

    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
        queue = DeliveryQueue(
            "ops",
            "http://x/hook",
            max_attempts=3,
            retry_backoff=0.5,
            client=client,
            sleep=fake_sleep,
        )
        queue.start()
        assert await queue.deliver({"n": 1}) is True
        assert await queue.deliver({"n": 2}) is False
        await queue.stop()
    assert sleeps == [0.5, 1.0, 0.5, 1.0]
    assert len(bodies) == 6
    assert queue.counts == {"sent": 1, "failed": 1, "dropped": 0}
    assert queue.last_error == "HTTP 500"


async def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    release = asyncio.Event()
    seen: list[int] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        await release.wait()
        seen.append(int(request.content))
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
        queue = DeliveryQueue("ops", "http://x/hook", queue_size=2, client=client)
        queue.start()
        queue.offer(0)
        await asyncio.sleep(0)  # the sender takes 0 and waits on the receiver
        for n in range(1, 6):
            queue.offer(n)
        assert queue.queued == 2 and queue.counts["dropped"] == 3
        release.set()
        while queue.counts["sent"] < 3:
            await asyncio.sleep(0.01)
        await queue.stop()
    assert seen == [0, 4, 5]
