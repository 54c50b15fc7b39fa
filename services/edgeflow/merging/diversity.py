"""Diversity: the served list re-ranked so that its first positions span the member's circles
rather than one of them (maximal marginal relevance, MMR).

Similarity. Two candidates are alike when the same connections of the member lead to them:
the cosine between the sets of the member's connections each one is connected to (its
mutual connections with the member), from the member graph the merging service maps for
social proof. A list whose first cards all read "via Alice and Bob" is one circle; a candidate
with no mutual connection (from embeddings, or popular) is like none. It needs no store
beyond the graph and costs one walk of the pool's neighbour lists.

Re-ranking. Of the best `pool` visible items (after filters, quotas and impressions), MMR
fills the first `window` positions one at a time with the item that maximises

    lambda * relevance - (1 - lambda) * (its highest similarity to an item already placed)

where relevance is the blended score min-max normalised within the pool; the rest of the
list follows by blended score, and the first k are served. lambda 1 keeps the blended order.
So a diverse item can come from below the k served (up to rank `pool`), and a served one can
drop out: eval measures what that costs in recall.

On the wire the gateway asks Merge for the best max(k, pool) items (MergeRequest.k, so the
deactivated filter and impressions settle all of them) and sends the k served and the pool
in MergeRequest.diversity. Without a mapped graph (before it loads, or the gateway's
in-process fallback) the list is served in blended order, cut to k.

Served lists only: the offline job and the nearline worker write each member's best items by
blended score (a pool), since a precomputed list is a candidate list that is re-scored and
re-sorted where it is read; a surface served from its list re-ranks it at request time (the
precomputed view keeps the blend's diversity). similarity and mmr are batch-first (one row
per member), as eval measures many lists at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np
from threadpoolctl import threadpool_limits

from edgeflow.graph import Graph
from edgeflow.merging import blend
from edgeflow.shell.errors import RequestError
from edgeflow.stores.graph_store import GraphNotLoaded, GraphStore
from edgeflow.v1 import merging_pb2
from edgeflow.workflow.ops import MAX_DIVERSITY_POOL, MAX_DIVERSITY_WINDOW, DiversityParams


class DiversityError(ValueError):
    """A malformed MergeRequest.diversity; the message names the field."""


@dataclass(frozen=True)
class Rule:
    lam: float  # MMR's lambda
    window: int  # positions MMR fills
    pool: int  # best items it picks from

    @classmethod
    def of(cls, params: DiversityParams) -> Rule:
        return cls(params.lam, params.window, params.pool)

    def merge_k(self, k: int) -> int:
        """The k to ask Merge for when k edges are to be served."""
        return max(k, self.pool)

    def message(self, k: int) -> merging_pb2.Diversity:
        return merging_pb2.Diversity(k=k, window=self.window, mmr_lambda=self.lam, pool=self.pool)

    @classmethod
    def from_request(cls, request: merging_pb2.MergeRequest) -> tuple[Rule, int] | None:
        """The request's rule and the k it serves (None: off); raises DiversityError."""
        if not request.HasField("diversity"):
            return None
        msg = request.diversity
        if not 1 <= msg.k <= request.k:
            raise DiversityError(f"diversity.k: must be in 1..k ({request.k}), got {msg.k}")
        most = min(request.k, MAX_DIVERSITY_POOL)
        if not 1 <= msg.pool <= most:
            raise DiversityError(
                f"diversity.pool: must be in 1..{most} (at most k, {request.k}), got {msg.pool}"
            )
        if not 1 <= msg.window <= min(msg.pool, MAX_DIVERSITY_WINDOW):
            raise DiversityError(
                f"diversity.window: must be in 1..{min(msg.pool, MAX_DIVERSITY_WINDOW)} "
                f"(at most pool, {msg.pool}), got {msg.window}"
            )
        if not (math.isfinite(msg.mmr_lambda) and 0 <= msg.mmr_lambda <= 1):
            raise DiversityError(f"diversity.mmr_lambda: must be in [0, 1], got {msg.mmr_lambda}")
        return cls(float(msg.mmr_lambda), msg.window, msg.pool), msg.k


