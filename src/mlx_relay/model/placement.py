"""Placement advice: a cost model of the pipeline from measurements, and the contiguous split
that minimises its predicted decode step under each device's memory cap (pure functions).

The model (docs/monitoring-api.md, "Placement"):

- a stage's decode forward time is ``overhead + per_layer x units``, its units being its
  layers plus, on the last stage, the output head counted as ``head_layers`` layers (the
  head's parameter count over one layer's: time is taken to follow parameters on one
  device); the embedding is a table lookup and costs nothing here. Stages on one host share
  one speed: with two or more different unit counts measured there, ``overhead`` and
  ``per_layer`` are the least-squares line through their mean forward times; otherwise
  ``overhead`` is 0 and ``per_layer`` the host's total time over its total units;
- prefill is modelled the same way, per prompt token;
- a stage's memory is its layers' weights, the embedding on the first stage and the head
  (and final norm) on the last, plus the KV budget of its layers;
- the batched pipeline's decode step is the slowest stage (the stages work on different
  micro-batches at once, links carrying them meanwhile); one request's latency is the sum
  of every stage and link.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlx_relay.core.errors import PartitionError
from mlx_relay.core.types import LayerRange

_INF = float("inf")


@dataclass(frozen=True)
class StageSample:
    """What was measured on one stage as it is placed now."""

    device_id: str
    layers: LayerRange
    decode_seconds: float | None
    """Mean seconds of one decode forward call; ``None`` before any."""
    prefill_seconds_per_token: float | None = None
    memory_cap_bytes: int | None = None
    link_seconds: float = 0.0
    """Mean transit of one hop into this stage (coordinator or previous stage to it)."""
    host: str | None = None
    """Stages with the same host share one speed; ``None``: a host of its own."""


@dataclass(frozen=True)
class ModelCosts:
    """What a split costs in memory, from the model's weights and the KV budget."""

    layer_bytes: tuple[int, ...]
    """Weights of each transformer layer, in the form the stages compute with."""
    embed_bytes: int
    head_bytes: int
    """Output head and final norm (the embedding again when it doubles as the head)."""
    kv_bytes_per_layer: int
    """KV-cache budget of one layer: bytes per token times the budgeted tokens."""
    head_layers: float
    """Compute of the head in layer units: its parameters over one layer's."""

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    def stage_bytes(self, layers: LayerRange) -> int:
        """Memory a stage holding ``layers`` needs: weights plus KV budget."""
        total = sum(self.layer_bytes[layers.start : layers.end])
        total += self.kv_bytes_per_layer * len(layers)
        if layers.start == 0:
            total += self.embed_bytes
        if layers.end == self.num_layers:
            total += self.head_bytes
        return total


@dataclass(frozen=True)
class DeviceCost:
    """One device's place in the cost model."""

    device_id: str
    decode_layer_seconds: float
    prefill_layer_seconds_per_token: float | None
    memory_cap_bytes: int | None
    link_seconds: float
    measured: bool
    overhead_seconds: float = 0.0
    """Fixed cost of one decode forward call, whatever the layers."""


@dataclass(frozen=True)
class Prediction:
    """A split and what the cost model predicts for it."""

    split: tuple[LayerRange, ...]
    stage_seconds: tuple[float, ...]
    step_seconds: float
    latency_seconds: float
    stage_bytes: tuple[int, ...]


@dataclass(frozen=True)
class Advice:
    """The current split, the best one, and the predicted gain of moving."""

    devices: tuple[DeviceCost, ...]
    current: Prediction | None
    proposed: Prediction

    @property
    def gain_ratio(self) -> float | None:
        """Predicted current step over proposed step, minus one (0.25 = 25 % faster)."""
        if self.current is None or self.proposed.step_seconds <= 0:
            return None
        return self.current.step_seconds / self.proposed.step_seconds - 1.0


def device_costs(samples: Sequence[StageSample], costs: ModelCosts) -> list[DeviceCost]:
    """Each device's decode speed (overhead and time per layer), from the measured stages of
    its host.

    A host with nothing measured gets the mean speed of the measured ones (per layer 1.0, a
    relative unit, when none is measured).
    """
    units = [
        len(s.layers) + (costs.head_layers if s.layers.end == costs.num_layers else 0.0)
        for s in samples
    ]
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.host if s.host is not None else f"\0{i}", []).append(i)
    speed: dict[int, tuple[float, float]] = {}
    for members in groups.values():
        points = [(units[i], samples[i].decode_seconds) for i in members]
        fitted = _fit([(u, t) for u, t in points if t is not None])
        if fitted is not None:
            speed.update(dict.fromkeys(members, fitted))
    known = list(speed.values())
    fill = (
        (sum(a for a, _ in known) / len(known), sum(b for _, b in known) / len(known))
        if known
        else (0.0, 1.0)
    )
    result = []
    for i, s in enumerate(samples):
        overhead, per_layer = speed.get(i, fill)
        prefill = s.prefill_seconds_per_token
        result.append(
            DeviceCost(
                device_id=s.device_id,
                decode_layer_seconds=per_layer,
                prefill_layer_seconds_per_token=prefill / units[i] if prefill is not None else None,
                memory_cap_bytes=s.memory_cap_bytes,
                link_seconds=s.link_seconds,
                measured=s.decode_seconds is not None,
                overhead_seconds=overhead,
            )
        )
    return result


