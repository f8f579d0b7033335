"""Placement advice: a cost model of the pipeline from measurements, and the contiguous split
that minimises its predicted decode step under each device's memory cap (pure functions).

The model (docs/architecture.md, "Placement"):

- a device's compute time per layer is measured: its mean decode forward time divided by
  the layers it holds, the output head counted as ``head_layers`` layers on the last stage
  (the head's parameter count over one layer's, so time is taken to follow parameters on
  one device); the embedding is a table lookup and costs nothing here;
- prefill is modelled the same way, per prompt token;
- a stage's memory is its layers' weights, the embedding on the first stage and the head
  (and final norm) on the last, plus the KV budget of its layers;
- the batched pipeline's decode step is the slowest stage or link (the stages work on
  different micro-batches at once); one request's latency is the sum of every stage and link.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

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
    """Per layer compute time of each device, from its measured stage.

    A device not measured yet gets the mean per layer time of the measured ones (1.0, a
    relative unit, when none is measured).
    """
    per_layer: list[float | None] = []
    per_token: list[float | None] = []
    for s in samples:
        units = len(s.layers) + (costs.head_layers if s.layers.end == costs.num_layers else 0.0)
        per_layer.append(s.decode_seconds / units if s.decode_seconds is not None else None)
        prefill = s.prefill_seconds_per_token
        per_token.append(prefill / units if prefill is not None else None)
    known = [v for v in per_layer if v is not None]
    fill = sum(known) / len(known) if known else 1.0
    return [
        DeviceCost(
            device_id=s.device_id,
            decode_layer_seconds=layer if layer is not None else fill,
            prefill_layer_seconds_per_token=token,
            memory_cap_bytes=s.memory_cap_bytes,
            link_seconds=s.link_seconds,
            measured=layer is not None,
        )
        for s, layer, token in zip(samples, per_layer, per_token, strict=True)
    ]


def stage_seconds(device: DeviceCost, layers: LayerRange, costs: ModelCosts) -> float:
    """Predicted decode forward time of ``device`` holding ``layers``."""
    head = costs.head_layers if layers.end == costs.num_layers else 0.0
    return device.decode_layer_seconds * (len(layers) + head)


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
        step_seconds=max([*times, *links]),
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
        floor = device.link_seconds
        last_i = n - (k - j)
        for i in range(j, last_i + 1):
            for p in range(j - 1, i):
                if best[j - 1][p] == _INF:
                    continue
                layers = LayerRange(p, i)
                if not fits(device, layers, costs):
                    continue
                value = max(best[j - 1][p], stage_seconds(device, layers, costs), floor)
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
        raise PartitionError(f"no device {', '.join(unknown)} (devices: {', '.join(sorted(known))})")
    kept = [d for d in devices if d.device_id not in without]
    speeds = [d.decode_layer_seconds for d in devices if d.measured] or [
        d.decode_layer_seconds for d in devices
    ]
    speed = sum(speeds) / len(speeds)
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
            )
        )
    return Advice(tuple(kept), None, best_split(kept, costs))


def with_caps(devices: Sequence[DeviceCost], caps: dict[str, int]) -> list[DeviceCost]:
    """``devices`` with the memory caps in ``caps`` (by device id) replacing theirs."""
    return [
        replace(d, memory_cap_bytes=caps[d.device_id]) if d.device_id in caps else d
        for d in devices
    ]
