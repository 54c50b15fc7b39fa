"""Feature values computed from the graph: entity features (materialised into Feast) and the
model matrix (entity features joined with request-time pair features).

The features service, training and the offline job all call these, so a model sees the
same columns computed the same way at training time and at serving time.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from edgeflow.features.schema import MODEL_COLUMNS, SCALAR_FEATURES
from edgeflow.graph import PAIR_COLUMNS, Graph, pair_measures

_PAGERANK_DAMPING = 0.85
_PAGERANK_ITERS = 50


def adjacency_matrix(graph: Graph) -> sp.csr_matrix:
    data = np.ones(graph.indices.size, dtype=np.float64)
    return sp.csr_matrix((data, graph.indices, graph.indptr), shape=(graph.n, graph.n))


def member_features(graph: Graph) -> np.ndarray:
    """(n, len(SCALAR_FEATURES)) float32: degree, clustering, pagerank (x n), avg nbr degree."""
    n = graph.n
    adj = adjacency_matrix(graph)
    deg = graph.degree.astype(np.float64)
    triangles = np.asarray((adj @ adj).multiply(adj).sum(axis=1)).ravel() / 2.0
    pairs = deg * (deg - 1) / 2.0
    clustering = np.divide(triangles, pairs, out=np.zeros(n), where=pairs > 0)
    rank = np.full(n, 1.0 / max(n, 1))
    inv_deg = np.divide(1.0, deg, out=np.zeros(n), where=deg > 0)
    for _ in range(_PAGERANK_ITERS):
        dangling = rank[deg == 0].sum()
        rank = (1 - _PAGERANK_DAMPING) / n + _PAGERANK_DAMPING * (
            adj @ (rank * inv_deg) + dangling / n
        )
    nbr_deg_sum = adj @ deg
    avg_nbr = np.divide(nbr_deg_sum, deg, out=np.zeros(n), where=deg > 0)
    out = np.stack([deg, clustering, rank * n, avg_nbr], axis=1).astype(np.float32)
    assert out.shape[1] == len(SCALAR_FEATURES)
    return out


# The entity features a member's own neighbourhood decides (pagerank needs the whole graph):
# what the nearline worker recomputes when an edge changes.
LOCAL_FEATURES = ("degree", "clustering", "avg_neighbor_degree")


def local_member_features(graph: Graph, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """member_features' LOCAL_FEATURES columns for a few members, in the cost of their two
    hops rather than of the graph: (the members the graph holds, (m, 3) float32)."""
    dense = graph.indices_of(members)
    known = dense >= 0
    deg = graph.degree
    rows = []
    for i in dense[known].tolist():
        nbrs = graph.neighbors(i)
        d = float(nbrs.size)
        _, second = graph.gather(nbrs)
        triangles = float(np.isin(second, nbrs).sum()) / 2.0  # not a mask of n: O(two hops)
        pairs = d * (d - 1) / 2.0
        rows.append([d, triangles / pairs if pairs > 0 else 0.0, deg[nbrs].sum() / d if d else 0.0])
    values = np.asarray(rows, dtype=np.float64).reshape(-1, len(LOCAL_FEATURES))
    return np.asarray(members)[known], values.astype(np.float32)


def _zero_nan(x: np.ndarray) -> np.ndarray:
    """np.nan_to_num, but free when every value is finite (nearly every request)."""
    return x if np.isfinite(x).all() else np.nan_to_num(x)


def cosines(owner: np.ndarray, member_emb: np.ndarray, cand_emb: np.ndarray) -> np.ndarray:
    """Cosine of each candidate row with its member's row `member_emb[owner[i]]`; 0 where a
    vector is zero or missing (NaN)."""
    a = _zero_nan(np.asarray(member_emb, dtype=np.float32))
    b = _zero_nan(np.asarray(cand_emb, dtype=np.float32))
    if a.shape[0] == 1:  # one member (a request): one matrix-vector product, no gather
        norms = np.linalg.norm(b, axis=1) * float(np.linalg.norm(a[0]))
        dots = b @ a[0]
    else:
        norms = np.linalg.norm(b, axis=1) * np.linalg.norm(a, axis=1)[owner]
        dots = np.einsum("ij,ij->i", b, a[owner])
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0).astype(np.float32)


# Where each part of MODEL_COLUMNS comes from, by name: (model column, member scalar) for the
# member's own features, (model column, candidate scalar) for the candidate's, and the run of
# pair measures.
_MEMBER_PARTS = [
    (MODEL_COLUMNS.index(f"member_{name}"), j)
    for j, name in enumerate(SCALAR_FEATURES)
    if f"member_{name}" in MODEL_COLUMNS
]
_CAND_PARTS = [
    (MODEL_COLUMNS.index(f"cand_{name}"), j)
    for j, name in enumerate(SCALAR_FEATURES)
    if f"cand_{name}" in MODEL_COLUMNS
]
_PAIRS = slice(MODEL_COLUMNS.index(PAIR_COLUMNS[0]), MODEL_COLUMNS.index(PAIR_COLUMNS[-1]) + 1)
_COSINE = MODEL_COLUMNS.index("embedding_cosine")
assert _PAIRS.stop - _PAIRS.start == len(PAIR_COLUMNS)
assert len(_MEMBER_PARTS) + len(_CAND_PARTS) + len(PAIR_COLUMNS) + 1 == len(MODEL_COLUMNS)


def model_rows(
    owner: np.ndarray,
    measures: np.ndarray,
    member_scalars: np.ndarray,
    cand_scalars: np.ndarray,
    cos: np.ndarray,
) -> np.ndarray:
    """The ranker's input, (len(owner), len(MODEL_COLUMNS)) float32, for pairs of several
    members (the member of row i is `member_scalars[owner[i]]`) and candidates, given the
    pair measures (PAIR_COLUMNS) and the embedding cosines."""
    out = np.empty((owner.size, len(MODEL_COLUMNS)), dtype=np.float32)
    for col, j in _MEMBER_PARTS:
        out[:, col] = member_scalars[owner, j]
    for col, j in _CAND_PARTS:
        out[:, col] = cand_scalars[:, j]
    out[:, _PAIRS] = measures
    out[:, _COSINE] = cos
    return out


def model_matrix(
    graph: Graph,
    inv_log_degree: np.ndarray,
    member_index: int,
    cand_indices: np.ndarray,
    member_scalars: np.ndarray,
    cand_scalars: np.ndarray,
    member_embedding: np.ndarray,
    cand_embeddings: np.ndarray,
    pairs: np.ndarray | None = None,
) -> np.ndarray:
    """The ranker's input, (len(cands), len(MODEL_COLUMNS)) float32, in MODEL_COLUMNS order.

    Scalars are rows of SCALAR_FEATURES (NaN where the online store has no row); indices
    are dense graph indices (-1 for members unknown to the graph). `pairs` is
    pair_measures(graph, member_index, cand_indices, inv_log_degree), when already computed.
    """
    owner = np.zeros(cand_indices.size, dtype=np.intp)  # one member: every row is its
    if pairs is None:
        pairs = pair_measures(graph, member_index, cand_indices, inv_log_degree)
    member_emb = np.asarray(member_embedding)[None, :]
    cos = cosines(owner, member_emb, cand_embeddings)
    return model_rows(owner, pairs, np.asarray(member_scalars)[None, :], cand_scalars, cos)
