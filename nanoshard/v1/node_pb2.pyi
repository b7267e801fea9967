from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GroupCommand(_message.Message):
    __slots__ = ("group", "open", "step", "close")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    group: str
    open: OpenRequest
    step: StepRequest
    close: CloseRequest
    def __init__(self, group: _Optional[str] = ..., open: _Optional[_Union[OpenRequest, _Mapping]] = ..., step: _Optional[_Union[StepRequest, _Mapping]] = ..., close: _Optional[_Union[CloseRequest, _Mapping]] = ...) -> None: ...

class GroupAck(_message.Message):
    __slots__ = ("has_token", "token", "compute_ms", "collective_ms")
    HAS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_MS_FIELD_NUMBER: _ClassVar[int]
    has_token: bool
    token: int
    compute_ms: float
    collective_ms: float
    def __init__(self, has_token: _Optional[bool] = ..., token: _Optional[int] = ..., compute_ms: _Optional[float] = ..., collective_ms: _Optional[float] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("start", "end", "addresses", "public_keys", "check_rates")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    CHECK_RATES_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    public_keys: _containers.RepeatedScalarFieldContainer[bytes]
    check_rates: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ..., public_keys: _Optional[_Iterable[bytes]] = ..., check_rates: _Optional[_Iterable[float]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class SessionSpec(_message.Message):
    __slots__ = ("session_id", "max_length", "codec", "sampling", "client_share")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SHARE_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    max_length: int
    codec: str
    sampling: SamplingParams
    client_share: bytes
    def __init__(self, session_id: _Optional[bytes] = ..., max_length: _Optional[int] = ..., codec: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., client_share: _Optional[bytes] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("spec", "route", "start", "end", "timeout_ms")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    spec: SessionSpec
    route: _containers.RepeatedCompositeFieldContainer[Hop]
    start: int
    end: int
    timeout_ms: int
    def __init__(self, spec: _Optional[_Union[SessionSpec, _Mapping]] = ..., route: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ("length", "session_key")
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    length: int
    session_key: SessionKey
    def __init__(self, length: _Optional[int] = ..., session_key: _Optional[_Union[SessionKey, _Mapping]] = ...) -> None: ...

class SessionKey(_message.Message):
    __slots__ = ("address", "share", "signature")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    address: str
    share: bytes
    signature: bytes
    def __init__(self, address: _Optional[str] = ..., share: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Activations(_message.Message):
    __slots__ = ("codec", "shape", "payload")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    codec: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    payload: bytes
    def __init__(self, codec: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "step_id", "pos", "tokens", "activations", "this_hop_only", "sample", "return_output", "chunks", "timeout_ms", "mac_only")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    THIS_HOP_ONLY_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    RETURN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAC_ONLY_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    step_id: int
    pos: int
    tokens: Tokens
    activations: Activations
    this_hop_only: bool
    sample: bool
    return_output: bool
    chunks: _containers.RepeatedCompositeFieldContainer[InputChunk]
    timeout_ms: int
    mac_only: bool
    def __init__(self, session_id: _Optional[bytes] = ..., step_id: _Optional[int] = ..., pos: _Optional[int] = ..., tokens: _Optional[_Union[Tokens, _Mapping]] = ..., activations: _Optional[_Union[Activations, _Mapping]] = ..., this_hop_only: _Optional[bool] = ..., sample: _Optional[bool] = ..., return_output: _Optional[bool] = ..., chunks: _Optional[_Iterable[_Union[InputChunk, _Mapping]]] = ..., timeout_ms: _Optional[int] = ..., mac_only: _Optional[bool] = ...) -> None: ...

class InputChunk(_message.Message):
    __slots__ = ("pos", "tokens", "activations")
    POS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    pos: int
    tokens: Tokens
    activations: Activations
    def __init__(self, pos: _Optional[int] = ..., tokens: _Optional[_Union[Tokens, _Mapping]] = ..., activations: _Optional[_Union[Activations, _Mapping]] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("has_token", "token", "hops", "output", "chunk_traces")
    HAS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TRACES_FIELD_NUMBER: _ClassVar[int]
    has_token: bool
    token: int
    hops: _containers.RepeatedCompositeFieldContainer[HopTrace]
    output: Activations
    chunk_traces: _containers.RepeatedCompositeFieldContainer[HopTrace]
    def __init__(self, has_token: _Optional[bool] = ..., token: _Optional[int] = ..., hops: _Optional[_Iterable[_Union[HopTrace, _Mapping]]] = ..., output: _Optional[_Union[Activations, _Mapping]] = ..., chunk_traces: _Optional[_Iterable[_Union[HopTrace, _Mapping]]] = ...) -> None: ...

class HopTrace(_message.Message):
    __slots__ = ("node", "address", "start", "end", "queue_ms", "compute_ms", "total_ms", "downstream_ms", "bytes_in", "bytes_out", "codec", "handle", "repair", "batch", "tp", "collective_ms", "collective_bytes", "input_digest", "output_digest", "signature", "mac", "session_key")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_MS_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    start: int
    end: int
    queue_ms: float
    compute_ms: float
    total_ms: float
    downstream_ms: float
    bytes_in: int
    bytes_out: int
    codec: str
    handle: KVHandle
    repair: str
    batch: int
    tp: int
    collective_ms: float
    collective_bytes: int
    input_digest: bytes
    output_digest: bytes
    signature: bytes
    mac: bytes
    session_key: SessionKey
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., downstream_ms: _Optional[float] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., codec: _Optional[str] = ..., handle: _Optional[_Union[KVHandle, _Mapping]] = ..., repair: _Optional[str] = ..., batch: _Optional[int] = ..., tp: _Optional[int] = ..., collective_ms: _Optional[float] = ..., collective_bytes: _Optional[int] = ..., input_digest: _Optional[bytes] = ..., output_digest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., mac: _Optional[bytes] = ..., session_key: _Optional[_Union[SessionKey, _Mapping]] = ...) -> None: ...

class KVHandle(_message.Message):
    __slots__ = ("session_id", "start", "end", "length", "epoch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    start: int
    end: int
    length: int
    epoch: bytes
    def __init__(self, session_id: _Optional[bytes] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., length: _Optional[int] = ..., epoch: _Optional[bytes] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session_id", "this_hop_only")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    THIS_HOP_ONLY_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    this_hop_only: bool
    def __init__(self, session_id: _Optional[bytes] = ..., this_hop_only: _Optional[bool] = ...) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class OutputsRequest(_message.Message):
    __slots__ = ("session_id", "start", "end")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    start: int
    end: int
    def __init__(self, session_id: _Optional[bytes] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class SentChunk(_message.Message):
    __slots__ = ("pos", "activations", "trace")
    POS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    pos: int
    activations: Activations
    trace: HopTrace
    def __init__(self, pos: _Optional[int] = ..., activations: _Optional[_Union[Activations, _Mapping]] = ..., trace: _Optional[_Union[HopTrace, _Mapping]] = ...) -> None: ...

class OutputsReply(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[SentChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[SentChunk, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "address", "model_id", "start", "end", "n_units", "device", "dtype", "sessions", "kv_bytes_used", "kv_bytes_budget", "queue_depth", "step_ms_p50", "epoch", "protocol_version", "tp_rank", "tp_size", "public_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    N_UNITS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_BUDGET_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_P50_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    model_id: str
    start: int
    end: int
    n_units: int
    device: str
    dtype: str
    sessions: int
    kv_bytes_used: int
    kv_bytes_budget: int
    queue_depth: int
    step_ms_p50: float
    epoch: bytes
    protocol_version: int
    tp_rank: int
    tp_size: int
    public_key: bytes
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., model_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., n_units: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., sessions: _Optional[int] = ..., kv_bytes_used: _Optional[int] = ..., kv_bytes_budget: _Optional[int] = ..., queue_depth: _Optional[int] = ..., step_ms_p50: _Optional[float] = ..., epoch: _Optional[bytes] = ..., protocol_version: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., public_key: _Optional[bytes] = ...) -> None: ...
