"""Packing of float32 matrices into the wire Tensor message (row-major, little-endian)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeflow.v1 import tensor_pb2

_F32 = np.dtype("<f4")


def pack(matrix: np.ndarray, columns: Sequence[str]) -> tensor_pb2.Tensor:
    """Pack a (rows, cols) or (rows,) array; a 1-D array is one column."""
    arr = np.asarray(matrix, dtype=_F32)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise ValueError(f"tensor must be 1-D or 2-D, got shape {arr.shape}")
    if arr.shape[1] != len(columns):
        raise ValueError(f"tensor has {arr.shape[1]} columns but {len(columns)} column names")
    return tensor_pb2.Tensor(
        rows=arr.shape[0],
        cols=arr.shape[1],
        columns=list(columns),
        data=np.ascontiguousarray(arr).tobytes(),
    )


def unpack(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Return a read-only (rows, cols) float32 view; raises ValueError on a size mismatch."""
    expected = tensor.rows * tensor.cols * 4
    if len(tensor.data) != expected:
        raise ValueError(
            f"tensor data is {len(tensor.data)} bytes but shape {tensor.rows}x{tensor.cols} "
            f"needs {expected}"
        )
    if tensor.columns and len(tensor.columns) != tensor.cols:
        raise ValueError(f"tensor has {tensor.cols} columns but {len(tensor.columns)} column names")
    return np.frombuffer(tensor.data, dtype=_F32).reshape(tensor.rows, tensor.cols)


def ids(values: Sequence[int] | np.ndarray) -> np.ndarray:
    """Member ids from a repeated int64 field as an int64 array."""
    return np.asarray(values, dtype=np.int64)
