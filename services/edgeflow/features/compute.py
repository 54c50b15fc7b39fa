"""Feature values computed from the graph: entity features (materialised into Feast) and the
model matrix (entity features joined with request-time pair features).

The features service, training and the offline job all call these, so a model sees the
same columns computed the same way at training time and at serving time.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from edgeflow.features.schema import MODEL_COLUMNS, SCALAR_FEATURES
from edgeflow.graph import Graph, pair_measures

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


def _zero_nan(x: np.ndarray) -> np.ndarray:
    """np.nan_to_num, but free when every value is finite (nearly every request)."""
    return x if np.isfinite(x).all() else np.nan_to_num(x)


def cosine(member_emb: np.ndarray, cand_emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of one vector with each row; 0 where a vector is zero or missing."""
    a = _zero_nan(np.asarray(member_emb, dtype=np.float32))
    b = _zero_nan(np.asarray(cand_emb, dtype=np.float32))
    norms = np.linalg.norm(b, axis=1) * float(np.linalg.norm(a))
    dots = b @ a
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0).astype(np.float32)


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
    m = cand_indices.size
    out = np.empty((m, len(MODEL_COLUMNS)), dtype=np.float32)
    out[:, 0] = member_scalars[0]
    out[:, 1] = member_scalars[1]
    out[:, 2:6] = cand_scalars[:, 0:4]
    if pairs is None:
        pairs = pair_measures(graph, member_index, cand_indices, inv_log_degree)
    out[:, 6:11] = pairs
    out[:, 11] = cosine(member_embedding, cand_embeddings)
    return out