def similarity(graph: Graph, members: np.ndarray, cands: np.ndarray) -> np.ndarray:
    """(B, W, W) float32: per member (dense index, -1 unknown) the cosine between the sets of
    its connections that each of its candidates (dense, -1 unknown or padding) is connected
    to. Unknown members and candidates, and candidates with no mutual connection, are like
    nothing (zero rows, their diagonal too)."""
    members = np.asarray(members, dtype=np.int64)
    cands = np.asarray(cands, dtype=np.int64)
    b, w = cands.shape
    out = np.zeros((b, w, w), dtype=np.float32)
    for row in range(b):
        if members[row] >= 0:
            out[row] = _one(graph, int(members[row]), cands[row])
    return out


def _one(graph: Graph, i: int, cands: np.ndarray) -> np.ndarray:
    w = cands.size
    known = np.flatnonzero(cands >= 0)
    nbrs = graph.neighbors(i)
    if not known.size or not nbrs.size:
        return np.zeros((w, w), dtype=np.float32)
    # The (candidate, connection of the member) edges, found from whichever side has fewer
    # neighbour-list entries to walk; a zeroed array numbers the other side from 1 (its
    # untouched pages cost nothing).
    deg = graph.degree
    slot = np.zeros(graph.n, dtype=np.int32)
    if int(deg[nbrs].sum()) < int(deg[cands[known]].sum()):
        via, nb = graph.gather(nbrs)
        slot[cands[known]] = known + 1
        owner = slot[nb]
        hit = owner > 0
        owner, col = owner[hit] - 1, via[hit] + 1
    else:
        owner, nb = graph.gather(cands[known])
        slot[nbrs] = np.arange(1, nbrs.size + 1, dtype=np.int32)
        col = slot[nb]
        hit = col > 0
        owner, col = known[owner[hit]], col[hit]
    count = np.bincount(owner, minlength=w)
    # Only connections that lead to two candidates or more add to a pair's similarity.
    leads = np.bincount(col, minlength=nbrs.size + 1)
    keep = leads[col] > 1
    used = np.cumsum(leads > 1)  # a shared connection's column, from 1
    mat = np.zeros((w, int(used[-1]) + 1), dtype=np.float32)
    mat[owner[keep], used[col[keep]]] = 1.0
    inv = np.zeros(w, dtype=np.float32)
    np.divide(1.0, np.sqrt(count, dtype=np.float32), out=inv, where=count > 0)
    mat *= inv[:, None]
    sim = mat @ mat.T
    np.fill_diagonal(sim, count > 0)
    return sim


def mmr(relevance: np.ndarray, sim: np.ndarray, lam: float, window: int) -> np.ndarray:
    """(B, W) positions of each row's items in their re-ranked order: the first `window`
    chosen by MMR, then the rest by relevance (higher first, then lower position).

    `relevance` (B, W) float: NaN marks padding, which always comes last. Within a row it is
    min-max normalised over the row's items before weighting by `lam`. `sim` (B, W, W)."""
    rel = np.asarray(relevance, dtype=np.float64)
    b, w = rel.shape
    pad = np.isnan(rel)
    lo = np.min(rel, axis=1, where=~pad, initial=np.inf, keepdims=True)
    hi = np.max(rel, axis=1, where=~pad, initial=-np.inf, keepdims=True)
    spread = hi - lo
    norm = (rel - lo) / np.where(spread > 0, spread, 1.0)
    norm[pad] = -np.inf
    # Relevance order, the tail's order and MMR's tie-break: higher, then lower position.
    by_rel = np.argsort(-norm, axis=1, kind="stable")
    steps = min(window, w)
    if steps == 0 or lam >= 1.0:
        return by_rel
    gain = lam * norm  # padding stays -inf: never placed before an item
    pen = (1.0 - lam) * np.asarray(sim, dtype=np.float64)
    if b == 1:
        steps = min(steps, w - int(pad.sum()))
        picked = _greedy_one(gain[0], pen[0], steps)[None, :]
        real = np.ones(picked.shape, dtype=bool)
    else:
        picked, real = _greedy(gain, pen.reshape(b * w, w), steps)
    # Each item's place: its step if MMR placed it, else after them in relevance order
    # (padding last).
    key = np.empty((b, w), dtype=np.int64)
    np.put_along_axis(key, by_rel, np.arange(steps, steps + w), axis=1)
    rows = np.broadcast_to(np.arange(b)[:, None], picked.shape)
    key[rows[real], picked[real]] = np.broadcast_to(np.arange(steps), picked.shape)[real]
    return np.argsort(key, axis=1, kind="stable")


