"""Tensors of the Open Inference Protocol v2: numpy arrays <-> raw or typed contents.

Both sides of the protocol use it: the scoring service decodes inputs and encodes outputs,
the gateway's `scoring.remote` op encodes inputs and decodes outputs. A tensor travels either
as raw little-endian bytes (one `raw_*_contents` entry per tensor) or in the typed field of
`InferTensorContents` that matches its datatype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from edgeflow.v1.inference import grpc_predict_v2_pb2 as pb

# datatype -> (typed contents field, or None where only raw bytes can carry it; numpy dtype)
DATATYPES: dict[str, tuple[str | None, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "UINT8": ("uint_contents", np.dtype("<u1")),
    "UINT16": ("uint_contents", np.dtype("<u2")),
    "UINT32": ("uint_contents", np.dtype("<u4")),
    "UINT64": ("uint64_contents", np.dtype("<u8")),
    "INT8": ("int_contents", np.dtype("<i1")),
    "INT16": ("int_contents", np.dtype("<i2")),
    "INT32": ("int_contents", np.dtype("<i4")),
    "INT64": ("int64_contents", np.dtype("<i8")),
    "FP16": (None, np.dtype("<f2")),
    "FP32": ("fp32_contents", np.dtype("<f4")),
    "FP64": ("fp64_contents", np.dtype("<f8")),
}
_BY_DTYPE = {dtype.newbyteorder("<").str: name for name, (_, dtype) in DATATYPES.items()}


class TensorError(ValueError):
    """A tensor that cannot be decoded; the message names the tensor and the problem."""


class WireTensor(Protocol):
    """What input and output tensor messages have in common."""

    @property
    def name(self) -> str: ...
    @property
    def datatype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def contents(self) -> pb.InferTensorContents: ...


def datatype_of(array: np.ndarray) -> str:
    try:
        return _BY_DTYPE[array.dtype.newbyteorder("<").str]
    except KeyError:
        raise TensorError(f"numpy dtype {array.dtype} has no OIP datatype") from None


def decode(tensor: WireTensor, raw: bytes | None, kind: str) -> np.ndarray:
    """The tensor as an array of its shape; `raw` is its raw contents entry, if any.

    `kind` ("input" or "output") only words the errors.
    """
    where = f"{kind} {tensor.name!r}"
    spec = DATATYPES.get(tensor.datatype)
    if spec is None:
        raise TensorError(
            f"{where}: unsupported datatype {tensor.datatype!r}; supported: {sorted(DATATYPES)}"
        )
    field, dtype = spec
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"{where}: shape {list(shape)} has a negative dimension")
    count = int(np.prod(shape, dtype=np.int64))
    typed = [f.name for f, _ in tensor.contents.ListFields()]
    if raw is not None:
        if typed:
            raise TensorError(f"{where}: has both raw contents and typed {typed[0]}")
        if len(raw) != count * dtype.itemsize:
            raise TensorError(
                f"{where}: raw contents are {len(raw)} bytes but {tensor.datatype} "
                f"{list(shape)} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if field is None:
        raise TensorError(f"{where}: {tensor.datatype} can only travel as raw contents")
    stray = [f for f in typed if f != field]
    if stray:
        raise TensorError(f"{where}: {tensor.datatype} belongs in {field}, not {stray[0]}")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise TensorError(
            f"{where}: {field} holds {len(values)} values but shape {list(shape)} needs {count}"
        )
    return np.asarray(values, dtype=dtype).reshape(shape)


def raw_entries(raws: Sequence[bytes], tensors: int, kind: str) -> list[bytes | None]:
    """The raw contents entry of each tensor, or None for each where none are used."""
    if not raws:
        return [None] * tensors
    if len(raws) != tensors:
        raise TensorError(
            f"raw_{kind}_contents has {len(raws)} entries for {tensors} {kind} tensor(s); "
            "it needs one per tensor, in order"
        )
    return list(raws)


def to_raw(array: np.ndarray) -> bytes:
    """Row-major little-endian bytes of the array."""
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


def fill_contents(contents: pb.InferTensorContents, array: np.ndarray) -> str:
    """Write the array into its typed field; returns its datatype."""
    datatype = datatype_of(array)
    field = DATATYPES[datatype][0]
    if field is None:
        raise TensorError(f"{datatype} can only travel as raw contents")
    getattr(contents, field).extend(np.ravel(array).tolist())
    return datatype
