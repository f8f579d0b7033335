"""What the history keeps: one series per gauge or counter sample of ``/metrics`` and one per
dashboard chart line, each with a key, a kind and a unit.

A series key is the Prometheus sample name with its labels in exposition order, e.g.
``mlxrelay_device_cpu_utilization_ratio{device="worker-0"}``; the dashboard's chart lines are
``chart.tokens_per_second`` and so on. Histograms are kept through their ``_sum`` and
``_count`` counters (a mean over any range is then ``rate(_sum) / rate(_count)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric

from mlx_relay.monitoring.snapshot import HistoryPoint

GAUGE = "gauge"
COUNTER = "counter"
CHART_PREFIX = "chart."
# HistoryPoint field -> unit of the chart line.
CHART_FIELDS = {
    "requests_per_second": "1/s",
    "tokens_per_second": "1/s",
    "e2e_p50_seconds": "seconds",
    "e2e_p99_seconds": "seconds",
    "ttft_p50_seconds": "seconds",
    "cpu_utilization_ratio": "ratio",
    "memory_used_ratio": "ratio",
    "gpu_utilization_ratio": "ratio",
}
_UNIT_SUFFIXES = (
    ("_timestamp_seconds", "unix seconds"),
    ("_seconds", "seconds"),
    ("_bytes", "bytes"),
    ("_ratio", "ratio"),
)


@dataclass(frozen=True)
class SeriesSpec:
    """One stored series.

    Attributes:
        key: Unique name: the sample name and labels, or ``chart.<field>``.
        family: Metric family (sample name without labels) or the chart key.
        labels: Label pairs in exposition order.
        kind: ``gauge`` or ``counter`` (a counter reads back as a per-second rate).
        unit: Unit of the stored value (``seconds``, ``bytes``, ``ratio``, ``1/s``, or empty
            for a count).
    """

    key: str
    family: str
    labels: tuple[tuple[str, str], ...]
    kind: str
    unit: str

    @property
    def read_unit(self) -> str:
        """Unit of what a query returns: a counter's rate is per second."""
        if self.kind != COUNTER:
            return self.unit
        return f"{self.unit}/s" if self.unit else "1/s"


def unit_of(name: str) -> str:
    """The base unit a metric name's suffix declares (naming as in docs/monitoring-api.md)."""
    stem = name.removesuffix("_total").removesuffix("_sum").removesuffix("_count")
    if name.endswith("_count"):
        return ""
    for suffix, unit in _UNIT_SUFFIXES:
        if stem.endswith(suffix):
            return unit
    return ""


def series_key(name: str, labels: Iterable[tuple[str, str]]) -> str:
    pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{pairs}}}" if pairs else name


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def chart_spec(field: str) -> SeriesSpec:
    key = CHART_PREFIX + field
    return SeriesSpec(key, key, (), GAUGE, CHART_FIELDS[field])


CHART_SPECS = {field: chart_spec(field) for field in CHART_FIELDS}


def chart_samples(point: HistoryPoint) -> list[tuple[SeriesSpec, float]]:
    """The chart lines of one history point (unmeasured values are left out: gaps)."""
    out: list[tuple[SeriesSpec, float]] = []
    for field, spec in CHART_SPECS.items():
        value = getattr(point, field)
        if value is not None:
            out.append((spec, float(value)))
    return out


class SeriesCatalog:
    """Turns metric families into ``(spec, value)`` pairs, reusing one spec per series."""

    def __init__(self, max_series: int = 20_000) -> None:
        self._specs: dict[tuple[str, tuple[tuple[str, str], ...]], SeriesSpec] = {}
        self._max_series = max_series
        self.refused = 0

    def samples(self, families: Iterable[Metric]) -> Iterator[tuple[SeriesSpec, float]]:
        for family in families:
            if family.type == "histogram":
                kinds = {family.name + "_sum": COUNTER, family.name + "_count": COUNTER}
            elif family.type in (GAUGE, COUNTER):
                kinds = {}
            else:
                continue
            for sample in family.samples:
                if family.type == "histogram":
                    kind = kinds.get(sample.name)
                    if kind is None:
                        continue
                elif family.type == COUNTER and not sample.name.endswith("_total"):
                    continue  # _created
                else:
                    kind = family.type
                spec = self._spec(sample.name, sample.labels, kind)
                if spec is not None:
                    yield spec, float(sample.value)

    def _spec(self, name: str, labels: dict[str, str], kind: str) -> SeriesSpec | None:
        pairs = tuple(labels.items())
        cached = self._specs.get((name, pairs))
        if cached is not None:
            return cached
        if len(self._specs) >= self._max_series:
            self.refused += 1
            return None
        spec = SeriesSpec(series_key(name, pairs), name, pairs, kind, unit_of(name))
        self._specs[(name, pairs)] = spec
        return spec
