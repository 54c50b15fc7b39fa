"""The last steps of a batch run: visibility and blending, for many members at once.

`blend_batch` runs merging/blend.py's own steps (`normalise` per member's list, the weights,
`best_rows` deduplication) over the batch's (member, id) keys, and ranks as `select` does;
with quotas it hands each member to `blend` and `select` themselves, which apply them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from edgeflow.graph import Graph
from edgeflow.merging import blend
from edgeflow.offline.rows import best_first, codes_in, pair_keys
from edgeflow.stores import keys
from edgeflow.stores.redis_client import SyncClient

# Filters that read a SET per member; "self" and "connected" come from the graph.
_SETS = {"blocked": keys.blocked, "dismissed": keys.dismissed, "followed": keys.follows}

Ranked = tuple[np.ndarray, np.ndarray]  # ids best first, float32 scores


@dataclass(frozen=True)
class BlendInput:
    """One input list of a blend node over the batch."""

    name: str
    owner: np.ndarray  # ascending
    ids: np.ndarray
    primary: np.ndarray  # column 0: the model score, or the first source's score
    sources: dict[str, np.ndarray]  # source node -> score (NaN where it did not produce the row)
    modes: dict[str, str]
    weight: float
    scored: bool
    codes: np.ndarray | None = None  # the ids' positions in blend_batch's universe, if known
    unique: bool = False  # no id repeats within a member (rows out of features.fetch)


def hidden(
    client: SyncClient, graph: Graph, members: np.ndarray, filters: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(owner, id) pairs the members must not get under `filters`, as merging/filters.py
    decides them (`connected` from the graph, the others from the members' SETs)."""
    owners: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    positions = np.arange(members.size, dtype=np.int64)
    if "self" in filters:
        owners.append(positions)
        ids.append(members)
    if "connected" in filters:
        dense = graph.indices_of(members)
        known = dense >= 0
        owner, nb = graph.gather(dense[known])
        owners.append(positions[known][owner])
        ids.append(graph.ids[nb])
    set_keys = [fn for name, fn in _SETS.items() if name in filters]
    pipe = client.pipeline(transaction=False)
    for member in members.tolist():
        for key in set_keys:
            pipe.smembers(key(member))
    replies = pipe.execute()
    width = len(set_keys)
    for j in range(members.size):
        found = set().union(*replies[j * width : (j + 1) * width])
        if found:
            owners.append(np.full(len(found), j, dtype=np.int64))
            ids.append(np.fromiter((int(x) for x in found), dtype=np.int64, count=len(found)))
    if not owners:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(owners), np.concatenate(ids).astype(np.int64)


def pair_in(
    owner: np.ndarray, ids: np.ndarray, set_owner: np.ndarray, set_ids: np.ndarray
) -> np.ndarray:
    """Mask of the (owner, id) rows that are in the (set_owner, set_ids) pairs."""
    n = owner.size
    if n == 0 or set_owner.size == 0:
        return np.zeros(n, dtype=bool)
    all_o = np.concatenate([owner, set_owner])
    all_i = np.concatenate([ids, set_ids])
    tag = np.concatenate([np.zeros(n, np.int8), np.ones(set_owner.size, np.int8)])
    order = np.lexsort((-tag, all_i, all_o))  # in each (owner, id) group the set's entry first
    so, si = all_o[order], all_i[order]
    start = np.ones(order.size, dtype=bool)
    start[1:] = (so[1:] != so[:-1]) | (si[1:] != si[:-1])
    group_hit = tag[order][start] == 1
    hit = np.empty(order.size, dtype=bool)
    hit[order] = group_hit[np.cumsum(start) - 1]
    return hit[:n]


def deactivated_members(client: SyncClient) -> np.ndarray:
    """The members deactivated now (sorted): never in anyone's list, as no served list shows
    them (merging/filters.py's `deactivated`)."""
    found = cast(set[bytes], client.smembers(keys.DEACTIVATED_MEMBERS))
    return np.sort(np.fromiter((int(x) for x in found), dtype=np.int64, count=len(found)))


