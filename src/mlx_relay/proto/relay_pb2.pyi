from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "has_seed", "seed", "top_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    has_seed: bool
    seed: int
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., has_seed: _Optional[bool] = ..., seed: _Optional[int] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class ForwardEntry(_message.Message):
    __slots__ = ("request_id", "position", "tensor", "sampling", "step", "traceparent", "chained")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    CHAINED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    position: int
    tensor: Tensor
    sampling: SamplingParams
    step: int
    traceparent: str
    chained: bool
    def __init__(self, request_id: _Optional[str] = ..., position: _Optional[int] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., step: _Optional[int] = ..., traceparent: _Optional[str] = ..., chained: _Optional[bool] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("device_id", "address", "layer_start", "layer_end")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    address: str
    layer_start: int
    layer_end: int
    def __init__(self, device_id: _Optional[str] = ..., address: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("entries", "route", "layer_start", "layer_end", "microbatches_in_flight")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ForwardEntry]
    route: _containers.RepeatedCompositeFieldContainer[Hop]
    layer_start: int
    layer_end: int
    microbatches_in_flight: int
    def __init__(self, entries: _Optional[_Iterable[_Union[ForwardEntry, _Mapping]]] = ..., route: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., microbatches_in_flight: _Optional[int] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class ForwardResult(_message.Message):
    __slots__ = ("request_id", "tensor", "token_id", "logprob", "top_logprobs", "cached_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tensor: Tensor
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    cached_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("device_id", "compute_seconds", "rpc_seconds", "compute_offset_seconds", "handled_seconds", "called_offset_seconds", "check_seconds", "queue_seconds", "encode_seconds", "sample_seconds", "chain_wait_seconds")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RPC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_OFFSET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HANDLED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CALLED_OFFSET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    compute_seconds: float
    rpc_seconds: float
    compute_offset_seconds: float
    handled_seconds: float
    called_offset_seconds: float
    check_seconds: float
    queue_seconds: float
    encode_seconds: float
    sample_seconds: float
    chain_wait_seconds: float
    def __init__(self, device_id: _Optional[str] = ..., compute_seconds: _Optional[float] = ..., rpc_seconds: _Optional[float] = ..., compute_offset_seconds: _Optional[float] = ..., handled_seconds: _Optional[float] = ..., called_offset_seconds: _Optional[float] = ..., check_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., encode_seconds: _Optional[float] = ..., sample_seconds: _Optional[float] = ..., chain_wait_seconds: _Optional[float] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("results", "device_id", "compute_seconds", "stages")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ForwardResult]
    device_id: str
    compute_seconds: float
    stages: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, results: _Optional[_Iterable[_Union[ForwardResult, _Mapping]]] = ..., device_id: _Optional[str] = ..., compute_seconds: _Optional[float] = ..., stages: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class ForwardCall(_message.Message):
    __slots__ = ("call_id", "request", "timeout_seconds", "traceparent")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    request: ForwardRequest
    timeout_seconds: float
    traceparent: str
    def __init__(self, call_id: _Optional[int] = ..., request: _Optional[_Union[ForwardRequest, _Mapping]] = ..., timeout_seconds: _Optional[float] = ..., traceparent: _Optional[str] = ...) -> None: ...

class ForwardAnswer(_message.Message):
    __slots__ = ("call_id", "response", "code", "detail", "failed_device")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    FAILED_DEVICE_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    response: ForwardResponse
    code: str
    detail: str
    failed_device: str
    def __init__(self, call_id: _Optional[int] = ..., response: _Optional[_Union[ForwardResponse, _Mapping]] = ..., code: _Optional[str] = ..., detail: _Optional[str] = ..., failed_device: _Optional[str] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("request_id", "existed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    existed: bool
    def __init__(self, request_id: _Optional[str] = ..., existed: _Optional[bool] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("request_id", "payload", "sent_at")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    payload: bytes
    sent_at: float
    def __init__(self, request_id: _Optional[str] = ..., payload: _Optional[bytes] = ..., sent_at: _Optional[float] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("request_id", "payload", "sent_at", "device_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    payload: bytes
    sent_at: float
    device_id: str
    def __init__(self, request_id: _Optional[str] = ..., payload: _Optional[bytes] = ..., sent_at: _Optional[float] = ..., device_id: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("request_id", "device_id", "stage", "layer_start", "layer_end", "num_layers", "model_loaded", "model_name", "kv_sessions", "health_status", "metrics_json", "health_json", "uptime_seconds", "hidden_size", "dtype", "backend", "compute", "blas", "blas_threads")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    KV_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_STATUS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    HEALTH_JSON_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    BLAS_FIELD_NUMBER: _ClassVar[int]
    BLAS_THREADS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    device_id: str
    stage: int
    layer_start: int
    layer_end: int
    num_layers: int
    model_loaded: bool
    model_name: str
    kv_sessions: int
    health_status: str
    metrics_json: str
    health_json: str
    uptime_seconds: float
    hidden_size: int
    dtype: str
    backend: str
    compute: str
    blas: str
    blas_threads: int
    def __init__(self, request_id: _Optional[str] = ..., device_id: _Optional[str] = ..., stage: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers: _Optional[int] = ..., model_loaded: _Optional[bool] = ..., model_name: _Optional[str] = ..., kv_sessions: _Optional[int] = ..., health_status: _Optional[str] = ..., metrics_json: _Optional[str] = ..., health_json: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., backend: _Optional[str] = ..., compute: _Optional[str] = ..., blas: _Optional[str] = ..., blas_threads: _Optional[int] = ...) -> None: ...

class ReshardRequest(_message.Message):
    __slots__ = ("request_id", "phase", "layer_start", "layer_end")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[ReshardRequest.Phase]
        PREPARE: _ClassVar[ReshardRequest.Phase]
        COMMIT: _ClassVar[ReshardRequest.Phase]
        RELEASE: _ClassVar[ReshardRequest.Phase]
        ABORT: _ClassVar[ReshardRequest.Phase]
    PHASE_UNSPECIFIED: ReshardRequest.Phase
    PREPARE: ReshardRequest.Phase
    COMMIT: ReshardRequest.Phase
    RELEASE: ReshardRequest.Phase
    ABORT: ReshardRequest.Phase
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    phase: ReshardRequest.Phase
    layer_start: int
    layer_end: int
    def __init__(self, request_id: _Optional[str] = ..., phase: _Optional[_Union[ReshardRequest.Phase, str]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class ReshardResponse(_message.Message):
    __slots__ = ("request_id", "device_id", "layer_start", "layer_end", "load_seconds", "dropped_sessions")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    device_id: str
    layer_start: int
    layer_end: int
    load_seconds: float
    dropped_sessions: int
    def __init__(self, request_id: _Optional[str] = ..., device_id: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., load_seconds: _Optional[float] = ..., dropped_sessions: _Optional[int] = ...) -> None: ...
