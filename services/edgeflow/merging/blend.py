"""Blending of scored lists: normalise, weight, dedup with provenance, quotas, top-K.

Pure numpy over whole lists; the only Python loops run over lists and source columns (a
handful), and over the K returned edges when their wire bytes are assembled (merging/wire.py).

Scores. Column 0 of each list is min-max normalised within that list to [0, 1] (NaN and -inf
count as the minimum, +inf as the maximum, a constant list is all 1), so lists on different
scales (counts, cosines, model logits) blend sensibly and a single list keeps its order. An
item's blended score is the weighted sum of its normalised scores over the lists it appears in
(CombSUM), so agreement between lists raises an item. When no list sets a weight (proto3's
default 0), every list weighs 1. Within one list a repeated id keeps its best row.

Provenance. Columns named "source:<name>" carry each candidate source's own score (NaN where
that source did not produce the row); a list without them, or a row where all are NaN, is
credited to the list's own name with its column-0 score. Sources are numbered in order of first
appearance (list order, then column order); an item gets one Provenance per source, taken from
the first list that has it, and its primary source (the one quotas count it against) is its
lowest-numbered source.

Selection. Visibility filters (a keep mask) run first, then items are ranked by blended score
(higher first, then lower id), per-source quotas drop items past a source's cap in rank order,
and the first K remain. Drop counts use the reasons "duplicate", the filter names, "quota" and
"top_k"; only non-zero counts are reported.

Explain. On request, every removed item is also listed as a DroppedItem: one per merged
input row ("duplicate": the item itself lives on in the pool), then the filtered ones under
the filter they are counted under, then the ones past a quota ("quota:<source>", its primary
source). Items merely below the top K are not listed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from edgeflow.merging import wire
from edgeflow.v1 import merging_pb2, tensor_pb2

SOURCE_PREFIX = "source:"
MAX_K = 1000


class BlendError(ValueError):
    """An input list or parameter is malformed; the message names it."""


@dataclass(frozen=True)
class ScoredList:
    """One input list: ids and a (rows, cols) float32 score matrix with column names."""

    name: str
    ids: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n, c) float32; column 0 is the list's score
    columns: tuple[str, ...] = ()
    weight: float = 1.0
    mode: str = "online"
    age_seconds: float = 0.0
    model_column: int = -1  # index of the model score column, -1 when unscored
    # (mode, age_seconds) per source name, where it differs from the list's own
    source_info: Mapping[str, tuple[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Blended:
    """The deduplicated pool: one row per distinct candidate, ids ascending."""

    ids: np.ndarray  # (U,) int64
    score: np.ndarray  # (U,) float32 blended score
    model: np.ndarray  # (U,) float32 model score, NaN where no list scored the item
    sources: tuple[str, ...]  # (S,) source names in first-appearance order
    source_score: np.ndarray  # (U, S) float32, NaN where the source did not produce it
    source_list: np.ndarray  # (U, S) int32, the list that supplied it, -1 where absent
    primary: np.ndarray  # (U,) int32 index of the item's primary source
    modes: tuple[str, ...]  # per input list
    ages: tuple[float, ...]  # per input list
    infos: tuple[Mapping[str, tuple[str, float]], ...]  # per input list: source -> (mode, age)
    duplicates: int  # input rows merged into another row


@dataclass(frozen=True)
class Selection:
    index: np.ndarray  # positions into Blended, best first
    dropped: dict[str, int]
    # Explain only: (source, positions into Blended) of the items each quota dropped.
    over_quota: tuple[tuple[str, np.ndarray], ...] = ()


# (source index, the source's score per row, where the source produced the row)
_Credit = tuple[int, np.ndarray, np.ndarray]


def _where(i: int, lst: ScoredList) -> str:
    return f"lists[{i}] ({lst.name!r})"


def _check(i: int, lst: ScoredList) -> list[str]:
    """Validate one list; return its source names per column ("" for non-source columns)."""
    where = _where(i, lst)
    if lst.ids.ndim != 1:
        raise BlendError(f"{where}: ids must be one-dimensional")
    if lst.scores.ndim != 2:
        raise BlendError(f"{where}: scores must be a rows x cols matrix")
    rows, cols = lst.scores.shape
    if rows != lst.ids.shape[0]:
        raise BlendError(f"{where}: {lst.ids.shape[0]} ids but scores has {rows} rows")
    if not np.isfinite(lst.weight) or lst.weight < 0:
        raise BlendError(f"{where}: weight must be a finite number >= 0, got {lst.weight}")
    if rows and cols == 0:
        raise BlendError(f"{where}: scores has no columns; column 0 must be the list's score")
    if lst.columns and len(lst.columns) != cols:
        raise BlendError(f"{where}: scores has {cols} columns but {len(lst.columns)} names")
    if rows and not -1 <= lst.model_column < cols:
        raise BlendError(
            f"{where}: model_column {lst.model_column} is outside the {cols} score columns"
        )
    names: list[str] = []
    seen: set[str] = set()
    for j, col in enumerate(lst.columns):
        source = col[len(SOURCE_PREFIX) :] if j > 0 and col.startswith(SOURCE_PREFIX) else ""
        if j > 0 and col.startswith(SOURCE_PREFIX) and not source:
            raise BlendError(f"{where}: column {j} {col!r} has an empty source name")
        if source and source in seen:
            raise BlendError(f"{where}: source {source!r} has two columns")
        seen.add(source)
        names.append(source)
    return names


def normalise(score: np.ndarray, owner: np.ndarray | None = None) -> np.ndarray:
    """Min-max to [0, 1] within a list (float64), see the module docstring; with `owner`
    (ascending), within each member's part of the list (the batch runner's blend)."""
    s = np.asarray(score, dtype=np.float64)
    if s.size == 0:
        return np.zeros(0, dtype=np.float64)
    if owner is None:
        starts, group = np.zeros(1, dtype=np.intp), np.zeros(s.size, dtype=np.intp)
    else:
        start = np.ones(s.size, dtype=bool)
        start[1:] = owner[1:] != owner[:-1]
        starts, group = np.flatnonzero(start), np.cumsum(start) - 1
    finite = np.isfinite(s)
    lo = np.minimum.reduceat(np.where(finite, s, np.inf), starts)[group]
    hi = np.maximum.reduceat(np.where(finite, s, -np.inf), starts)[group]
    out = np.ones(s.size, dtype=np.float64)
    np.divide(s - lo, hi - lo, out=out, where=hi > lo)
    out[np.isnan(s) | (s == -np.inf)] = 0.0
    out[s == np.inf] = 1.0
    return out


def blend(lists: Sequence[ScoredList]) -> Blended:
    """Normalise, weight and deduplicate the lists into one pool with provenance."""
    col_sources = [_check(i, lst) for i, lst in enumerate(lists)]
    weights = [float(lst.weight) for lst in lists]
    if not any(weights):
        weights = [1.0] * len(lists)
    sizes = [lst.ids.shape[0] for lst in lists]
    n = sum(sizes)
    if n == 0:
        return _empty(lists)
    all_ids = np.concatenate([lst.ids for lst in lists]).astype(np.int64, copy=False)
    contrib = np.concatenate(
        [
            w * normalise(lst.scores[:, 0])
            for w, lst, size in zip(weights, lists, sizes, strict=True)
            if size
        ]
    )
    list_of_row = np.repeat(np.arange(len(lists), dtype=np.int64), sizes)
    best, starts, score = best_rows(all_ids, contrib, sizes)  # best: each (item, list)'s row
    uniq = all_ids[best[starts]]
    best_item = np.repeat(np.arange(starts.size), np.diff(np.append(starts, best.size)))

    # Source registry in first-appearance order; a list's own name stands in where needed.
    registry: dict[str, int] = {}
    parts: list[tuple[int, np.ndarray, np.ndarray | None, list[_Credit]]] = []
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    best_list = list_of_row[best]
    for li, lst in enumerate(lists):
        mine = best_list == li
        rows = best[mine] - offsets[li]
        if rows.size == 0:
            continue
        mat = lst.scores[rows]
        cols = [
            (registry.setdefault(src, len(registry)), mat[:, j], ~np.isnan(mat[:, j]))
            for j, src in enumerate(col_sources[li])
            if src
        ]
        credited = np.zeros(rows.size, dtype=bool)
        for _, _, present in cols:
            credited |= present
        if not credited.all():
            cols.append((registry.setdefault(lst.name, len(registry)), mat[:, 0], ~credited))
        model = mat[:, lst.model_column] if lst.model_column >= 0 else None
        parts.append((li, best_item[mine], model, cols))

    u, s = uniq.size, len(registry)
    model_score = np.full(u, np.nan, dtype=np.float32)
    source_score = np.full((u, s), np.nan, dtype=np.float32)
    source_list = np.full((u, s), -1, dtype=np.int32)
    for li, items, model, cols in parts:
        if model is not None:
            fill = np.isnan(model_score[items])
            model_score[items[fill]] = model[fill]
        for si, vals, present in cols:
            # First list wins: only fill where no earlier list credited this source.
            fill = present & (source_list[items, si] < 0)
            source_score[items[fill], si] = vals[fill]
            source_list[items[fill], si] = li
    return Blended(
        ids=uniq,
        score=score.astype(np.float32),
        model=model_score,
        sources=tuple(registry),
        source_score=source_score,
        source_list=source_list,
        primary=np.argmax(source_list >= 0, axis=1).astype(np.int32),
        modes=tuple(lst.mode for lst in lists),
        ages=tuple(float(lst.age_seconds) for lst in lists),
        infos=tuple(lst.source_info for lst in lists),
        duplicates=n - u,
    )


def best_rows(
    key: np.ndarray,
    contrib: np.ndarray,
    sizes: Sequence[int],
    unique: Sequence[bool] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The deduplication of every blend, of one member's lists (`key` = id) or of a batch's
    (`key` = (member, id), see offline.rows.pair_keys): each list's best row per key (highest
    contribution, the first on ties), summed over the lists in list order. The lists are
    `sizes` consecutive parts of `key` and `contrib`; a list flagged in `unique` repeats no
    key. Returns the kept rows ordered by key then list, where each key's rows start, and
    each key's summed contribution (float64)."""
    bests: list[np.ndarray] = []
    offset = 0
    for i, size in enumerate(sizes):
        part = slice(offset, offset + size)
        own = (
            np.arange(size)
            if i < len(unique) and unique[i]
            else _best_per_key(key[part], contrib[part])
        )
        bests.append(offset + own)
        offset += size
    best = np.concatenate(bests) if bests else np.zeros(0, dtype=np.intp)
    best = best[np.argsort(key[best], kind="stable")]
    sk = key[best]
    new_key = np.ones(best.size, dtype=bool)
    new_key[1:] = sk[1:] != sk[:-1]
    starts = np.flatnonzero(new_key)
    if best.size == 0:
        return best, starts, np.zeros(0, dtype=np.float64)
    return best, starts, np.add.reduceat(contrib[best], starts)


