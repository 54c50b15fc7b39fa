from edgeflow.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetFeaturesRequest(_message.Message):
    __slots__ = ("member", "entities", "columns")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    member: int
    entities: _containers.RepeatedScalarFieldContainer[int]
    columns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, member: _Optional[int] = ..., entities: _Optional[_Iterable[int]] = ..., columns: _Optional[_Iterable[str]] = ...) -> None: ...

class GetFeaturesResponse(_message.Message):
    __slots__ = ("features", "missing")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    features: _tensor_pb2.Tensor
    missing: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, features: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., missing: _Optional[_Iterable[int]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("entities", "values")
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    entities: _containers.RepeatedScalarFieldContainer[int]
    values: _tensor_pb2.Tensor
    def __init__(self, entities: _Optional[_Iterable[int]] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("pushed",)
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    pushed: int
    def __init__(self, pushed: _Optional[int] = ...) -> None: ...