def _fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(overhead, per unit) of ``time = overhead + per_unit x units`` through ``points``."""
    if not points:
        return None
    total_units = sum(u for u, _ in points)
    pooled = (0.0, sum(t for _, t in points) / total_units if total_units else 0.0)
    mean_u = total_units / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    spread = sum((u - mean_u) ** 2 for u, _ in points)
    if spread <= 1e-12:
        return pooled
    slope = sum((u - mean_u) * (t - mean_t) for u, t in points) / spread
    overhead = mean_t - slope * mean_u
    if slope <= 0 or overhead < 0:
        return pooled
    return overhead, slope


def stage_seconds(device: DeviceCost, layers: LayerRange, costs: ModelCosts) -> float:
    """Predicted decode forward time of ``device`` holding ``layers``."""
    head = costs.head_layers if layers.end == costs.num_layers else 0.0
    return device.overhead_seconds + device.decode_layer_seconds * (len(layers) + head)


def predict(
    devices: Sequence[DeviceCost], split: Sequence[LayerRange], costs: ModelCosts
) -> Prediction:
    """Step and latency of ``split`` (one range per device, in pipeline order)."""
    if len(devices) != len(split):
        raise PartitionError(f"{len(split)} ranges for {len(devices)} devices")
    times = tuple(stage_seconds(d, r, costs) for d, r in zip(devices, split, strict=True))
    links = [d.link_seconds for d in devices]
    return Prediction(
        split=tuple(split),
        stage_seconds=times,
        step_seconds=max(times),
        latency_seconds=sum(times) + sum(links),
        stage_bytes=tuple(costs.stage_bytes(r) for r in split),
    )


def fits(device: DeviceCost, layers: LayerRange, costs: ModelCosts) -> bool:
    cap = device.memory_cap_bytes
    return cap is None or costs.stage_bytes(layers) <= cap


def best_split(devices: Sequence[DeviceCost], costs: ModelCosts) -> Prediction:
    """The contiguous split (every device at least one layer, in order) with the smallest
    predicted decode step whose every stage fits its device's memory cap.

    Dynamic programming over (devices used, layers covered): O(devices x layers^2).

    Raises:
        PartitionError: no split fits, or more devices than layers.
    """
    k, n = len(devices), costs.num_layers
    if k == 0:
        raise PartitionError("no devices to place layers on")
    if k > n:
        raise PartitionError(f"{k} devices cannot share {n} layers: each needs at least one")
    # best[j][i]: smallest max stage time placing layers [0, i) on the first j devices.
    best = [[_INF] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        device = devices[j - 1]
        last_i = n - (k - j)
        for i in range(j, last_i + 1):
            for p in range(j - 1, i):
                if best[j - 1][p] == _INF:
                    continue
                layers = LayerRange(p, i)
                if not fits(device, layers, costs):
                    continue
                value = max(best[j - 1][p], stage_seconds(device, layers, costs))
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, p
    if best[k][n] == _INF:
        raise PartitionError(
            f"no split of {n} layers over {k} devices fits every device's memory cap"
        )
    split: list[LayerRange] = []
    i = n
    for j in range(k, 0, -1):
        p = cut[j][i]
        split.append(LayerRange(p, i))
        i = p
    return predict(devices, split[::-1], costs)


def advise(samples: Sequence[StageSample], costs: ModelCosts) -> Advice:
    """The current split's prediction next to the best split's.

    Raises:
        PartitionError: no split fits.
    """
    devices = device_costs(samples, costs)
    current = predict(devices, [s.layers for s in samples], costs)
    return Advice(tuple(devices), current, best_split(devices, costs))


def what_if(
    devices: Sequence[DeviceCost],
    costs: ModelCosts,
    *,
    add_device_bytes: Sequence[int] = (),
    without: Sequence[str] = (),
) -> Advice:
    """The best split after removing the devices named in ``without`` and appending a new
    device per ``add_device_bytes`` entry (that memory cap, the mean measured speed).

    Raises:
        PartitionError: an unknown device is named, or no split fits.
    """
    known = {d.device_id for d in devices}
    unknown = [w for w in without if w not in known]
    if unknown:
        raise PartitionError(
            f"no device {', '.join(unknown)} (devices: {', '.join(sorted(known))})"
        )
    kept = [d for d in devices if d.device_id not in without]
    measured = [d for d in devices if d.measured] or list(devices)
    speed = sum(d.decode_layer_seconds for d in measured) / max(1, len(measured))
    overhead = sum(d.overhead_seconds for d in measured) / max(1, len(measured))
    template = devices[-1] if devices else None
    for index, cap in enumerate(add_device_bytes, start=1):
        link = template.link_seconds if template is not None else 0.0
        kept.append(
            DeviceCost(
                device_id=f"new-{index}",
                decode_layer_seconds=speed,
                prefill_layer_seconds_per_token=None,
                memory_cap_bytes=int(cap),
                link_seconds=link,
                measured=False,
                overhead_seconds=overhead,
            )
        )
    return Advice(tuple(kept), None, best_split(kept, costs))
