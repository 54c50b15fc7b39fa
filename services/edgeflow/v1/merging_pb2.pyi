from edgeflow.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoredList(_message.Message):
    __slots__ = ("name", "ids", "scores", "weight", "mode", "age_seconds", "model_column", "sources")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_COLUMN_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    name: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _tensor_pb2.Tensor
    weight: float
    mode: str
    age_seconds: float
    model_column: int
    sources: _containers.RepeatedCompositeFieldContainer[SourceInfo]
    def __init__(self, name: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weight: _Optional[float] = ..., mode: _Optional[str] = ..., age_seconds: _Optional[float] = ..., model_column: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[SourceInfo, _Mapping]]] = ...) -> None: ...

class SourceInfo(_message.Message):
    __slots__ = ("name", "mode", "age_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    mode: str
    age_seconds: float
    def __init__(self, name: _Optional[str] = ..., mode: _Optional[str] = ..., age_seconds: _Optional[float] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("source", "max")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    source: str
    max: int
    def __init__(self, source: _Optional[str] = ..., max: _Optional[int] = ...) -> None: ...

class MergeRequest(_message.Message):
    __slots__ = ("member", "lists", "k", "filters", "quotas", "explain", "impressions", "diversity")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    LISTS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    IMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    member: int
    lists: _containers.RepeatedCompositeFieldContainer[ScoredList]
    k: int
    filters: _containers.RepeatedScalarFieldContainer[str]
    quotas: _containers.RepeatedCompositeFieldContainer[Quota]
    explain: bool
    impressions: Impressions
    diversity: Diversity
    def __init__(self, member: _Optional[int] = ..., lists: _Optional[_Iterable[_Union[ScoredList, _Mapping]]] = ..., k: _Optional[int] = ..., filters: _Optional[_Iterable[str]] = ..., quotas: _Optional[_Iterable[_Union[Quota, _Mapping]]] = ..., explain: _Optional[bool] = ..., impressions: _Optional[_Union[Impressions, _Mapping]] = ..., diversity: _Optional[_Union[Diversity, _Mapping]] = ...) -> None: ...

class Diversity(_message.Message):
    __slots__ = ("k", "window", "mmr_lambda", "pool")
    K_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MMR_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    k: int
    window: int
    mmr_lambda: float
    pool: int
    def __init__(self, k: _Optional[int] = ..., window: _Optional[int] = ..., mmr_lambda: _Optional[float] = ..., pool: _Optional[int] = ...) -> None: ...

class Impressions(_message.Message):
    __slots__ = ("demote_after", "suppress_after", "for_seconds", "demote_factor")
    DEMOTE_AFTER_FIELD_NUMBER: _ClassVar[int]
    SUPPRESS_AFTER_FIELD_NUMBER: _ClassVar[int]
    FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEMOTE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    demote_after: int
    suppress_after: int
    for_seconds: float
    demote_factor: float
    def __init__(self, demote_after: _Optional[int] = ..., suppress_after: _Optional[int] = ..., for_seconds: _Optional[float] = ..., demote_factor: _Optional[float] = ...) -> None: ...

class DropCount(_message.Message):
    __slots__ = ("reason", "count")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    count: int
    def __init__(self, reason: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class MergeResponse(_message.Message):
    __slots__ = ("edges", "dropped", "dropped_items")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Edge]
    dropped: _containers.RepeatedCompositeFieldContainer[DropCount]
    dropped_items: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.DroppedItem]
    def __init__(self, edges: _Optional[_Iterable[_Union[_tensor_pb2.Edge, _Mapping]]] = ..., dropped: _Optional[_Iterable[_Union[DropCount, _Mapping]]] = ..., dropped_items: _Optional[_Iterable[_Union[_tensor_pb2.DroppedItem, _Mapping]]] = ...) -> None: ...

class FilterRequest(_message.Message):
    __slots__ = ("member", "ids", "filters", "explain")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    member: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    filters: _containers.RepeatedScalarFieldContainer[str]
    explain: bool
    def __init__(self, member: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., filters: _Optional[_Iterable[str]] = ..., explain: _Optional[bool] = ...) -> None: ...

class FilterResponse(_message.Message):
    __slots__ = ("keep", "dropped", "dropped_items")
    KEEP_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    keep: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedCompositeFieldContainer[DropCount]
    dropped_items: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.DroppedItem]
    def __init__(self, keep: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[_Union[DropCount, _Mapping]]] = ..., dropped_items: _Optional[_Iterable[_Union[_tensor_pb2.DroppedItem, _Mapping]]] = ...) -> None: ...
