"""What flows between workflow nodes inside one request."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeflow.offline.rows import Rows
from edgeflow.offline.rows import union as rows_union
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
    """Deduplicate candidates of several frames, keeping first-seen order and every source
    (a source seen in an earlier frame keeps its first value): the batch runner's union of
    one member's rows."""
    nonempty = [f for f in frames if f.ids.size]
    if len(nonempty) == 1:
        return nonempty[0]
    info: dict[str, SourceInfo] = {}
    for f in nonempty if nonempty else frames:
        info.update(f.info)
    one = [Rows(owner=np.zeros(f.ids.size, np.int64), ids=f.ids, sources=f.sources)
           for f in nonempty]  # fmt: skip
    rows = rows_union(one)
    return Frame(ids=rows.ids, sources=rows.sources, info=info)
