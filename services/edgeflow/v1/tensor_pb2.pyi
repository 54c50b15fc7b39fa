from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("rows", "cols", "columns", "data")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    columns: _containers.RepeatedScalarFieldContainer[str]
    data: bytes
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., columns: _Optional[_Iterable[str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("source", "score", "mode", "age_seconds")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    source: str
    score: float
    mode: str
    age_seconds: float
    def __init__(self, source: _Optional[str] = ..., score: _Optional[float] = ..., mode: _Optional[str] = ..., age_seconds: _Optional[float] = ...) -> None: ...

class Edge(_message.Message):
    __slots__ = ("target", "score", "model_score", "provenance", "social_proof")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SCORE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    SOCIAL_PROOF_FIELD_NUMBER: _ClassVar[int]
    target: int
    score: float
    model_score: float
    provenance: _containers.RepeatedCompositeFieldContainer[Provenance]
    social_proof: SocialProof
    def __init__(self, target: _Optional[int] = ..., score: _Optional[float] = ..., model_score: _Optional[float] = ..., provenance: _Optional[_Iterable[_Union[Provenance, _Mapping]]] = ..., social_proof: _Optional[_Union[SocialProof, _Mapping]] = ...) -> None: ...

class SocialProof(_message.Message):
    __slots__ = ("mutual_count", "mutual_ids")
    MUTUAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    MUTUAL_IDS_FIELD_NUMBER: _ClassVar[int]
    mutual_count: int
    mutual_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, mutual_count: _Optional[int] = ..., mutual_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DroppedItem(_message.Message):
    __slots__ = ("target", "reason", "node")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    target: int
    reason: str
    node: str
    def __init__(self, target: _Optional[int] = ..., reason: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...