def _best_per_key(key: np.ndarray, contrib: np.ndarray) -> np.ndarray:
    """Positions of the best row of each key within one list (rows of a list rarely repeat)."""
    order = np.argsort(key, kind="stable")
    sk = key[order]
    if sk.size < 2 or (sk[1:] != sk[:-1]).all():
        return np.arange(key.size)
    order = np.lexsort((-contrib, key))
    sk = key[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = sk[1:] != sk[:-1]
    return np.sort(order[first])


def _empty(lists: Sequence[ScoredList]) -> Blended:
    return Blended(
        ids=np.zeros(0, np.int64),
        score=np.zeros(0, np.float32),
        model=np.zeros(0, np.float32),
        sources=(),
        source_score=np.zeros((0, 0), np.float32),
        source_list=np.zeros((0, 0), np.int32),
        primary=np.zeros(0, np.int32),
        modes=tuple(lst.mode for lst in lists),
        ages=tuple(float(lst.age_seconds) for lst in lists),
        infos=tuple(lst.source_info for lst in lists),
        duplicates=0,
    )


def check_quotas(quotas: Mapping[str, int]) -> None:
    for source, cap in quotas.items():
        if not source:
            raise BlendError("quotas: a quota has an empty source name")
        if cap < 0:
            raise BlendError(f"quotas[{source!r}]: max must be >= 0, got {cap}")


def select(
    pool: Blended,
    k: int,
    quotas: Mapping[str, int] | None = None,
    keep: np.ndarray | None = None,
    dropped: Mapping[str, int] | None = None,
    explain: bool = False,
) -> Selection:
    """Rank the visible items, apply per-source quotas, cut to the top k.

    `keep` is the visibility mask from the filters (None keeps all) and `dropped` their counts
    by reason, carried into the result. With `explain`, the items each quota dropped are kept.
    """
    if not 1 <= k <= MAX_K:
        raise BlendError(f"k must be in 1..{MAX_K}, got {k}")
    quotas = quotas or {}
    check_quotas(quotas)
    counts: dict[str, int] = {"duplicate": pool.duplicates}
    counts.update(dropped or {})
    idx = np.flatnonzero(keep) if keep is not None else np.arange(pool.ids.size)
    order = idx[np.lexsort((pool.ids[idx], -pool.score[idx]))]
    over_quota: list[tuple[str, np.ndarray]] = []
    if quotas and order.size:
        primary = pool.primary[order]
        over = np.zeros(order.size, dtype=bool)
        for source, cap in quotas.items():
            if source not in pool.sources:
                continue
            mine = primary == pool.sources.index(source)
            past = mine & (np.cumsum(mine) > cap)
            over |= past
            if explain and past.any():
                over_quota.append((source, order[past]))
        counts["quota"] = int(over.sum())
        order = order[~over]
    counts["top_k"] = max(0, order.size - k)
    return Selection(
        index=order[:k],
        dropped={r: c for r, c in counts.items() if c},
        over_quota=tuple(over_quota),
    )


def _edges_wire(pool: Blended, sel: Selection, proof: Sequence[bytes] = ()) -> bytes:
    """The selected items, best first, as MergeResponse.edges wire bytes with provenance
    (and each one's social proof bytes, when given)."""
    idx = sel.index
    if idx.size == 0:
        return b""
    source_list = pool.source_list[idx]
    rows, cols = np.nonzero(source_list >= 0)  # row-major: grouped per edge, in source order
    names, modes, ages, infos = pool.sources, pool.modes, pool.ages, pool.infos
    heads: dict[tuple[int, int], bytes] = {}
    prov_head = []
    for li, c in zip(source_list[rows, cols].tolist(), cols.tolist(), strict=True):
        head = heads.get((li, c))
        if head is None:
            mode, age = infos[li].get(names[c]) or (modes[li], ages[li])
            head = heads[li, c] = wire.provenance_head(names[c], mode, age)
        prov_head.append(head)
    return wire.edges(
        pool.ids[idx], pool.score[idx], pool.model[idx], rows, prov_head,
        pool.source_score[idx][rows, cols], proof,
    )  # fmt: skip


def duplicate_ids(lists: Sequence[ScoredList]) -> np.ndarray:
    """The id of every input row merged into another row, one per "duplicate" drop."""
    if not lists:
        return np.zeros(0, np.int64)
    uniq, counts = np.unique(np.concatenate([lst.ids for lst in lists]), return_counts=True)
    return np.repeat(uniq, counts - 1).astype(np.int64, copy=False)


def add_dropped(
    out: RepeatedCompositeFieldContainer[tensor_pb2.DroppedItem], ids: np.ndarray, reason: str
) -> None:
    """Append one DroppedItem per id, all with `reason` (the node is the gateway's to fill)."""
    add = out.add
    for target in ids.tolist():
        add(target=target, reason=reason)


def explain(
    out: RepeatedCompositeFieldContainer[tensor_pb2.DroppedItem],
    lists: Sequence[ScoredList],
    pool: Blended,
    filtered: Sequence[tuple[str, np.ndarray]],
    sel: Selection,
) -> None:
    """Every dropped item with its reason, in the order of the module docstring; `filtered`
    is the filters' (name, positions into the pool)."""
    add_dropped(out, duplicate_ids(lists), "duplicate")
    for name, rows in filtered:
        add_dropped(out, pool.ids[rows], name)
    for source, rows in sel.over_quota:
        add_dropped(out, pool.ids[rows], f"quota:{source}")


def drop_counts(dropped: Mapping[str, int]) -> list[merging_pb2.DropCount]:
    return [merging_pb2.DropCount(reason=r, count=c) for r, c in dropped.items()]


def response(
    pool: Blended, sel: Selection, proof: Sequence[bytes] = ()
) -> merging_pb2.MergeResponse:
    """The MergeResponse for a selection: edges with provenance (and social proof, from
    wire.social_proof per selected edge, when given) and drop counts by reason."""
    return merging_pb2.MergeResponse.FromString(
        _edges_wire(pool, sel, proof) + wire.drop_counts(sel.dropped)
    )


def merge(
    lists: Sequence[ScoredList], k: int, quotas: Mapping[str, int] | None = None
) -> merging_pb2.MergeResponse:
    """Blend, select and build the response in one call, without visibility filters."""
    pool = blend(lists)
    return response(pool, select(pool, k, quotas))
