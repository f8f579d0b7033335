"""The coordinator's view of the gRPC client of one worker.

The client lives in :mod:`mlx_relay.worker_client`, shared by the coordinator (every call
to a stage) and the workers (the relay of hidden states to the next stage).
"""

from mlx_relay.worker_client import (
    FAILED_DEVICE_KEY,
    RpcMetricsInterceptor,
    RpcRecorder,
    StageError,
    WorkerClient,
    WorkerTimedOut,
    translate_rpc_error,
)

__all__ = [
    "FAILED_DEVICE_KEY",
    "RpcMetricsInterceptor",
    "RpcRecorder",
    "StageError",
    "WorkerClient",
    "WorkerTimedOut",
    "translate_rpc_error",
]
