"""The error hierarchy. Each layer translates these at its edge (HTTP, gRPC, CLI)."""


class RelayError(Exception):
    """Base of every error mlx-relay raises on purpose."""


class ConfigError(RelayError):
    """A configuration file or value is invalid."""


class ModelError(RelayError):
    """A model cannot be found, imported or loaded."""


class ModelNotFound(ModelError):
    """The model directory, GGUF file or bundled default is missing."""


class UnsupportedArchitecture(ModelError):
    """The model's architecture cannot be split into shards."""


class ShardMismatch(RelayError):
    """Stages do not cover the model's layers in order, or a tensor does not fit a stage."""


class PartitionError(RelayError):
    """Layers cannot be divided across devices as requested."""


class WorkerUnavailable(RelayError):
    """A worker cannot be reached or stopped answering."""

    def __init__(self, device_id: str, message: str) -> None:
        super().__init__(f"worker {device_id!r}: {message}")
        self.device_id = device_id


class InvalidRequest(RelayError):
    """A request's parameters are invalid; ``code`` a machine-readable reason, if any."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFull(RelayError):
    """The coordinator already holds as many requests as it is allowed to."""


class BindError(RelayError, OSError):
    """An HTTP server cannot listen on the requested address (an :class:`OSError` too)."""


class PipelineNotReady(RelayError):
    """The pipeline has not been initialised, or a stage is not serving."""
