"""The Explanation of one explain run: the served edges' feature rows and the dropped items."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeflow import tensor
from edgeflow.gateway.engine import Outcome, Scored
from edgeflow.v1 import gateway_pb2, tensor_pb2


def explanation(outcome: Outcome) -> gateway_pb2.Explanation:
    """Feature rows for the served edges, in edge order, and every dropped item with the node
    that dropped it (both empty unless the engine ran with explain)."""
    targets = np.fromiter((e.target for e in outcome.frame.edges), np.int64)
    out = gateway_pb2.Explanation(features=feature_rows(targets, outcome.scored))
    out.dropped.extend(outcome.dropped_items)
    return out


def feature_rows(targets: np.ndarray, scored: Sequence[Scored]) -> tensor_pb2.Tensor:
    """One row per target with the first scoring node's feature columns: the row that node
    was given, else a later node's with the same columns, else NaN (an edge only an offline
    list produced, or features that fell back)."""
    if not scored:
        return tensor.pack(np.zeros((targets.size, 0), np.float32), [])
    columns = list(scored[0].features.columns)
    out = np.full((targets.size, len(columns)), np.nan, dtype=np.float32)
    missing = np.ones(targets.size, dtype=bool)
    for s in scored:
        if list(s.features.columns) != columns or not s.ids.size or not missing.any():
            continue
        rows = tensor.unpack(s.features)
        if rows.shape[0] != s.ids.size:
            continue
        order = np.argsort(s.ids, kind="stable")
        pos = np.searchsorted(s.ids, targets, sorter=order).clip(max=s.ids.size - 1)
        found = missing & (s.ids[order[pos]] == targets)
        out[found] = rows[order[pos[found]]]
        missing &= ~found
    return tensor.pack(out, columns)
