#!/usr/bin/env python
"""How far the pymk ranker's features can carry recall@50 over Adamic-Adar, on `edgeflow
eval`'s own split of each graph.

The served ranker learns from an inner split of the training graph (it never sees the
held-out edges). To bound what any training of the same inputs could reach, this fits the
same gradient boosting on the *held-out* edges of half of the members and measures the
other half: the features' ceiling, free of the inner split's shift. A larger ensemble and
six more pair signals (personalised PageRank from the member, and common neighbours
weighted by how embedded the member's and the candidate's edges to them are) show whether
capacity or signal is what is missing, and the served ranker's own training with those
signals added shows what serving them would give. Every figure is recall@50 over the same
members' candidates (friends of friends and EBR, as the ranker trains), and the lift over
Adamic-Adar on the same rows. Run it under the benchmark lock on a shared machine:

    flock /tmp/edgeflow-bench.lock .venv/bin/python benchmarks/ranker_ceiling.py \
        --out benchmarks/results/ranker_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.ensemble import HistGradientBoostingClassifier

from edgeflow.build.embeddings import member_embeddings
from edgeflow.build.ranker import (
    GBM_PARAMS,
    MAX_MEMBERS,
    NEGATIVES_PER_POSITIVE,
    Examples,
    build_examples,
    inner_split,
    recall_at_k,
    train_ranker,
)
from edgeflow.build.synthetic import KINDS
from edgeflow.features.compute import member_features
from edgeflow.features.schema import EMBEDDING_DIM, MODEL_COLUMNS
from edgeflow.graph import Graph, read_edge_file, split_edges

FACEBOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "facebook_combined.txt"
HOLDOUT, SEED = 0.1, 0  # as benchmarks/run.sh runs `edgeflow eval`
LARGE = {**GBM_PARAMS, "max_iter": 300, "learning_rate": 0.05, "max_leaf_nodes": 16}
EXTRA = ("ppr", "ppr_x_degree", "embedded_in", "embedded_out", "embedded_in_per_degree",
         "embedded_out_per_degree")  # fmt: skip
# Each signal alone, as a ranking: the others order a member's candidates as one of these.
ALONE = ("ppr", "embedded_in", "embedded_out", "embedded_out_per_degree")


def _adjacency(graph: Graph) -> sp.csr_matrix:
    ones = np.ones(graph.indices.size, dtype=np.float32)
    return sp.csr_matrix((ones, graph.indices, graph.indptr), shape=(graph.n, graph.n))


def _ppr(adj: sp.csr_matrix, members: np.ndarray, alpha: float = 0.15) -> np.ndarray:
    """Personalised PageRank from each member (20 power steps), (n, members) float32."""
    deg = np.asarray(adj.sum(axis=1)).ravel()
    walk = (sp.diags(1.0 / np.maximum(deg, 1.0)) @ adj).T.tocsr()
    out = np.zeros((adj.shape[0], members.size), dtype=np.float32)
    for lo in range(0, members.size, 500):
        block = members[lo : lo + 500]
        start = np.zeros((adj.shape[0], block.size), dtype=np.float32)
        start[block, np.arange(block.size)] = 1.0
        p = start.copy()
        for _ in range(20):
            p = alpha * start + (1 - alpha) * (walk @ p)
        out[:, lo : lo + block.size] = p
    return out


def extra_signals(graph: Graph, ex: Examples) -> np.ndarray:
    """The EXTRA columns for every row of `ex`."""
    adj = _adjacency(graph)
    deg = np.asarray(adj.sum(axis=1)).ravel()
    embedded = adj.multiply(adj @ adj).tocsr()  # common neighbours of each edge's two ends
    member = ex.members[ex.group]
    ppr = _ppr(adj, ex.members)[ex.cand, ex.group]
    inward = np.asarray((embedded[ex.members] @ adj)[ex.group, ex.cand]).ravel()
    outward = np.asarray((adj[ex.members] @ embedded)[ex.group, ex.cand]).ravel()
    columns = (ppr, ppr * deg[member], inward, outward, inward / np.maximum(deg[member], 1),
               outward / np.maximum(deg[ex.cand], 1))  # fmt: skip
    return np.column_stack(columns).astype(np.float32)


def _fit(x: np.ndarray, y: np.ndarray, params: dict[str, Any], seed: int) -> Any:
    rng = np.random.default_rng(seed)
    neg, pos = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    keep = rng.choice(neg, min(neg.size, NEGATIVES_PER_POSITIVE * pos.size), replace=False)
    rows = np.sort(np.concatenate([pos, keep]))
    return HistGradientBoostingClassifier(random_state=seed, **params).fit(x[rows], y[rows])


def _inner_split_with_extra_signals(graph: Graph) -> Any:
    """The served ranker's training (inner split, its sample of members, its model size)
    with the EXTRA columns added: what serving them would give."""
    inner, hidden = inner_split(graph, SEED)
    scalars = member_features(inner)
    embeddings = member_embeddings(inner, EMBEDDING_DIM, SEED)
    pool = np.flatnonzero(hidden.degree > 0)
    rng = np.random.default_rng(SEED)
    members = np.sort(rng.choice(pool, size=min(MAX_MEMBERS, pool.size), replace=False))
    ex = build_examples(inner, hidden, members, scalars, embeddings)
    return _fit(np.hstack([ex.x, extra_signals(inner, ex)]), ex.y, GBM_PARAMS, SEED)


def measure(name: str, src: np.ndarray, dst: np.ndarray, members: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    (ks, kd), (hs, hd) = split_edges(src, dst, HOLDOUT, SEED)
    graph = Graph.from_edges(ks, kd, members=np.unique(np.concatenate([src, dst])))
    hidden = Graph.from_edges(hs, hd, members=graph.ids)
    scalars = member_features(graph)
    embeddings = member_embeddings(graph, EMBEDDING_DIM, SEED)
    pool = np.random.default_rng(1).permutation(np.flatnonzero(hidden.degree > 0))
    half = pool.size // 2
    fit_m, test_m = np.sort(pool[:half])[:members], np.sort(pool[half:])[:members]
    fit = build_examples(graph, hidden, fit_m, scalars, embeddings)
    test = build_examples(graph, hidden, test_m, scalars, embeddings)
    aa = recall_at_k(test, test.x[:, MODEL_COLUMNS.index("adamic_adar")])
    served = train_ranker(graph, seed=SEED).model
    inner = _inner_split_with_extra_signals(graph)
    fit_x = np.hstack([fit.x, extra_signals(graph, fit)])
    test_x = np.hstack([test.x, extra_signals(graph, test)])
    width = len(MODEL_COLUMNS)
    recalls = {
        "adamic_adar": aa,
        "served_ranker": recall_at_k(test, served.predict_proba(test.x)[:, 1]),
        "served_ranker_extra_signals": recall_at_k(
            test, inner.predict_proba(np.hstack([test.x, test_x[:, width:]]))[:, 1]
        ),
        "held_out_labels": recall_at_k(
            test, _fit(fit.x, fit.y, GBM_PARAMS, SEED).predict_proba(test.x)[:, 1]
        ),
        "held_out_labels_large": recall_at_k(
            test, _fit(fit.x, fit.y, LARGE, SEED).predict_proba(test.x)[:, 1]
        ),
        "held_out_labels_large_extra_signals": recall_at_k(
            test, _fit(fit_x, fit.y, LARGE, SEED).predict_proba(test_x)[:, 1]
        ),
        **{
            f"alone_{s}": recall_at_k(test, test_x[:, width + j])
            for j, s in enumerate(EXTRA)
            if s in ALONE
        },
    }
    return {
        "graph": name,
        "members": graph.n,
        "edges": int(src.size),
        "test_members": int(test_m.size),
        "hidden_edges_of_test_members": int(test.hidden_per_member.sum()),
        "recall_at_50": {k: round(v, 4) for k, v in recalls.items()},
        "lift_vs_adamic_adar": {k: round(v / aa - 1, 4) for k, v in recalls.items() if aa},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=Path, default=FACEBOOK)
    parser.add_argument("--synthetic", nargs="*", default=sorted(KINDS), choices=sorted(KINDS),
                        help="generated graphs of 3,000 members, seed 1")  # fmt: skip
    parser.add_argument("--members", type=int, default=1500, help="fit and test members, each")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    graphs = [(args.edges.stem, *read_edge_file(args.edges))]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.synthetic:
            path = Path(tmp) / f"{kind}.txt"
            np.savetxt(path, KINDS[kind](members=3000, seed=1), fmt="%d")
            graphs.append((f"{kind} (3,000, seed 1)", *read_edge_file(path)))
    rows = []
    for name, src, dst in graphs:
        rows.append(measure(name, src, dst, args.members))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"graphs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
