"""The batch runner: one workflow graph executed over a batch of members at once.

The same ops as a request, computed the same way (friends of friends and the pair measures
with the graph's own sums, see pairs.py; EBR by cosine over the same embeddings; features
in model_matrix's columns from Feast's rows; the registry's ONNX model; blend.py's ranking),
but each node handles the whole batch: the model scores every pair of the batch in one call.
The list the run writes is not read back as a candidate source of itself. What only bounds a
request's latency is not applied: a hub's friends of friends are expanded over every
connection, not cut at the candidates service's EDGEFLOW_FOF_MAX_VISITS (so past that cap
the batch's list is the unbounded answer the request approximates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from edgeflow.candidates.sources import SEEDS, VectorIndex, fill_popular, popular_near
from edgeflow.features.compute import cosines as compute_cosines
from edgeflow.features.compute import model_rows
from edgeflow.features.schema import MODEL_COLUMNS
from edgeflow.graph import top_positions
from edgeflow.offline.inputs import FeatureTable, Inputs, take
from edgeflow.offline.pairs import (
    TwoHop,
    index_cosines,
    member_friends_of_friends,
    member_measures,
    unit_cosines,
)
from edgeflow.offline.ranking import (
    BlendInput,
    Ranked,
    blend_batch,
    deactivated_members,
    hidden,
    pair_in,
)
from edgeflow.offline.rows import Rows, union
from edgeflow.scoring.registry import ModelNotFoundError
from edgeflow.stores import lists as stored_lists
from edgeflow.workflow.compiled import CompiledNode, Workflow
from edgeflow.workflow.modes import list_name, list_size
from edgeflow.workflow.ops import (
    BlendParams,
    EbrParams,
    FetchParams,
    GraphParams,
    OnnxParams,
    PopularParams,
    PrecomputedParams,
)

_EMPTY_IDS = np.zeros(0, dtype=np.int64)
_EMPTY_SCORES = np.zeros(0, dtype=np.float32)
# Most similarity cells computed at once by the batched EBR (memory bound: 4 bytes each).
_EBR_CELLS = 1 << 24
# Up to this many members, the graph work is done member by member with graph.py's functions
# rather than with the batch's sparse product (the nearline worker's runner always does).
PER_MEMBER_MAX = 8


class OfflineError(RuntimeError):
    """A workflow the batch runner cannot run; the message names the node."""


@dataclass
class BatchResult:
    members: np.ndarray
    lists: list[Ranked]
    pairs_scored: int


class _Batch:
    """One batch's members and what several nodes share: their dense indices and, built on
    first use, their two-hop products."""

    def __init__(self, inputs: Inputs, members: np.ndarray, per_member: bool) -> None:
        self.inputs = inputs
        self.members = members
        self.dense = inputs.graph.indices_of(members)
        self.per_member = per_member
        self._two_hop: TwoHop | None = None

    @property
    def size(self) -> int:
        return int(self.members.size)

    @property
    def two_hop(self) -> TwoHop:
        if self._two_hop is None:
            self._two_hop = TwoHop.build(self.inputs.pairs, self.dense)
        return self._two_hop


class BatchRunner:
    """Runs `wf` for batches of members against `inputs`.

    With `per_member`, the graph work of every batch is done member by member: for inputs
    whose graph changes between batches (the nearline worker's), where the whole-graph pair
    index would be rebuilt, at O(edges), for each batch of more than PER_MEMBER_MAX members.
    """

    def __init__(
        self, wf: Workflow, inputs: Inputs, k: int | None = None, per_member: bool = False
    ) -> None:
        self.wf = wf
        self.inputs = inputs
        self.per_member = per_member
        self.list = list_name(wf)
        self.k = k or list_size(wf)
        self._ops: dict[str, Callable[[CompiledNode, list[Rows], _Batch], Rows]] = {
            "candidates.graph": self._graph,
            "candidates.ebr": self._ebr,
            "candidates.precomputed": self._precomputed,
            "candidates.popular": self._popular,
            "features.fetch": self._fetch,
            "scoring.onnx": self._score,
        }
        for cn in wf.nodes:
            op = cn.node.op
            if op not in self._ops and op != "merge.blend" and not op.startswith("filter."):
                raise OfflineError(
                    f"node {cn.node.name!r} field op: {op} cannot run in a batch "
                    f"(batch ops: {sorted([*self._ops, 'merge.blend', 'filter.*'])})"
                )

    def run(self, members: np.ndarray) -> BatchResult:
        """The output node's lists for a batch of members; safe to call from several threads.
        Nothing a batch holds grows with the graph's size (the exact EBR search bounds its
        own similarity rows), so a batch runs whole: every sparse product costs O(members)
        of scratch, and parts of a few members at 1M would pay it thousands of times."""
        members = np.asarray(members, dtype=np.int64)
        per_member = self.per_member or members.size <= PER_MEMBER_MAX
        batch = _Batch(self.inputs, members, per_member)
        pairs = 0
        out: dict[str, Rows] = {}
        ranked: dict[str, list[Ranked]] = {}
        for cn in self.wf.nodes:  # topological order
            inputs = [out[d] for d in cn.node.inputs]
            if cn.node.op == "merge.blend":
                ranked[cn.node.name] = self._blend(cn, inputs, batch)
                out[cn.node.name] = Rows.empty()
            elif cn.node.op.startswith("filter."):
                out[cn.node.name] = self._filter(cn, inputs[0], batch)
            else:
                out[cn.node.name] = self._ops[cn.node.op](cn, inputs, batch)
                if cn.node.op == "scoring.onnx":
                    pairs += len(out[cn.node.name])
        return BatchResult(members, ranked[self.wf.spec.output], pairs)

    # ---- candidate sources -----------------------------------------------------------------
    def _graph(self, cn: CompiledNode, inputs: list[Rows], batch: _Batch) -> Rows:
        params = cn.params
        assert isinstance(params, GraphParams)
        g = self.inputs.graph
        weighted = params.weight == "adamic_adar"
        if not batch.per_member:
            owner, cand, counts = batch.two_hop.friends_of_friends(
                params.limit, weighted, params.min_common
            )
            rows = Rows(owner=owner, ids=g.ids[cand], sources={cn.node.name: counts})
            rows.modes[cn.node.name] = "offline"
            return rows
        weights = self.inputs.inv_log_degree if weighted else None
        parts = []
        for i in batch.dense.tolist():
            idx, counts = member_friends_of_friends(g, i, params.limit, weights, params.min_common)
            parts.append((g.ids[idx], counts))
        return Rows.from_parts(cn.node.name, parts, "offline")

    def _ebr(self, cn: CompiledNode, inputs: list[Rows], batch: _Batch) -> Rows:
        members = batch.members
        params = cn.params
        assert isinstance(params, EbrParams)
        if self.inputs.ann is not None:
            return self._ebr_ann(cn, params, batch)
        index = self.inputs.index
        if index is None:
            return Rows.from_parts(cn.node.name, [], "offline")
        g = self.inputs.graph
        rows = index.rows(members)
        ok = rows >= 0
        ok[ok] = index.nonzero[rows[ok]]
        todo = np.flatnonzero(ok)
        step = max(1, _EBR_CELLS // max(index.ids.size, 1))
        owners, ids, scores = [], [], []
        for start in range(0, todo.size, step):
            chunk = todo[start : start + step]
            sims = index.vectors[rows[chunk]] @ index.vectors.T
            sims[:, ~index.nonzero] = -np.inf
            sims[np.arange(chunk.size), rows[chunk]] = -np.inf
            dense = g.indices_of(members[chunk])
            known = np.flatnonzero(dense >= 0)
            owner, nb = g.gather(dense[known])
            gone = index.rows(g.ids[nb])
            sims[known[owner][gone >= 0], gone[gone >= 0]] = -np.inf
            k = min(params.limit, index.ids.size)
            top = best_k(sims, k)
            top_sims = np.take_along_axis(sims, top, axis=1)
            order = np.lexsort((index.ids[top], -top_sims), axis=1)
            top = np.take_along_axis(top, order, axis=1)
            top_sims = np.take_along_axis(top_sims, order, axis=1)
            finite = np.isfinite(top_sims)
            owners.append(np.repeat(chunk, k)[finite.ravel()])
            ids.append(index.ids[top[finite]])
            scores.append(top_sims[finite].astype(np.float32))
        rows_out = Rows.from_parts(cn.node.name, [], "offline")
        if owners:
            rows_out.owner = np.concatenate(owners).astype(np.int64)
            rows_out.ids = np.concatenate(ids)
            rows_out.sources[cn.node.name] = np.concatenate(scores)
        return rows_out

    def _ebr_ann(self, cn: CompiledNode, params: EbrParams, batch: _Batch) -> Rows:
        """EBR member by member on the live HNSW collection, as the candidates service
        searches it: never the member or its connections."""
        ann, g = self.inputs.ann, self.inputs.graph
        assert ann is not None
        parts = []
        for member, i in zip(batch.members.tolist(), batch.dense.tolist(), strict=True):
            gone = [member] if i < 0 else [member, *g.ids[g.neighbors(i)].tolist()]
            try:
                parts.append(ann.nearest(member, params.limit, np.unique(gone)))
            except Exception as exc:  # the shard's or the server client's own error types
                raise OfflineError(
                    f"node {cn.node.name!r}: embedding collection {ann.name}: {exc}"
                ) from exc
        return Rows.from_parts(cn.node.name, parts, "offline")

    def _precomputed(self, cn: CompiledNode, inputs: list[Rows], batch: _Batch) -> Rows:
        members = batch.members
        params = cn.params
        assert isinstance(params, PrecomputedParams)
        if params.list == self.list:  # the list being written is not its own input
            return Rows.from_parts(cn.node.name, [], "offline")
        stored = stored_lists.read_lists(self.inputs.client, params.list, members)
        parts = [(_EMPTY_IDS, _EMPTY_SCORES) if s is None else (s.ids, s.scores) for s in stored]
        rows = Rows.from_parts(cn.node.name, parts, "offline")
        g = self.inputs.graph
        dense = g.indices_of(members)
        known = np.flatnonzero(dense >= 0)
        owner, nb = g.gather(dense[known])
        set_owner = np.concatenate([np.arange(members.size), known[owner]])
        set_ids = np.concatenate([members, g.ids[nb]])
        rows = rows.take(~pair_in(rows.owner, rows.ids, set_owner, set_ids))
        return _limit(rows, params.limit)

    def _popular(self, cn: CompiledNode, inputs: list[Rows], batch: _Batch) -> Rows:
        """As the candidates service's popular source (sources.PopularSource): a member
        past max_degree gets none, so a batch of connected members costs nothing here."""
        members = batch.members
        params = cn.params
        assert isinstance(params, PopularParams)
        g = self.inputs.graph
        degree = g.degree
        dense = batch.dense
        own = np.where(dense >= 0, degree[np.maximum(dense, 0)], 0) if g.n else dense * 0
        served = own <= params.max_degree if params.max_degree is not None else own >= 0
        if not served.any():
            return Rows.from_parts(cn.node.name, [(_EMPTY_IDS, _EMPTY_SCORES)] * members.size,
                                   "offline")  # fmt: skip
        head = min(g.n, params.limit + int(degree.max(initial=0)) + 1)
        order = most_connected(degree, head)
        ranked = g.ids[order], degree[order].astype(np.float32)
        parts = []
        for member, i, on in zip(members.tolist(), dense.tolist(), served.tolist(), strict=True):
            if not on:
                parts.append((_EMPTY_IDS, _EMPTY_SCORES))
                continue
            connections = g.neighbors(i) if i >= 0 else _EMPTY_IDS
            gone = np.unique(np.append(g.ids[connections], member))
            if params.within == "neighbourhood" and i >= 0:
                seeds = connections if connections.size else self._seeds(member)
                if seeds.size:
                    near = popular_near(g, seeds, gone, params.limit)
                    parts.append(fill_popular(near, ranked, gone, params.limit))
                    continue
            keep = ~np.isin(ranked[0], gone)
            parts.append((ranked[0][keep][: params.limit], ranked[1][keep][: params.limit]))
        return Rows.from_parts(cn.node.name, parts, "offline")

    def _seeds(self, member: int) -> np.ndarray:
        """Dense indices of a member's SEEDS nearest members by embedding (it has no
        connections to start its neighbourhood from): from the live HNSW collection past the
        exact index's size, else the exact index, whose one row of cosines is what the ebr
        node computes for every member."""
        gone = np.asarray([member], dtype=np.int64)
        if self.inputs.ann is not None:
            ids, _ = self.inputs.ann.nearest(member, SEEDS, gone)
        elif self.inputs.index is not None:
            ids, _ = self.inputs.index.nearest(member, SEEDS, gone)
        else:
            return _EMPTY_IDS
        dense = self.inputs.graph.indices_of(np.asarray(ids, dtype=np.int64))
        return dense[dense >= 0]

    # ---- features and scoring -------------------------------------------------------------
    def _fetch(self, cn: CompiledNode, inputs: list[Rows], batch: _Batch) -> Rows:
        params = cn.params
        assert isinstance(params, FetchParams)
        rows = union(inputs, self.inputs.graph.ids)
        g = self.inputs.graph
        members = batch.members
        features = self.inputs.features
        if self.inputs.aligned and rows.dense is not None and (batch.dense >= 0).all():
            # Features, graph and index rows are all in graph order: index them directly.
            measures = self._measures(batch, rows, rows.dense)
            table = cast(FeatureTable, features).table
            index = cast(VectorIndex, self.inputs.index)
            cosines = unit_cosines(index.vectors, batch.dense[rows.owner], rows.dense)
            matrix = model_rows(
                rows.owner, measures, table.scalars[batch.dense], table.scalars[rows.dense],
                cosines,
            )  # fmt: skip
        else:
            if isinstance(features, FeatureTable):  # in memory: look rows up directly
                mine, theirs = features.rows(members), features.rows(rows.ids)
            else:  # read from Redis: each distinct member once
                uniq, inverse = np.unique(np.concatenate([members, rows.ids]), return_inverse=True)
                table = features.rows(uniq)
                mine = take(table, inverse[: members.size])
                theirs = take(table, inverse[members.size :])
            measures = self._measures(batch, rows, g.indices_of(rows.ids))
            ebr_index = self.inputs.index
            if ebr_index is not None and isinstance(features, FeatureTable):  # its vectors
                cosines = index_cosines(
                    ebr_index, members, rows.owner, rows.ids, mine.embeddings, theirs.embeddings
                )
            else:
                cosines = compute_cosines(rows.owner, mine.embeddings, theirs.embeddings)
            matrix = model_rows(rows.owner, measures, mine.scalars, theirs.scalars, cosines)
        if params.columns:
            select = [MODEL_COLUMNS.index(c) for c in params.columns]
            rows.features, rows.columns = matrix[:, select], tuple(params.columns)
        else:
            rows.features, rows.columns = matrix, MODEL_COLUMNS
        return rows

    def _measures(self, batch: _Batch, rows: Rows, cand_dense: np.ndarray) -> np.ndarray:
        if batch.per_member:
            return member_measures(
                self.inputs.graph, self.inputs.inv_log_degree, batch.dense, rows.owner, cand_dense
            )
        return batch.two_hop.measures(rows.owner, cand_dense)

    def _score(self, cn: CompiledNode, inputs: list[Rows], batch: _Batch) -> Rows:
        params = cn.params
        assert isinstance(params, OnnxParams)
        rows = inputs[0]
        try:
            model = self.inputs.registry.get(params.model, params.version)
        except ModelNotFoundError as exc:
            raise OfflineError(f"node {cn.node.name!r} field params.model: {exc}") from None
        if not len(rows):
            return rows
        if rows.features is None:
            raise OfflineError(f"node {cn.node.name!r}: its input carries no features")
        try:
            rows.score = model.score(rows.features, rows.columns)
        except ValueError as exc:
            raise OfflineError(f"node {cn.node.name!r}: {exc}") from None
        return rows

    # ---- visibility and blending ---------------------------------------------------------
    def _filter(self, cn: CompiledNode, rows: Rows, batch: _Batch) -> Rows:
        name = cn.node.op.split(".", 1)[1]
        pairs = hidden(self.inputs.client, self.inputs.graph, batch.members, [name])
        return rows.take(~pair_in(rows.owner, rows.ids, *pairs))

    def _blend(self, cn: CompiledNode, inputs: list[Rows], batch: _Batch) -> list[Ranked]:
        members = batch.members
        params = cn.params
        assert isinstance(params, BlendParams)
        lists = [
            _blend_input(name, rows, params.weights.get(name, 1.0))
            for name, rows in zip(cn.node.inputs, inputs, strict=True)
        ]
        pairs = hidden(self.inputs.client, self.inputs.graph, members, params.filters)
        gone = deactivated_members(self.inputs.client)
        return blend_batch(
            lists, members.size, self.k, pairs, dict(params.quotas), self.inputs.graph.ids, gone
        )


def _blend_input(name: str, rows: Rows, weight: float) -> BlendInput:
    """Column 0 is the model score, or the first source's score for unscored rows (as the
    gateway sends a list to the merging service)."""
    if rows.score is not None:
        primary = rows.score
    else:
        primary = np.full(len(rows), np.nan, dtype=np.float32)
        for col in rows.sources.values():
            primary = np.where(np.isnan(primary), col, primary)
        primary = np.nan_to_num(primary, nan=0.0)
    return BlendInput(
        name,
        rows.owner,
        rows.ids,
        primary,
        rows.sources,
        rows.modes,
        weight,
        rows.score is not None,
        rows.dense if len(rows) else np.zeros(0, dtype=np.int64),
        rows.unique or not len(rows),
    )


def best_k(sims: np.ndarray, k: int) -> np.ndarray:
    """Columns of each row's k highest values (in no order), as np.argpartition(-sims, k - 1,
    axis=1)[:, :k] finds them, without partitioning whole rows: the k-th highest of the
    maxima of disjoint groups of a row is a floor its k-th highest value cannot be under,
    and few values reach it. Values tied at a row's k-th go to the lowest columns (see
    graph.top_positions)."""
    b, n = sims.shape
    width = n // (8 * k)  # eight groups per value kept, so few of the best share one
    if width < 2:
        return _top_rows(sims, k)
    groups = sims[:, : n - n % width].reshape(b, width, -1).max(axis=1)  # strided groups
    floor = -np.partition(-groups, k - 1, axis=1)[:, k - 1 : k]
    row, col = np.divmod(np.flatnonzero(sims >= floor), n)  # at least k per row, in order
    value = sims[row, col]
    order = np.lexsort((-value, row))
    col, value = col[order], value[order]
    first = np.searchsorted(row, np.arange(b))
    best = first[:, None] + np.arange(k)
    top = col[best]
    after = np.minimum(first + k, row.size - 1)
    tied = (np.diff(np.append(first, row.size)) > k) & (value[after] == value[best[:, -1]])
    if tied.any():
        top[tied] = _top_rows(sims[tied], k)
    return top


def _top_rows(sims: np.ndarray, k: int) -> np.ndarray:
    """graph.top_positions of each row; a partition of the whole block when no row ties."""
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sims, top, axis=1).min(axis=1, keepdims=True)
    tied = (sims == kth).sum(axis=1) > (np.take_along_axis(sims, top, axis=1) == kth).sum(axis=1)
    for r in np.flatnonzero(tied):
        top[r] = top_positions(sims[r], k)
    return top


def most_connected(degree: np.ndarray, head: int) -> np.ndarray:
    """np.argsort(-degree, kind="stable")[:head] without sorting every member: only those
    with at least the head-th highest degree."""
    if head >= degree.size:
        return np.argsort(-degree, kind="stable")[:head]
    floor = np.partition(degree, degree.size - head)[degree.size - head]
    rows = np.flatnonzero(degree >= floor)
    return rows[np.argsort(-degree[rows], kind="stable")][:head]


def _limit(rows: Rows, limit: int) -> Rows:
    """At most `limit` rows per member, in order."""
    if not len(rows):
        return rows
    start = np.ones(len(rows), dtype=bool)
    start[1:] = rows.owner[1:] != rows.owner[:-1]
    first = np.maximum.accumulate(np.where(start, np.arange(len(rows)), 0))
    return rows.take(np.arange(len(rows)) - first < limit)
