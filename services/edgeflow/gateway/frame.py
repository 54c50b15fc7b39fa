"""What flows between workflow nodes inside one request."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeflow.v1 import tensor_pb2


@dataclass(frozen=True)
class SourceInfo:
    mode: str  # online, offline, nearline, remote
    age_seconds: float = 0.0


@dataclass
class Frame:
    """Candidates with the score of every source that produced them, and what later nodes
    added: a feature matrix, a model score, or the final ranked edges."""

    ids: np.ndarray  # int64 member ids, one row each
    sources: dict[str, np.ndarray] = field(default_factory=dict)  # node -> score, NaN if absent
    info: dict[str, SourceInfo] = field(default_factory=dict)
    features: tensor_pb2.Tensor | None = None
    score: np.ndarray | None = None  # model score per row
    edges: list = field(default_factory=list)  # ranked output: edgeflow.v1.Edge messages
    dropped: dict[str, int] = field(default_factory=dict)
    # Why the node that made this frame served nothing, when it knows (NodeTrace.note).
    note: str = ""
    # Set when the node's service was down and the gateway ran its op itself: why.
    ran_here: str = ""

    def __len__(self) -> int:
        return len(self.edges) if self.edges else int(self.ids.size)

    @classmethod
    def empty(cls) -> Frame:
        return cls(ids=np.zeros(0, dtype=np.int64))

    def take(self, rows: np.ndarray) -> Frame:
        """The subset of rows, in the given order (features are dropped: rows changed)."""
        return Frame(
            ids=self.ids[rows],
            sources={k: v[rows] for k, v in self.sources.items()},
            info=dict(self.info),
            score=None if self.score is None else self.score[rows],
        )


def union(frames: list[Frame]) -> Frame:
    """Deduplicate candidates of several frames, keeping first-seen order and every source."""
    nonempty = [f for f in frames if f.ids.size]
    if not nonempty:
        merged = Frame.empty()
        for f in frames:
            merged.info.update(f.info)
        return merged
    frames = nonempty
    if len(frames) == 1:
        return frames[0]
    all_ids = np.concatenate([f.ids for f in frames])
    uniq, first, inverse = np.unique(all_ids, return_index=True, return_inverse=True)
    order = np.argsort(first)  # unique ids by first appearance
    ids = uniq[order]
    out_row = np.empty(order.size, dtype=np.intp)
    out_row[order] = np.arange(order.size)
    rows_of_all = out_row[inverse.reshape(-1)]  # output row of each input row
    sources: dict[str, np.ndarray] = {}
    info: dict[str, SourceInfo] = {}
    start = 0
    for f in frames:
        rows = rows_of_all[start : start + f.ids.size]
        start += f.ids.size
        for name, vals in f.sources.items():
            col = sources.get(name)
            if col is None:  # a new source: every row of it is still absent
                col = sources[name] = np.full(ids.size, np.nan, dtype=np.float32)
                col[rows] = vals
            else:  # a source seen in an earlier frame keeps its first value
                col[rows] = np.where(np.isnan(col[rows]), vals, col[rows])
        info.update(f.info)
    return Frame(ids=ids, sources=sources, info=info)
