"""The alerting engine: evaluates every rule each interval and hands alerts to the notifiers.

Each evaluation reads the same metric families ``/metrics`` renders (plus the ``ALERTS``
series of the previous evaluation, which hysteresis rules use), runs in a worker thread so
the event loop that serves inference never waits for it, and logs one line per transition.
Notifications are queued on the event loop afterwards; delivering them is the queues' job.

    engine = AlertEngine(rules, sample_source, config=cluster.alerting)
    await engine.start()
    ...
    await engine.stop()
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from mlx_relay.core.config import AlertingConfig
from mlx_relay.core.tasks import cancel_and_wait
from mlx_relay.monitoring.alerting.alertmanager import alertmanager_api_url, alertmanager_batch
from mlx_relay.monitoring.alerting.delivery import DeliveryQueue
from mlx_relay.monitoring.alerting.promql import EvalContext, InvalidExpression, evaluate
from mlx_relay.monitoring.alerting.rules import AlertRule
from mlx_relay.monitoring.alerting.samples import NAME, Instant, SampleStore, label_set
from mlx_relay.monitoring.alerting.state import Alert, AlertState, RuleState, Transition
from mlx_relay.monitoring.alerting.views import (
    AlertInfo,
    AlertsView,
    DeliveryInfo,
    RuleInfo,
    alert_info,
    by_severity,
)
from mlx_relay.monitoring.alerting.webhook import WebhookGrouper

logger = logging.getLogger(__name__)

SampleSource = Callable[[frozenset[str] | None], Instant]
"""Returns the current instant of the metric names given (of every name for None)."""
ALERTS_SERIES = "ALERTS"
ALERTMANAGER_RECEIVER = "alertmanager"
MAX_RESOLVED = 50


class AlertEngine:
    """Rules, their states and the notification queues of one coordinator.

    Args:
        rules: The checked rules (see :func:`.rules.configured_rules`).
        sample_source: Returns the current instant of the metric names the rules read.
        config: Interval, receivers, Alertmanager URL, resolved retention.
        clock: Unix seconds; evaluation uses it only when ``evaluate`` is given no time.
    """

    def __init__(
        self,
        rules: list[AlertRule],
        sample_source: SampleSource,
        *,
        config: AlertingConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.interval = config.evaluation_interval
        self._sample_source = sample_source
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[tuple[str, tuple[tuple[str, str], ...]], RuleState] = {}
        self._errors: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._resolved: deque[AlertInfo] = deque(maxlen=MAX_RESOLVED)
        self._store = SampleStore((), 0.0)
        self._wanted: frozenset[str] | None = None
        self.evaluated_at: float | None = None
        self.evaluations = 0
        external = config.external_url or ""
        self._groupers = [WebhookGrouper(r, external) for r in config.receivers]
        self.queues = [
            DeliveryQueue(
                r.name,
                r.url,
                timeout=r.timeout,
                max_attempts=r.max_attempts,
                retry_backoff=r.retry_backoff,
                queue_size=r.queue_size,
            )
            for r in config.receivers
        ]
        self._alertmanager: DeliveryQueue | None = None
        if config.alertmanager_url:
            self._alertmanager = DeliveryQueue(
                ALERTMANAGER_RECEIVER, alertmanager_api_url(config.alertmanager_url)
            )
            self.queues.append(self._alertmanager)
        self._task: asyncio.Task[None] | None = None
        self.reload(rules)

    @property
    def rules(self) -> list[AlertRule]:
        return [state.rule for state in list(self._states.values())]

    def reload(self, rules: list[AlertRule]) -> None:
        """Replace the rules; a rule kept (same name and labels) keeps its alerts' states."""
        with self._lock:
            states = {}
            for rule in rules:
                state = RuleState(rule, self.config.resolved_retention)
                previous = self._states.get(rule.key)
                if previous is not None:
                    state.active = previous.active
                states[rule.key] = state
            self._states = states  # one assignment: readers see the old rules or the new
            ranges: dict[str, float] = {}
            for rule in rules:
                for name in rule.expression.range_names:
                    ranges[name] = max(ranges.get(name, 0.0), rule.expression.max_range_seconds)
            reads = [rule.expression.names for rule in rules]
            self._wanted = None  # a selector without a metric name reads every family
            if all(names is not None for names in reads):
                wanted = {name for names in reads if names is not None for name in names}
                self._wanted = frozenset(wanted - {ALERTS_SERIES})
            store = SampleStore(ranges, max(ranges.values(), default=0.0) + self.interval)
            store.carry_over(self._store)
            self._store = store
        logger.info("alerting: %d rules loaded", len(rules))

    def _alerts_series(self) -> dict[tuple[tuple[str, str], ...], float]:
        series = {}
        for state in self._states.values():
            for alert in state.alerts():
                if alert.state in (AlertState.PENDING, AlertState.FIRING):
                    labels = {**alert.labels, NAME: ALERTS_SERIES, "alertstate": alert.state.value}
                    series[label_set(labels)] = 1.0
        return series

    def evaluate(self, now: float | None = None) -> list[Transition]:
        """One evaluation of every rule at ``now`` (default: the clock); thread-safe."""
        now = self._clock() if now is None else now
        instant = self._sample_source(self._wanted)
        with self._lock:
            instant[ALERTS_SERIES] = self._alerts_series()
            self._store.add(now, instant)
            context = EvalContext(now, self._store)
            transitions: list[Transition] = []
            for key, state in self._states.items():
                try:
                    result = evaluate(state.rule.expression, context)
                except (InvalidExpression, ArithmeticError) as exc:
                    # Like Prometheus: a failed evaluation leaves the rule's alerts as they were.
                    if self._errors.get(key) != str(exc):
                        logger.warning("alert rule %s failed: %s", state.rule.name, exc)
                    self._errors[key] = str(exc)
                    continue
                self._errors.pop(key, None)
                transitions.extend(state.evaluate(result, now))
            for transition in transitions:
                if transition.from_state == AlertState.FIRING:
                    self._resolved.appendleft(alert_info(transition.alert, "resolved"))
            self.evaluated_at = now
            self.evaluations += 1
        for transition in transitions:
            log_transition(transition)
        return transitions

    def notify(self, now: float | None = None) -> None:
        """Queue the notifications due at ``now`` (call on the event loop, after evaluate)."""
        now = self._clock() if now is None else now
        alerts = self.alerts()
        for grouper, queue in zip(self._groupers, self.queues, strict=False):
            grouper.observe(alerts, now)
            for payload in grouper.flush(now):
                queue.offer(payload)
        if self._alertmanager is not None:
            batch = alertmanager_batch(alerts, now, evaluation_interval=self.interval)
            if batch:
                self._alertmanager.offer(batch)

    def alerts(self) -> list[Alert]:
        with self._lock:
            return [alert for state in self._states.values() for alert in state.alerts()]

    def view(self) -> AlertsView:
        """What ``GET /api/alerts`` returns."""
        with self._lock:
            active = [alert for state in self._states.values() for alert in state.alerts()]
            rules = [
                RuleInfo(
                    alertname=s.rule.name,
                    severity=s.rule.labels.get("severity", ""),
                    expr=s.rule.expr,
                    for_seconds=s.rule.for_seconds,
                    keep_firing_for_seconds=s.rule.keep_firing_for_seconds,
                    last_error=self._errors.get(key),
                )
                for key, s in self._states.items()
            ]
            resolved = list(self._resolved)
            evaluated_at = self.evaluated_at
        return AlertsView(
            enabled=True,
            evaluation_interval_seconds=self.interval,
            evaluated_at=evaluated_at,
            firing=by_severity(
                [alert_info(a, "firing") for a in active if a.state == AlertState.FIRING]
            ),
            pending=by_severity(
                [alert_info(a, "pending") for a in active if a.state == AlertState.PENDING]
            ),
            resolved=resolved,
            rules=rules,
            receivers=[
                DeliveryInfo(
                    receiver=q.name,
                    url=q.url,
                    queued=q.queued,
                    last_error=q.last_error,
                    **q.counts,
                )
                for q in self.queues
            ],
        )

    async def start(self) -> None:
        if self._task is not None:
            return
        for queue in self.queues:
            queue.start()
        self._task = asyncio.create_task(self._run(), name="alert-engine")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        for queue in self.queues:
            await queue.stop()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await asyncio.to_thread(self.evaluate)
                self.notify()
            except Exception:
                # One failed evaluation (e.g. a snapshot error) must not end alerting.
                logger.exception("alert evaluation failed")
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.interval - elapsed))


def log_transition(transition: Transition) -> None:
    alert = transition.alert
    labels = ",".join(f"{k}={v}" for k, v in sorted(alert.labels.items()) if k != "alertname")
    to_state = transition.to_state.value
    if transition.from_state == AlertState.FIRING and transition.to_state == AlertState.INACTIVE:
        to_state = "resolved"
    log = logger.warning if to_state == "firing" else logger.info
    log(
        "alert %s{%s} %s -> %s (value %g): %s",
        alert.rule,
        labels,
        transition.from_state.value,
        to_state,
        alert.value,
        alert.annotations.get("summary", ""),
    )
