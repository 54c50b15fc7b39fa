"""What flows between workflow nodes in a batch run: the candidates of many members at once.

Rows are grouped by member (`owner`, the member's position in the batch, ascending) and keep
each source's order within a member, like one request's frame per member laid end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Rows:
    owner: np.ndarray  # (r,) int64 position of the row's member in the batch, ascending
    ids: np.ndarray  # (r,) int64 candidate member ids
    sources: dict[str, np.ndarray] = field(default_factory=dict)  # node -> score, NaN if absent
    modes: dict[str, str] = field(default_factory=dict)  # source node -> mode of its scores
    features: np.ndarray | None = None  # (r, c) float32
    columns: tuple[str, ...] = ()
    score: np.ndarray | None = None  # (r,) model score
    dense: np.ndarray | None = None  # (r,) the ids' graph dense indices, when all are known
    unique: bool = False  # each id at most once per member (true after `union`)

    def __len__(self) -> int:
        return int(self.ids.size)

    @classmethod
    def empty(cls) -> Rows:
        return cls(owner=np.zeros(0, np.int64), ids=np.zeros(0, np.int64))

    @classmethod
    def from_parts(
        cls, name: str, parts: list[tuple[np.ndarray, np.ndarray]], mode: str = "offline"
    ) -> Rows:
        """One source's (ids, scores) per member of the batch, in batch order."""
        sizes = np.fromiter((p[0].size for p in parts), dtype=np.int64, count=len(parts))
        owner = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
        if not parts or not sizes.sum():
            rows = cls.empty()
        else:
            ids = np.concatenate([p[0] for p in parts]).astype(np.int64, copy=False)
            scores = np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False)
            rows = cls(owner=owner, ids=ids, sources={name: scores})
        rows.modes[name] = mode
        return rows

    def take(self, mask: np.ndarray) -> Rows:
        """The rows where `mask` holds, in order (order and grouping are kept)."""
        return Rows(
            owner=self.owner[mask],
            ids=self.ids[mask],
            sources={k: v[mask] for k, v in self.sources.items()},
            modes=dict(self.modes),
            features=None if self.features is None else self.features[mask],
            columns=self.columns,
            score=None if self.score is None else self.score[mask],
            dense=None if self.dense is None else self.dense[mask],
            unique=self.unique,
        )

    def bounds(self, members: int) -> np.ndarray:
        """Row offsets of each member: member j's rows are [b[j], b[j+1])."""
        return np.searchsorted(self.owner, np.arange(members + 1, dtype=np.int64))


def codes_in(universe: np.ndarray | None, ids: np.ndarray) -> np.ndarray | None:
    """Positions of the ids in a sorted `universe`, or None unless it holds every one."""
    if universe is None or not universe.size:
        return None
    code = np.minimum(np.searchsorted(universe, ids), universe.size - 1)
    return code if (universe[code] == ids).all() else None


def pair_keys(
    owner: np.ndarray, ids: np.ndarray, universe: np.ndarray | None = None,
    codes: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """One int64 per (owner, id) that sorts like (owner, id): stable sorts on it are cheap.
    The ids' `codes` in a sorted `universe` (e.g. the graph's ids) save a sort."""
    if codes is None:
        codes = codes_in(universe, ids)
    if codes is not None and universe is not None:
        return owner.astype(np.int64) * np.int64(universe.size) + codes
    uniq, code = np.unique(ids, return_inverse=True)
    return owner.astype(np.int64) * np.int64(max(uniq.size, 1)) + code


def sortable(score: np.ndarray) -> np.ndarray:
    """int64 that orders like float32 scores (never NaN here)."""
    bits = score.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def best_first(owner: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The order that sorts rows by owner, then score (highest first), keeping the current
    order of ties: one stable sort of one int64 key."""
    return np.argsort((owner.astype(np.int64) << 32) - sortable(score), kind="stable")


def union(frames: list[Rows], universe: np.ndarray | None = None) -> Rows:
    """Per member, the distinct candidates of several frames in first-seen order (frame
    order, then row order), with every source's score; what `features.fetch` consumes."""
    modes: dict[str, str] = {}
    for f in frames:
        modes.update(f.modes)
    frames = [f for f in frames if len(f)]
    if not frames:
        out = Rows.empty()
        out.modes = modes
        return out
    owner = np.concatenate([f.owner for f in frames])
    ids = np.concatenate([f.ids for f in frames])
    total = ids.size
    codes = codes_in(universe, ids)
    if owner[0] == owner[-1]:  # one member (a request): the ids alone are the key, one sort
        _, kept, group = np.unique(ids, return_index=True, return_inverse=True)
        group = group.reshape(-1)
        first_seen = np.argsort(kept)
        kept = kept[first_seen]
        position = np.empty(kept.size, dtype=np.int64)
        position[first_seen] = np.arange(kept.size)
    else:
        key = pair_keys(owner, ids, universe, codes)
        order = np.argsort(key, kind="stable")  # (owner, id) groups, earliest row first
        sk = key[order]
        first = np.ones(total, dtype=bool)
        first[1:] = sk[1:] != sk[:-1]
        group = np.empty(total, dtype=np.int64)
        group[order] = np.cumsum(first) - 1
        kept = order[first]
        kept = kept[np.argsort(owner[kept] * np.int64(total) + kept)]  # per member, first seen
        position = np.empty(kept.size, dtype=np.int64)
        position[group[kept]] = np.arange(kept.size)
    sources: dict[str, np.ndarray] = {}
    start = 0
    for f in frames:
        where = position[group[start : start + len(f)]]
        for name, vals in f.sources.items():
            col = sources.get(name)
            if col is None:  # a new source: every row of it is still absent
                col = sources[name] = np.full(kept.size, np.nan, dtype=np.float32)
                col[where] = vals
            else:  # a source seen in an earlier frame keeps its first value
                col[where] = np.where(np.isnan(col[where]), vals, col[where])
        start += len(f)
    return Rows(
        owner=owner[kept], ids=ids[kept], sources=sources, modes=modes,
        dense=None if codes is None else codes[kept], unique=True,
    )  # fmt: skip
