"""Friends of friends and the ranker's input for a whole batch of members at once.

For a batch, sparse products of the members' adjacency rows (plain, and weighted per
intermediate member by 1/log(degree) and by 1/degree) with the graph give every two-hop
pair's common-neighbour count, Adamic-Adar and resource-allocation sums, kept sparse: a
member costs its two-hop neighbourhood, whatever the graph's size. It adds the very
terms graph.friends_of_friends and graph.pair_measures add, in the same order, so the values
are identical (tests hold them to that); the candidates are cut at the limit by
(score, member id), which decides ties the same way for any batch. Batches of a few members,
and the nearline worker's, use those two functions directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from edgeflow.candidates.sources import VectorIndex
from edgeflow.features.compute import adjacency_matrix, cosines
from edgeflow.graph import PAIR_COLUMNS, Graph, friends_of_friends, pair_measures


class PairIndex:
    """The graph's adjacency and the per-intermediate-member weights of the pair sums. The
    weights scale the batch's own rows (B x n) rather than copies of the adjacency: three
    weighted copies of a 12M-edge graph would hold 0.9 GB per process."""

    def __init__(self, graph: Graph, inv_log_degree: np.ndarray) -> None:
        self.graph = graph
        self.inv_log_degree = inv_log_degree
        self.inv_degree = 1.0 / np.maximum(graph.degree.astype(np.float64), 1.0)
        self.adj = adjacency_matrix(graph)


@dataclass
class TwoHop:
    """Common neighbours, Adamic-Adar and resource allocation of each batch member (row) with
    the members two hops from it: the sparse product's entries, by row and then column. Every
    other pair's sums are zero, so the cost is the two-hop neighbourhoods', not rows of n."""

    graph: Graph
    member_dense: np.ndarray  # (B,) dense index, -1 when unknown
    keys: np.ndarray  # (m,) int64 row * n + column, sorted
    cn: np.ndarray  # (m,) float64
    aa: np.ndarray
    ra: np.ndarray

    @classmethod
    def build(cls, pairs: PairIndex, member_dense: np.ndarray) -> TwoHop:
        n = pairs.graph.n
        rows = np.flatnonzero(member_dense >= 0)
        left = pairs.adj[member_dense[rows]]
        # The rows three times, then weighted per intermediate member: w[k] * 1 is the very
        # term (1 * w[k]) a weighted copy of the adjacency would add, in the same order.
        stacked = sp.vstack([left, left, left], format="csr")
        weights = np.concatenate([np.ones(left.nnz), pairs.inv_log_degree[left.indices],
                                  pairs.inv_degree[left.indices]])  # fmt: skip
        stacked.data = stacked.data * weights
        product = (stacked @ pairs.adj).tocoo()
        block, row = np.divmod(product.row.astype(np.int64), max(rows.size, 1))
        keys, at = np.unique(rows[row] * n + product.col.astype(np.int64), return_inverse=True)
        sums = np.zeros((3, keys.size), dtype=np.float64)
        sums[block, at] = product.data  # a sum the product left out is zero
        return cls(pairs.graph, member_dense, keys, sums[0], sums[1], sums[2])

    def friends_of_friends(
        self, limit: int, weighted: bool, min_common: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(owner, candidate dense index, common-neighbour count) per member, best first:
        friends_of_friends' ranking (Adamic-Adar weight or count, then member id), cut at
        `limit` after dropping candidates with fewer than `min_common` common neighbours."""
        g = self.graph
        k = min(limit, g.n)
        if k <= 0 or self.member_dense.size == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0, dtype=np.float32)
        rows = np.flatnonzero(self.member_dense >= 0)
        owner, nb = g.gather(self.member_dense[rows])
        connected = rows[owner] * g.n + nb
        row, col = np.divmod(self.keys, g.n)
        allowed = (self.cn >= max(min_common, 1)) & (col != self.member_dense[row])
        allowed &= ~np.isin(self.keys, connected)
        row, col = row[allowed], col[allowed]
        score = (self.aa if weighted else self.cn)[allowed].astype(np.float32)
        # By member, then score (highest first), then id: the first k of each member.
        order = np.lexsort((col, -score, row))
        row, col = row[order], col[order]
        first = np.searchsorted(row, row)  # each entry's member's first entry
        keep = np.arange(row.size) - first < k
        cn = self.cn[allowed][order][keep]
        return row[keep], col[keep], cn.astype(np.float32)

    def measures(self, owner: np.ndarray, cand_dense: np.ndarray) -> np.ndarray:
        """graph.pair_measures for the pairs (member `owner`, candidate `cand_dense`)."""
        out = np.zeros((cand_dense.size, len(PAIR_COLUMNS)), dtype=np.float32)
        ok = (self.member_dense[owner] >= 0) & (cand_dense >= 0)
        rows, o, c = np.flatnonzero(ok), owner[ok], cand_dense[ok]
        cn, aa, ra = self._sums(o * self.graph.n + c)
        deg = self.graph.degree
        du = deg[self.member_dense[o]].astype(np.float64)
        dv = deg[c].astype(np.float64)
        union = du + dv - cn
        out[rows, 0] = cn
        out[rows, 1] = aa
        out[rows, 2] = ra
        out[rows, 3] = np.divide(cn, union, out=np.zeros_like(cn), where=union > 0)
        out[rows, 4] = np.log1p(du * dv)
        return out

    def _sums(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three sums of pairs given as row * n + column keys (zero past two hops)."""
        if not self.keys.size:
            zero = np.zeros(keys.size, dtype=np.float64)
            return zero, zero, zero
        at = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
        hit = self.keys[at] == keys
        cn, aa, ra = (np.where(hit, s[at], 0.0) for s in (self.cn, self.aa, self.ra))
        return cn, aa, ra


def member_friends_of_friends(
    graph: Graph, i: int, limit: int, weights: np.ndarray | None, min_common: int
) -> tuple[np.ndarray, np.ndarray]:
    """TwoHop.friends_of_friends for one member: (candidate dense indices, counts)."""
    if i < 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    idx, counts, _ = friends_of_friends(graph, i, graph.n, weights)  # every one, in order
    keep = counts >= max(min_common, 1)
    return idx[keep][:limit], counts[keep][:limit]


def member_measures(
    graph: Graph, inv_log_degree: np.ndarray, member_dense: np.ndarray, owner: np.ndarray,
    cand_dense: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """TwoHop.measures member by member, with graph.pair_measures."""
    out = np.zeros((cand_dense.size, len(PAIR_COLUMNS)), dtype=np.float32)
    bounds = np.searchsorted(owner, np.arange(member_dense.size + 1))
    for j, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        if hi > lo:
            out[lo:hi] = pair_measures(graph, int(member_dense[j]), cand_dense[lo:hi],
                                       inv_log_degree)  # fmt: skip
    return out


def index_cosines(
    index: VectorIndex,
    members: np.ndarray,
    owner: np.ndarray,
    cand_ids: np.ndarray,
    member_embeddings: np.ndarray,
    cand_embeddings: np.ndarray,
) -> np.ndarray:
    """The same cosines from the EBR index's unit vectors;
    rows whose member or candidate the index lacks fall back to compute.cosines."""
    member_rows, cand_rows = index.rows(members), index.rows(cand_ids)
    known = (member_rows[owner] >= 0) & (cand_rows >= 0)
    out = np.empty(owner.size, dtype=np.float32)
    out[known] = unit_cosines(index.vectors, member_rows[owner[known]], cand_rows[known])
    if not known.all():
        rest = ~known
        out[rest] = cosines(owner[rest], member_embeddings, cand_embeddings[rest])
    return out


def unit_cosines(vectors: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosines of row pairs (vectors[a[i]], vectors[b[i]]) of a matrix of unit rows: one dot
    product a pair, never a product with every row (that costs O(members) a member)."""
    return np.einsum("ij,ij->i", vectors[a], vectors[b])