def _greedy_one(gain: np.ndarray, pen: np.ndarray, steps: int) -> np.ndarray:
    """One row of _greedy, on plain vectors (a request's hot path)."""
    most = np.zeros(gain.size, dtype=np.float64)  # each item's highest similarity placed
    score = np.empty(gain.size, dtype=np.float64)
    picked = np.empty(steps, dtype=np.int64)
    for t in range(steps):
        j = int(np.subtract(gain, most, out=score).argmax())
        picked[t] = j
        gain[j] = -np.inf
        np.maximum(most, pen[j], out=most)
    return picked


def _greedy(gain: np.ndarray, pen: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """MMR's picks, (B, steps), and where they are items (a row with fewer items than steps
    runs out): each step takes each row's best gain less penalty; `gain` (B, W) is spent in
    place, `pen` is (B * W, W)."""
    b, w = gain.shape
    base = np.arange(b, dtype=np.int64) * w
    flat = gain.reshape(-1)
    most = np.zeros((b, w), dtype=np.float64)
    score = np.empty((b, w), dtype=np.float64)
    picked = np.empty((b, steps), dtype=np.int64)
    real = np.empty((b, steps), dtype=bool)
    for t in range(steps):
        j = np.subtract(gain, most, out=score).argmax(axis=1)
        picked[:, t] = j
        at = base + j
        real[:, t] = flat[at] > -np.inf
        flat[at] = -np.inf
        np.maximum(most, pen[at], out=most)
    return picked, real


def rerank(
    request: merging_pb2.MergeRequest,
    pool: blend.Blended,
    sel: blend.Selection,
    store: GraphStore | None,
) -> blend.Selection:
    """Merge's last step: the selection re-ranked for diversity and cut to the k served, as
    the request's diversity asks (unchanged without it), over the store's graph. A malformed
    one is INVALID_ARGUMENT naming the field."""
    graph = _graph(store)
    if graph is not None:
        _one_blas_thread()
    return rerank_on(request, pool, sel, graph)


def rerank_on(
    request: merging_pb2.MergeRequest,
    pool: blend.Blended,
    sel: blend.Selection,
    graph: Graph | None,
) -> blend.Selection:
    """rerank over `graph` (None: no re-ranking, only the cut to k)."""
    try:
        parsed = Rule.from_request(request)
    except DiversityError as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    if parsed is None:
        return sel
    rule, k = parsed
    idx = sel.index
    if graph is not None and idx.size > 1 and rule.lam < 1:
        head = idx[: rule.pool]
        i = graph.index_of(int(request.member))
        sim = similarity(graph, np.asarray([i]), graph.indices_of(pool.ids[head])[None, :])
        order = mmr(pool.score[head][None, :], sim, rule.lam, rule.window)[0]
        idx = np.concatenate([head[order], idx[rule.pool :]])
    dropped = dict(sel.dropped)
    if idx.size > k:
        dropped["top_k"] = dropped.get("top_k", 0) + idx.size - k
    return blend.Selection(index=idx[:k], dropped=dropped, over_quota=sel.over_quota)


_blas: list[object] = []  # the process's BLAS thread limit, once set


def _one_blas_thread() -> None:
    """Once per process (the merging service's): BLAS on one thread. The similarity's
    product is small, and BLAS threads would spin against the event loop and the other
    services on the machine, as in the nearline worker (measured on two cores: a 100 x 1,000
    product took 20 ms of CPU on BLAS's threads, 0.2 ms on one)."""
    if not _blas:
        _blas.append(threadpool_limits(limits=1, user_api="blas"))


def _graph(store: GraphStore | None) -> Graph | None:
    if store is None:
        return None
    try:
        return store.graph
    except GraphNotLoaded:
        return None
