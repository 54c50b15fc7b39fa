from edgeflow.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecommendRequest(_message.Message):
    __slots__ = ("surface", "member", "k", "debug", "request_id", "explain")
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    DEBUG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    surface: str
    member: int
    k: int
    debug: bool
    request_id: str
    explain: bool
    def __init__(self, surface: _Optional[str] = ..., member: _Optional[int] = ..., k: _Optional[int] = ..., debug: _Optional[bool] = ..., request_id: _Optional[str] = ..., explain: _Optional[bool] = ...) -> None: ...

class NodeTrace(_message.Message):
    __slots__ = ("node", "op", "status", "items_in", "items_out", "start_ms", "duration_ms", "fallback", "error", "inputs", "note")
    NODE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_IN_FIELD_NUMBER: _ClassVar[int]
    ITEMS_OUT_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    node: str
    op: str
    status: str
    items_in: int
    items_out: int
    start_ms: float
    duration_ms: float
    fallback: str
    error: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    note: str
    def __init__(self, node: _Optional[str] = ..., op: _Optional[str] = ..., status: _Optional[str] = ..., items_in: _Optional[int] = ..., items_out: _Optional[int] = ..., start_ms: _Optional[float] = ..., duration_ms: _Optional[float] = ..., fallback: _Optional[str] = ..., error: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., note: _Optional[str] = ...) -> None: ...

class Funnel(_message.Message):
    __slots__ = ("nodes", "total_ms", "dropped")
    class DroppedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeTrace]
    total_ms: float
    dropped: _containers.ScalarMap[str, int]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeTrace, _Mapping]]] = ..., total_ms: _Optional[float] = ..., dropped: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("edges", "partial", "degraded", "surface", "workflow", "request_id", "funnel", "assignments", "explanation", "rerouted")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FUNNEL_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    REROUTED_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Edge]
    partial: bool
    degraded: _containers.RepeatedScalarFieldContainer[str]
    surface: str
    workflow: str
    request_id: str
    funnel: Funnel
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    explanation: Explanation
    rerouted: _containers.RepeatedCompositeFieldContainer[Reroute]
    def __init__(self, edges: _Optional[_Iterable[_Union[_tensor_pb2.Edge, _Mapping]]] = ..., partial: _Optional[bool] = ..., degraded: _Optional[_Iterable[str]] = ..., surface: _Optional[str] = ..., workflow: _Optional[str] = ..., request_id: _Optional[str] = ..., funnel: _Optional[_Union[Funnel, _Mapping]] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ..., rerouted: _Optional[_Iterable[_Union[Reroute, _Mapping]]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("experiment", "variant")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    variant: str
    def __init__(self, experiment: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("features", "dropped")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    features: _tensor_pb2.Tensor
    dropped: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.DroppedItem]
    def __init__(self, features: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., dropped: _Optional[_Iterable[_Union[_tensor_pb2.DroppedItem, _Mapping]]] = ...) -> None: ...

class ListSurfacesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSurfacesResponse(_message.Message):
    __slots__ = ("surfaces", "statuses", "rejected")
    SURFACES_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    surfaces: _containers.RepeatedScalarFieldContainer[str]
    statuses: _containers.RepeatedCompositeFieldContainer[SurfaceStatus]
    rejected: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, surfaces: _Optional[_Iterable[str]] = ..., statuses: _Optional[_Iterable[_Union[SurfaceStatus, _Mapping]]] = ..., rejected: _Optional[_Iterable[str]] = ...) -> None: ...

class SurfaceStatus(_message.Message):
    __slots__ = ("surface", "workflow", "models_checked", "check_error", "problems", "reroutes")
    SURFACE_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    MODELS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    CHECK_ERROR_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    REROUTES_FIELD_NUMBER: _ClassVar[int]
    surface: str
    workflow: str
    models_checked: bool
    check_error: str
    problems: _containers.RepeatedScalarFieldContainer[str]
    reroutes: _containers.RepeatedCompositeFieldContainer[Reroute]
    def __init__(self, surface: _Optional[str] = ..., workflow: _Optional[str] = ..., models_checked: _Optional[bool] = ..., check_error: _Optional[str] = ..., problems: _Optional[_Iterable[str]] = ..., reroutes: _Optional[_Iterable[_Union[Reroute, _Mapping]]] = ...) -> None: ...

class Reroute(_message.Message):
    __slots__ = ("experiment", "variant", "served")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    variant: str
    served: str
    def __init__(self, experiment: _Optional[str] = ..., variant: _Optional[str] = ..., served: _Optional[str] = ...) -> None: ...

class MemberEvent(_message.Message):
    __slots__ = ("type", "member", "target", "features", "event_id", "time")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[MemberEvent.Type]
        CONNECT: _ClassVar[MemberEvent.Type]
        DISCONNECT: _ClassVar[MemberEvent.Type]
        BLOCK: _ClassVar[MemberEvent.Type]
        DISMISS: _ClassVar[MemberEvent.Type]
        FOLLOW: _ClassVar[MemberEvent.Type]
        PROFILE_CHANGE: _ClassVar[MemberEvent.Type]
        DEACTIVATE: _ClassVar[MemberEvent.Type]
        REACTIVATE: _ClassVar[MemberEvent.Type]
    TYPE_UNSPECIFIED: MemberEvent.Type
    CONNECT: MemberEvent.Type
    DISCONNECT: MemberEvent.Type
    BLOCK: MemberEvent.Type
    DISMISS: MemberEvent.Type
    FOLLOW: MemberEvent.Type
    PROFILE_CHANGE: MemberEvent.Type
    DEACTIVATE: MemberEvent.Type
    REACTIVATE: MemberEvent.Type
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    type: MemberEvent.Type
    member: int
    target: int
    features: _containers.ScalarMap[str, float]
    event_id: str
    time: float
    def __init__(self, type: _Optional[_Union[MemberEvent.Type, str]] = ..., member: _Optional[int] = ..., target: _Optional[int] = ..., features: _Optional[_Mapping[str, float]] = ..., event_id: _Optional[str] = ..., time: _Optional[float] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[MemberEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[MemberEvent, _Mapping]]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("entry_ids", "event_ids", "published", "duplicates")
    ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    entry_ids: _containers.RepeatedScalarFieldContainer[str]
    event_ids: _containers.RepeatedScalarFieldContainer[str]
    published: int
    duplicates: int
    def __init__(self, entry_ids: _Optional[_Iterable[str]] = ..., event_ids: _Optional[_Iterable[str]] = ..., published: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...
