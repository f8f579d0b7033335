"""Cluster configuration: one validated object, built at the entry point and passed in.

A bad file gets one :class:`ConfigError` naming the file, the field path and what was
expected. Unknown keys are errors so that typos are never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mlx_relay.core.alerting_config import AlertingConfig
from mlx_relay.core.errors import ConfigError
from mlx_relay.core.history_config import HistoryConfig
from mlx_relay.core.pipeline_config import InferenceConfig, NetworkConfig
from mlx_relay.core.placement_config import PlacementConfig
from mlx_relay.core.supervision_config import SupervisionConfig
from mlx_relay.core.tls_config import DeviceTLS
from mlx_relay.core.tracing_config import TracingConfig
from mlx_relay.core.types import LayerRange
from mlx_relay.core.validation import ConfigSection, FieldProblem, describe, kind_of

Port = int


Compute = Literal["auto", "quantized", "float32"]


class ModelConfig(ConfigSection):
    """Which model to serve and how a stage computes with it.

    ``path`` is an MLX model directory or a ``.gguf`` file; when it is empty the bundled
    SmolLM2-135M-Instruct is used. ``compute`` picks the weights a stage computes with:
    ``quantized`` (as stored), ``float32`` (dequantized, dense) or ``auto`` (float32 on the
    CPU backend when the stage's dense weights fit ``dense_memory_share`` of the available
    memory, else as stored; as stored on GPU backends). ``blas_threads`` fixes the CPU BLAS
    thread count of each computing process (default: per step, the host's cores divided
    among the stages of that host that may compute at once, see
    ``mlx_relay.worker.step_threads``).
    """

    path: str | None = None
    name: str | None = None
    cache_dir: str | None = None
    max_context: int | None = Field(default=None, gt=0)
    compute: Compute = "auto"
    dense_memory_share: float = Field(default=0.5, gt=0, le=1)
    blas_threads: int | None = Field(default=None, ge=1, le=1024)


class DeviceConfig(ConfigSection):
    """One device of the cluster.

    For a worker, ``host``/``port`` is its gRPC address (port 0 picks a free port, for tests)
    and ``layers`` is a half-open ``[start, end)`` pair or ``auto``. The coordinator's entry
    only names it (its id in the monitoring data); its HTTP address is :class:`HTTPConfig`'s.
    ``tls`` is the device's certificate and key when ``network.tls`` is set
    (:mod:`mlx_relay.core.tls_config`).
    """

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    host: str = "127.0.0.1"
    port: Port = Field(default=0, ge=0, le=65535)
    role: Literal["coordinator", "worker"] = "worker"
    layers: LayerRange | Literal["auto"] | None = None
    memory_budget_gb: float | None = Field(default=None, gt=0)
    tls: DeviceTLS | None = None

    @field_validator("layers", mode="before")
    @classmethod
    def _parse_layers(cls, value: Any) -> Any:
        if value is None or value == "auto" or isinstance(value, LayerRange):
            return value
        if (
            isinstance(value, list | tuple)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            start, end = value
            if start < 0 or end <= start:
                raise ValueError(f"expected [start, end) with 0 <= start < end, got {list(value)}")
            return LayerRange(start, end)
        raise ValueError(f"expected a [start, end) pair of integers or 'auto', got {value!r}")

    @model_validator(mode="after")
    def _role_fields(self) -> DeviceConfig:
        if self.role == "coordinator" and self.layers is not None:
            raise ValueError("a coordinator holds no layers; remove 'layers'")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Thresholds(ConfigSection):
    """Health thresholds in percent (0-100)."""

    memory_warning: float = Field(default=85.0, ge=0, le=100)
    memory_critical: float = Field(default=95.0, ge=0, le=100)
    cpu_warning: float = Field(default=90.0, ge=0, le=100)
    cpu_critical: float = Field(default=98.0, ge=0, le=100)
    disk_warning: float = Field(default=85.0, ge=0, le=100)
    disk_critical: float = Field(default=95.0, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        for name in ("memory", "cpu", "disk"):
            if getattr(self, f"{name}_warning") > getattr(self, f"{name}_critical"):
                raise ValueError(f"{name}_warning must not exceed {name}_critical")
        return self


class HTTPConfig(ConfigSection):
    """The HTTP app: where it listens and who may use it.

    One app serves every route: the coordinator's (``mlx-relay up`` / ``coordinator``) or the
    standalone dashboard's (``mlx-relay dashboard``). ``auth_token`` protects ``/``,
    ``/api/*``, ``/ws``, ``/v1/*`` and ``/health``. ``/metrics`` takes ``metrics_token`` when
    set, else ``auth_token``, unless ``metrics_open`` is true. ``/api/*`` is rate limited per
    client; CORS is off unless ``cors_origins`` lists origins.
    """

    host: str = "127.0.0.1"
    port: Port = Field(default=8080, ge=0, le=65535)
    auth_token: str | None = None
    metrics_token: str | None = None
    metrics_open: bool = False
    rate_limit_per_minute: int = Field(default=600, ge=1)
    cors_origins: list[str] = Field(default_factory=list)
    # Largest request body accepted, bytes; a larger one is answered 413 before it is parsed.
    max_body_bytes: int = Field(default=4 * 2**20, ge=1024)
    # Live WebSocket clients (/ws) at once; one more is closed with code 1013 (try again later).
    max_websocket_clients: int = Field(default=64, ge=1)
    # A streamed answer (server-sent events) whose client reads nothing for this many
    # seconds is dropped: its connection closed, its request ended on every stage.
    stream_stall_timeout: float = Field(default=60.0, gt=0)


class MonitoringConfig(ConfigSection):
    enabled: bool = True
    collection_interval: float = Field(default=2.0, gt=0, le=3600)
    retention_seconds: float = Field(default=600.0, gt=0)
    poll_interval: float = Field(default=2.0, gt=0, le=3600)
    health_check_interval: float = Field(default=10.0, gt=0)
    thresholds: Thresholds = Field(default_factory=Thresholds)


# Keys that used to exist, and where their setting lives now.
MOVED_KEYS: dict[str, str] = {
    **{f"monitoring.dashboard.{key}": f"http.{key}" for key in HTTPConfig.model_fields},
    "monitoring.dashboard": "http",
}
COORDINATOR_ADDRESS_KEYS = ("host", "port")


class ClusterConfig(ConfigSection):
    """The whole cluster: model, devices in pipeline order, the HTTP app, monitoring,
    network, inference, alerting, history, supervision, tracing, placement."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    devices: list[DeviceConfig]
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    alerting: AlertingConfig = Field(default_factory=AlertingConfig)
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    _source: str = PrivateAttr(default="<config>")

    @property
    def source(self) -> str:
        """The file this configuration was read from (how error messages name it)."""
        return self._source

    def __eq__(self, other: object) -> bool:
        # Where a configuration was read from is not part of it.
        if not isinstance(other, ClusterConfig):
            return NotImplemented
        return dict(self) == dict(other)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        monitoring = data.get("monitoring")
        if isinstance(monitoring, dict) and "dashboard" in monitoring:
            dashboard = monitoring["dashboard"]
            first = next(iter(dashboard), None) if isinstance(dashboard, dict) else None
            old = f"monitoring.dashboard.{first}" if first is not None else "monitoring.dashboard"
            new = MOVED_KEYS.get(old, "the top-level 'http' section")
            raise FieldProblem(old, f"moved to {new}")
        devices = data.get("devices")
        for i, device in enumerate(devices if isinstance(devices, list) else []):
            if not isinstance(device, dict) or device.get("role") != "coordinator":
                continue
            for key in COORDINATOR_ADDRESS_KEYS:
                if key in device:
                    raise FieldProblem(
                        f"devices[{i}].{key}",
                        f"the coordinator's HTTP address moved to http.{key}",
                    )
        return data

    @model_validator(mode="after")
    def _check_devices(self) -> ClusterConfig:
        seen_ids: set[str] = set()
        seen_addresses: set[tuple[str, int]] = set()
        for i, device in enumerate(self.devices):
            if device.role == "worker" and "port" not in device.model_fields_set:
                raise FieldProblem(f"devices[{i}].port", "required field is missing")
            if device.id in seen_ids:
                raise FieldProblem(f"devices[{i}].id", f"duplicate device id {device.id!r}")
            seen_ids.add(device.id)
            if device.port and (device.host, device.port) in seen_addresses:
                raise FieldProblem(
                    f"devices[{i}].port", f"{device.host}:{device.port} is used by another device"
                )
            seen_addresses.add((device.host, device.port))
        if sum(d.role == "coordinator" for d in self.devices) > 1:
            raise FieldProblem("devices", "at most one device may have role 'coordinator'")
        workers = [(i, d) for i, d in enumerate(self.devices) if d.role == "worker"]
        if not workers:
            raise FieldProblem("devices", "expected at least one device with role 'worker'")
        explicit = [(i, w) for i, w in workers if isinstance(w.layers, LayerRange)]
        if explicit and len(explicit) != len(workers):
            i = next(i for i, w in workers if not isinstance(w.layers, LayerRange))
            raise FieldProblem(
                f"devices[{i}].layers", "give every worker explicit layers, or none (use 'auto')"
            )
        expected_start = 0
        previous: LayerRange | None = None
        for i, worker in explicit:
            assert isinstance(worker.layers, LayerRange)
            start, end = worker.layers.start, worker.layers.end
            if worker.layers == previous:
                continue  # a replica of the stage before: the same layers
            previous = worker.layers
            if start < expected_start:
                raise FieldProblem(
                    f"devices[{i}].layers",
                    f"[{start}, {end}) overlaps the previous worker's layers, "
                    f"which end at {expected_start}",
                )
            if start > expected_start:
                raise FieldProblem(
                    f"devices[{i}].layers",
                    f"layers [{expected_start}, {start}) are assigned to no worker "
                    f"(workers must cover the model's layers in order)",
                )
            expected_start = end
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> ClusterConfig:
        tls = self.network.tls
        for i, device in enumerate(self.devices):
            if tls is None and device.tls is not None:
                raise FieldProblem(
                    "network.tls", f"expected ca_file: devices[{i}].tls is set, so TLS is on"
                )
            if tls is not None and device.tls is None and device.role == "worker":
                raise FieldProblem(
                    f"devices[{i}].tls",
                    "expected cert_file and key_file: network.tls is set, so every worker "
                    "serves TLS",
                )
        coordinator = self.coordinator
        if tls is not None and tls.require_client_cert:
            if coordinator is None:
                raise FieldProblem(
                    "devices",
                    "expected a device with role 'coordinator' and its tls: "
                    "network.tls.require_client_cert is true",
                )
            if coordinator.tls is None:
                i = self.devices.index(coordinator)
                raise FieldProblem(
                    f"devices[{i}].tls",
                    "expected cert_file and key_file: network.tls.require_client_cert is true, "
                    "so the coordinator presents a certificate",
                )
        return self

    @property
    def workers(self) -> list[DeviceConfig]:
        """Workers in pipeline order."""
        return [d for d in self.devices if d.role == "worker"]

    @property
    def stages(self) -> list[list[DeviceConfig]]:
        """The workers by pipeline stage: consecutive workers with the same explicit
        layers are replicas of one stage; every other worker is a stage of its own."""
        stages: list[list[DeviceConfig]] = []
        for worker in self.workers:
            if (
                stages
                and isinstance(worker.layers, LayerRange)
                and (worker.layers == stages[-1][0].layers)
            ):
                stages[-1].append(worker)
            else:
                stages.append([worker])
        return stages

    def stage_index(self, device_id: str) -> int:
        """The pipeline stage of a worker (replicas share theirs).

        Raises:
            ConfigError: no worker has that id.
        """
        for index, replicas in enumerate(self.stages):
            if any(w.id == device_id for w in replicas):
                return index
        raise ConfigError(f"no worker {device_id!r} in the configuration")

    @property
    def coordinator(self) -> DeviceConfig | None:
        return next((d for d in self.devices if d.role == "coordinator"), None)

    @property
    def coordinator_id(self) -> str:
        """The coordinator's device id (``coordinator`` when the config names none)."""
        coordinator = self.coordinator
        return coordinator.id if coordinator is not None else "coordinator"

    def device(self, device_id: str) -> DeviceConfig:
        for device in self.devices:
            if device.id == device_id:
                return device
        known = ", ".join(d.id for d in self.devices)
        raise ConfigError(f"no device {device_id!r} in the configuration (devices: {known})")

    def with_worker_ports(self, ports: dict[str, int]) -> ClusterConfig:
        """A copy with the given workers' ports replaced (used after binding port 0)."""
        devices = [d.model_copy(update={"port": ports.get(d.id, d.port)}) for d in self.devices]
        return self.model_copy(update={"devices": devices})

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data that :meth:`from_dict` reads back (for a file
        handed to worker processes)."""
        data = self.model_dump(mode="python")
        for device in data["devices"]:
            layers = device.get("layers")
            if isinstance(layers, LayerRange):
                device["layers"] = [layers.start, layers.end]
            elif isinstance(layers, dict):
                device["layers"] = [layers["start"], layers["end"]]
            if device["role"] == "coordinator":
                for key in COORDINATOR_ADDRESS_KEYS:
                    device.pop(key)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>") -> ClusterConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {kind_of(data)}")
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(describe(exc, source)) from None
        config._source = source
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        """Load and validate a YAML file; raises :class:`ConfigError` with one clear message."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: configuration file not found") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
        return cls.from_dict(data, source=str(path))
