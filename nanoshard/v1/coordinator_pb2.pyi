from nanoshard.v1 import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Capacity(_message.Message):
    __slots__ = ("device", "dtype", "memory_bytes", "block_ms", "head_ms")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_MS_FIELD_NUMBER: _ClassVar[int]
    HEAD_MS_FIELD_NUMBER: _ClassVar[int]
    device: str
    dtype: str
    memory_bytes: int
    block_ms: float
    head_ms: float
    def __init__(self, device: _Optional[str] = ..., dtype: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., block_ms: _Optional[float] = ..., head_ms: _Optional[float] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("sessions", "kv_bytes_used", "kv_bytes_budget", "queue_depth", "step_ms_p50", "tp_link", "peer_links", "live")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_BUDGET_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_P50_FIELD_NUMBER: _ClassVar[int]
    TP_LINK_FIELD_NUMBER: _ClassVar[int]
    PEER_LINKS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    sessions: int
    kv_bytes_used: int
    kv_bytes_budget: int
    queue_depth: int
    step_ms_p50: float
    tp_link: GroupLink
    peer_links: _containers.RepeatedCompositeFieldContainer[PeerLink]
    live: LiveLoad
    def __init__(self, sessions: _Optional[int] = ..., kv_bytes_used: _Optional[int] = ..., kv_bytes_budget: _Optional[int] = ..., queue_depth: _Optional[int] = ..., step_ms_p50: _Optional[float] = ..., tp_link: _Optional[_Union[GroupLink, _Mapping]] = ..., peer_links: _Optional[_Iterable[_Union[PeerLink, _Mapping]]] = ..., live: _Optional[_Union[LiveLoad, _Mapping]] = ...) -> None: ...

class LiveLoad(_message.Message):
    __slots__ = ("decode_ms", "decode_ms_p90", "prefill_ms_per_token", "tokens_per_s", "sampled_per_s", "speed_ratio", "idle_s", "next_hops")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_P90_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_PER_S_FIELD_NUMBER: _ClassVar[int]
    SPEED_RATIO_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOPS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    decode_ms_p90: float
    prefill_ms_per_token: float
    tokens_per_s: float
    sampled_per_s: float
    speed_ratio: float
    idle_s: float
    next_hops: _containers.RepeatedCompositeFieldContainer[HopLink]
    def __init__(self, decode_ms: _Optional[float] = ..., decode_ms_p90: _Optional[float] = ..., prefill_ms_per_token: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., sampled_per_s: _Optional[float] = ..., speed_ratio: _Optional[float] = ..., idle_s: _Optional[float] = ..., next_hops: _Optional[_Iterable[_Union[HopLink, _Mapping]]] = ...) -> None: ...

class HopLink(_message.Message):
    __slots__ = ("address", "rtt_ms", "bytes_per_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    rtt_ms: float
    bytes_per_s: float
    def __init__(self, address: _Optional[str] = ..., rtt_ms: _Optional[float] = ..., bytes_per_s: _Optional[float] = ...) -> None: ...

class PeerLink(_message.Message):
    __slots__ = ("address", "rtt_ms", "self_rtt_ms", "bytes_per_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    SELF_RTT_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    rtt_ms: float
    self_rtt_ms: float
    bytes_per_s: float
    def __init__(self, address: _Optional[str] = ..., rtt_ms: _Optional[float] = ..., self_rtt_ms: _Optional[float] = ..., bytes_per_s: _Optional[float] = ...) -> None: ...

class GroupLink(_message.Message):
    __slots__ = ("probe_ms", "bytes_per_s", "live_ms")
    PROBE_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    LIVE_MS_FIELD_NUMBER: _ClassVar[int]
    probe_ms: float
    bytes_per_s: float
    live_ms: float
    def __init__(self, probe_ms: _Optional[float] = ..., bytes_per_s: _Optional[float] = ..., live_ms: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("node_id", "name", "address", "protocol_version", "swarm", "model_id", "capacity", "held_start", "held_end", "store_port", "public_key", "proof", "proof_ms", "tls")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SWARM_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HELD_START_FIELD_NUMBER: _ClassVar[int]
    HELD_END_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    PROOF_MS_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    address: str
    protocol_version: int
    swarm: str
    model_id: str
    capacity: Capacity
    held_start: int
    held_end: int
    store_port: int
    public_key: bytes
    proof: bytes
    proof_ms: int
    tls: bool
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., protocol_version: _Optional[int] = ..., swarm: _Optional[str] = ..., model_id: _Optional[str] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., held_start: _Optional[int] = ..., held_end: _Optional[int] = ..., store_port: _Optional[int] = ..., public_key: _Optional[bytes] = ..., proof: _Optional[bytes] = ..., proof_ms: _Optional[int] = ..., tls: _Optional[bool] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("idle", "start", "end", "version", "tp", "why_idle")
    IDLE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    WHY_IDLE_FIELD_NUMBER: _ClassVar[int]
    idle: bool
    start: int
    end: int
    version: int
    tp: TpGroup
    why_idle: str
    def __init__(self, idle: _Optional[bool] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., version: _Optional[int] = ..., tp: _Optional[_Union[TpGroup, _Mapping]] = ..., why_idle: _Optional[str] = ...) -> None: ...

class TpGroup(_message.Message):
    __slots__ = ("id", "rank", "size", "members", "rendezvous", "backend")
    ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    id: str
    rank: int
    size: int
    members: _containers.RepeatedScalarFieldContainer[str]
    rendezvous: str
    backend: str
    def __init__(self, id: _Optional[str] = ..., rank: _Optional[int] = ..., size: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ..., rendezvous: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("model_id", "assignment", "heartbeat_interval_s", "coordinator_epoch")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_EPOCH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    assignment: Assignment
    heartbeat_interval_s: float
    coordinator_epoch: bytes
    def __init__(self, model_id: _Optional[str] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., heartbeat_interval_s: _Optional[float] = ..., coordinator_epoch: _Optional[bytes] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "ready", "start", "end", "load", "tp_group", "gave_up_group")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    TP_GROUP_FIELD_NUMBER: _ClassVar[int]
    GAVE_UP_GROUP_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    ready: bool
    start: int
    end: int
    load: NodeLoad
    tp_group: str
    gave_up_group: str
    def __init__(self, node_id: _Optional[str] = ..., ready: _Optional[bool] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., tp_group: _Optional[str] = ..., gave_up_group: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("assignment", "coordinator_epoch", "peers")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    coordinator_epoch: bytes
    peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., coordinator_epoch: _Optional[bytes] = ..., peers: _Optional[_Iterable[str]] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("avoid", "peek")
    AVOID_FIELD_NUMBER: _ClassVar[int]
    PEEK_FIELD_NUMBER: _ClassVar[int]
    avoid: _containers.RepeatedScalarFieldContainer[str]
    peek: bool
    def __init__(self, avoid: _Optional[_Iterable[str]] = ..., peek: _Optional[bool] = ...) -> None: ...

class RouteReply(_message.Message):
    __slots__ = ("hops", "model_id", "n_units")
    HOPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    N_UNITS_FIELD_NUMBER: _ClassVar[int]
    hops: _containers.RepeatedCompositeFieldContainer[_node_pb2.Hop]
    model_id: str
    n_units: int
    def __init__(self, hops: _Optional[_Iterable[_Union[_node_pb2.Hop, _Mapping]]] = ..., model_id: _Optional[str] = ..., n_units: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "name", "address", "capacity", "assignment", "ready", "ready_start", "ready_end", "load", "last_heartbeat_s", "healthy", "checks_passed", "checks_failed", "excluded", "heartbeating", "slowdown", "own_ratio")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    READY_START_FIELD_NUMBER: _ClassVar[int]
    READY_END_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CHECKS_PASSED_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FAILED_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEATING_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    OWN_RATIO_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    address: str
    capacity: Capacity
    assignment: Assignment
    ready: bool
    ready_start: int
    ready_end: int
    load: NodeLoad
    last_heartbeat_s: float
    healthy: bool
    checks_passed: int
    checks_failed: int
    excluded: str
    heartbeating: bool
    slowdown: float
    own_ratio: float
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., capacity: _Optional[_Union[Capacity, _Mapping]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., ready: _Optional[bool] = ..., ready_start: _Optional[int] = ..., ready_end: _Optional[int] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., last_heartbeat_s: _Optional[float] = ..., healthy: _Optional[bool] = ..., checks_passed: _Optional[int] = ..., checks_failed: _Optional[int] = ..., excluded: _Optional[str] = ..., heartbeating: _Optional[bool] = ..., slowdown: _Optional[float] = ..., own_ratio: _Optional[float] = ...) -> None: ...

class UnitCoverage(_message.Message):
    __slots__ = ("unit", "name", "replicas")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    unit: int
    name: str
    replicas: int
    def __init__(self, unit: _Optional[int] = ..., name: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class SwarmStatus(_message.Message):
    __slots__ = ("swarm", "model_id", "model_name", "n_units", "nodes", "units", "tokens_per_s", "replicas_target", "placement_version", "measured_tokens_per_s")
    SWARM_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    N_UNITS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_TARGET_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEASURED_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    swarm: str
    model_id: str
    model_name: str
    n_units: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    units: _containers.RepeatedCompositeFieldContainer[UnitCoverage]
    tokens_per_s: float
    replicas_target: int
    placement_version: int
    measured_tokens_per_s: float
    def __init__(self, swarm: _Optional[str] = ..., model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., n_units: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., units: _Optional[_Iterable[_Union[UnitCoverage, _Mapping]]] = ..., tokens_per_s: _Optional[float] = ..., replicas_target: _Optional[int] = ..., placement_version: _Optional[int] = ..., measured_tokens_per_s: _Optional[float] = ...) -> None: ...

class CheckOpinion(_message.Message):
    __slots__ = ("address", "digest", "error")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    address: str
    digest: bytes
    error: float
    def __init__(self, address: _Optional[str] = ..., digest: _Optional[bytes] = ..., error: _Optional[float] = ...) -> None: ...

class CheckReport(_message.Message):
    __slots__ = ("start", "end", "pos", "tokens", "codec", "input_digest", "tolerance", "checked", "replicas", "evidence")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    POS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    pos: int
    tokens: int
    codec: str
    input_digest: bytes
    tolerance: float
    checked: CheckOpinion
    replicas: _containers.RepeatedCompositeFieldContainer[CheckOpinion]
    evidence: CheckEvidence
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., pos: _Optional[int] = ..., tokens: _Optional[int] = ..., codec: _Optional[str] = ..., input_digest: _Optional[bytes] = ..., tolerance: _Optional[float] = ..., checked: _Optional[_Union[CheckOpinion, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[CheckOpinion, _Mapping]]] = ..., evidence: _Optional[_Union[CheckEvidence, _Mapping]] = ...) -> None: ...

class CheckInput(_message.Message):
    __slots__ = ("pos", "tokens", "activations")
    POS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    pos: int
    tokens: _node_pb2.Tokens
    activations: _node_pb2.Activations
    def __init__(self, pos: _Optional[int] = ..., tokens: _Optional[_Union[_node_pb2.Tokens, _Mapping]] = ..., activations: _Optional[_Union[_node_pb2.Activations, _Mapping]] = ...) -> None: ...

class CheckEvidence(_message.Message):
    __slots__ = ("inputs", "checked_output", "replica_outputs", "weights", "checked_trace", "session_id", "has_token", "token", "replica_traces", "replica_session_ids")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_TRACE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    REPLICA_TRACES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[CheckInput]
    checked_output: _node_pb2.Activations
    replica_outputs: _containers.RepeatedCompositeFieldContainer[_node_pb2.Activations]
    weights: str
    checked_trace: _node_pb2.HopTrace
    session_id: bytes
    has_token: bool
    token: int
    replica_traces: _containers.RepeatedCompositeFieldContainer[_node_pb2.HopTrace]
    replica_session_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, inputs: _Optional[_Iterable[_Union[CheckInput, _Mapping]]] = ..., checked_output: _Optional[_Union[_node_pb2.Activations, _Mapping]] = ..., replica_outputs: _Optional[_Iterable[_Union[_node_pb2.Activations, _Mapping]]] = ..., weights: _Optional[str] = ..., checked_trace: _Optional[_Union[_node_pb2.HopTrace, _Mapping]] = ..., session_id: _Optional[bytes] = ..., has_token: _Optional[bool] = ..., token: _Optional[int] = ..., replica_traces: _Optional[_Iterable[_Union[_node_pb2.HopTrace, _Mapping]]] = ..., replica_session_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CheckReply(_message.Message):
    __slots__ = ("excluded",)
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    excluded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, excluded: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelCardRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    sha256: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class UnitManifest(_message.Message):
    __slots__ = ("unit", "tensors")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    unit: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    def __init__(self, unit: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ...) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("model_id", "name", "config_json", "vocab_json", "merges_txt", "units")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    VOCAB_JSON_FIELD_NUMBER: _ClassVar[int]
    MERGES_TXT_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    name: str
    config_json: str
    vocab_json: bytes
    merges_txt: bytes
    units: _containers.RepeatedCompositeFieldContainer[UnitManifest]
    def __init__(self, model_id: _Optional[str] = ..., name: _Optional[str] = ..., config_json: _Optional[str] = ..., vocab_json: _Optional[bytes] = ..., merges_txt: _Optional[bytes] = ..., units: _Optional[_Iterable[_Union[UnitManifest, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "offset", "total", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    total: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