def blend_batch(
    lists: Sequence[BlendInput],
    members: int,
    k: int,
    hidden_pairs: tuple[np.ndarray, np.ndarray],
    quotas: dict[str, int],
    universe: np.ndarray | None = None,
    gone: np.ndarray | None = None,
) -> list[Ranked]:
    """Per member of the batch, the top `k` (ids, blended scores) after visibility filters,
    never one of `gone` (sorted ids hidden from everyone: deactivated members).
    `universe`: sorted ids that likely hold every candidate (see rows.pair_keys)."""
    gone = np.zeros(0, dtype=np.int64) if gone is None else gone
    if quotas:
        return [_exact(lists, j, k, hidden_pairs, quotas, gone) for j in range(members)]
    weights = [float(lst.weight) for lst in lists]
    if not any(weights):
        weights = [1.0] * len(lists)
    owner = np.concatenate([lst.owner for lst in lists])
    ids = np.concatenate([lst.ids for lst in lists]).astype(np.int64, copy=False)
    if ids.size == 0:
        return [_EMPTY] * members
    codes = None
    if all(lst.codes is not None for lst in lists):
        codes = np.concatenate([lst.codes for lst in lists if lst.codes is not None])
    key = pair_keys(owner, ids, universe, codes)
    values = np.concatenate(
        [w * blend.normalise(lst.primary, lst.owner) for w, lst in zip(weights, lists, strict=True)]
    )
    best, starts, summed = blend.best_rows(
        key, values, [lst.ids.size for lst in lists], [lst.unique for lst in lists]
    )
    score = summed.astype(np.float32)
    item_owner, item_ids = owner[best[starts]], ids[best[starts]]  # by (owner, id)
    hidden_codes = codes_in(universe, hidden_pairs[1]) if codes is not None else None
    if codes is not None and hidden_codes is not None and universe is not None:
        # Everyone is a graph member: one boolean (member, member) matrix answers.
        hide = np.zeros((members, universe.size), dtype=bool)
        hide[hidden_pairs[0], hidden_codes] = True
        visible = ~hide[item_owner, codes[best[starts]]]
    else:
        visible = ~pair_in(item_owner, item_ids, *hidden_pairs)
    if gone.size:
        at = np.minimum(np.searchsorted(gone, item_ids), gone.size - 1)
        visible &= gone[at] != item_ids
    item_owner, item_ids, score = item_owner[visible], item_ids[visible], score[visible]
    # Per member by score, best first; ties keep the id order they are already in.
    rank = best_first(item_owner, score)
    item_owner, item_ids, score = item_owner[rank], item_ids[rank], score[rank]
    bounds = np.searchsorted(item_owner, np.arange(members + 1))
    return [
        (item_ids[b : min(e, b + k)], score[b : min(e, b + k)])
        for b, e in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
    ]


_EMPTY: Ranked = (np.zeros(0, np.int64), np.zeros(0, np.float32))


def _exact(
    lists: Sequence[BlendInput],
    j: int,
    k: int,
    hidden_pairs: tuple[np.ndarray, np.ndarray],
    quotas: dict[str, int],
    gone: np.ndarray,
) -> Ranked:
    """One member through blend.blend and blend.select (quotas need its provenance)."""
    inputs = []
    for lst in lists:
        lo, hi = np.searchsorted(lst.owner, [j, j + 1])
        names = list(lst.sources)
        matrix = np.column_stack(
            [lst.primary[lo:hi], *(lst.sources[s][lo:hi] for s in names)]
        ).astype(np.float32)
        inputs.append(
            blend.ScoredList(
                name=lst.name,
                ids=lst.ids[lo:hi],
                scores=matrix,
                columns=("score", *(f"{blend.SOURCE_PREFIX}{s}" for s in names)),
                weight=lst.weight,
                model_column=0 if lst.scored else -1,
            )
        )
    pool = blend.blend(inputs)
    mine = hidden_pairs[0] == j
    keep = ~np.isin(pool.ids, np.concatenate([hidden_pairs[1][mine], gone]))
    sel = blend.select(pool, k, quotas, keep)
    return pool.ids[sel.index], pool.score[sel.index]
