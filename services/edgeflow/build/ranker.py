"""The PYMK ranker: gradient-boosted trees over MODEL_COLUMNS, trained on an inner split.

Only the graph it is given is used. 10% of its edges are hidden, features and embeddings
are rebuilt on the rest, and candidates for a seeded sample of members are generated exactly
as serving does (friends-of-friends by Adamic-Adar weight, plus EBR by embedding cosine).
A candidate is positive when it is a hidden edge. A quarter of the sampled members is held
out for the card's metrics (AUC, recall@50 of the model and of Adamic-Adar), so the metrics
describe the exact model that is shipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeflow.build.embeddings import member_embeddings, normalized
from edgeflow.features.compute import member_features, model_matrix
from edgeflow.features.schema import EMBEDDING_DIM, MODEL_COLUMNS
from edgeflow.graph import Graph, friends_of_friends, inverse_log_degree, split_edges
from edgeflow.offline.progress import Stages

FOF_LIMIT = 400  # friends-of-friends candidates per member, best Adamic-Adar weight first
EBR_LIMIT = 100  # embedding-retrieval candidates per member, best cosine first
INNER_HOLDOUT = 0.1
MAX_MEMBERS = 2000
VALIDATION_SHARE = 0.25
NEGATIVES_PER_POSITIVE = 20  # negatives are subsampled for training only, never for metrics
RECALL_K = 50
IMPORTANCE_MEMBERS = 250  # validation members used for permutation importances
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
OUTPUT_INDEX = 1  # column of the positive class
PROBA_TOLERANCE = 1e-4
# Shallow trees with large leaves. Deeper ones (15 leaves, 20 rows a leaf) fitted noise: in
# eval they ranked hidden edges below Adamic-Adar alone on a generated social graph (-3.1%;
# these -1.0%), and gained less on the collaboration and communication ones; no worse on
# Facebook. 150 of them cost what 100 deeper ones did to score (about 1 ms for 700 rows).
GBM_PARAMS: dict[str, Any] = {
    "max_iter": 150,
    "learning_rate": 0.1,
    "max_leaf_nodes": 4,
    "min_samples_leaf": 100,
    "early_stopping": False,
}


class TrainingError(RuntimeError):
    """The graph cannot yield a ranker (too small, no positives) or the export failed."""


@dataclass
class Examples:
    """Candidate rows of several members, grouped by member in order."""

    x: np.ndarray  # (rows, len(MODEL_COLUMNS)) float32
    y: np.ndarray  # (rows,) int8, 1 = hidden edge
    group: np.ndarray  # (rows,) position of the member in `members`
    cand: np.ndarray  # (rows,) dense index of each row's candidate
    members: np.ndarray  # dense member indices
    hidden_per_member: np.ndarray  # all hidden edges of each member, found or not

    def first(self, members: int) -> Examples:
        """The rows of the first `members` members only."""
        rows = self.group < members
        return Examples(
            self.x[rows],
            self.y[rows],
            self.group[rows],
            self.cand[rows],
            self.members[:members],
            self.hidden_per_member[:members],
        )


@dataclass
class TrainedRanker:
    onnx_bytes: bytes
    card: dict[str, Any]
    model: Any  # the fitted scikit-learn estimator the ONNX file was exported from
    seconds: dict[str, float] = field(default_factory=dict)


def ebr_candidates(unit: np.ndarray, i: int, exclude: np.ndarray, limit: int) -> np.ndarray:
    """Top `limit` members by cosine to member i (unit-length rows), excluding `exclude`.

    A member without a vector retrieves nothing, as a zero query vector has no direction.
    """
    if limit <= 0 or not unit[i].any():
        return np.zeros(0, dtype=np.int64)
    sims = unit @ unit[i]
    sims[exclude] = -np.inf
    sims[i] = -np.inf
    k = min(limit, int(np.isfinite(sims).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-sims, k - 1)[:k]
    return top[np.lexsort((top, -sims[top]))].astype(np.int64)


def candidates(
    graph: Graph,
    inv_log_deg: np.ndarray,
    unit: np.ndarray,
    i: int,
    fof_limit: int = FOF_LIMIT,
    ebr_limit: int = EBR_LIMIT,
) -> np.ndarray:
    """Friends-of-friends unioned with EBR for dense member i: fof first, then new EBR ones."""
    fof, _, _ = friends_of_friends(graph, i, fof_limit, weights=inv_log_deg)
    ebr = ebr_candidates(unit, i, graph.neighbors(i), ebr_limit)
    return np.concatenate([fof, ebr[~np.isin(ebr, fof)]])


def build_examples(
    graph: Graph,
    hidden: Graph,
    members: np.ndarray,
    scalars: np.ndarray,
    embeddings: np.ndarray,
    fof_limit: int = FOF_LIMIT,
    ebr_limit: int = EBR_LIMIT,
    on_member: Callable[[], object] | None = None,
) -> Examples:
    """Candidates and model matrices for `members` of `graph`; labels from `hidden` edges.

    `hidden` must share `graph`'s dense indices (built with members=graph.ids).
    `on_member()` is called after each member.
    """
    inv = inverse_log_degree(graph)
    unit = normalized(embeddings)
    xs, ys, groups, cand_lists = [], [], [], []
    for pos, i in enumerate(members.tolist()):
        cands = candidates(graph, inv, unit, i, fof_limit, ebr_limit)
        xs.append(
            model_matrix(
                graph, inv, i, cands, scalars[i], scalars[cands], embeddings[i], embeddings[cands]
            )
        )
        ys.append(np.isin(cands, hidden.neighbors(i)).astype(np.int8))
        groups.append(np.full(cands.size, pos, dtype=np.int64))
        cand_lists.append(cands)
        if on_member is not None:
            on_member()
    width = len(MODEL_COLUMNS)
    return Examples(
        x=np.concatenate(xs) if xs else np.zeros((0, width), np.float32),
        y=np.concatenate(ys) if ys else np.zeros(0, np.int8),
        group=np.concatenate(groups) if groups else np.zeros(0, np.int64),
        cand=np.concatenate(cand_lists) if cand_lists else np.zeros(0, np.int64),
        members=members,
        hidden_per_member=hidden.degree[members],
    )


def recall_at_k(ex: Examples, scores: np.ndarray, k: int = RECALL_K) -> float:
    """Hidden edges in each member's top k by score, over all hidden edges of the members.

    Ties break by candidate order (friends-of-friends first, by Adamic-Adar weight).
    """
    total = int(ex.hidden_per_member.sum())
    if total == 0:
        return 0.0
    order = np.lexsort((np.arange(scores.size), -scores, ex.group))
    grouped = ex.group[order]
    starts = np.searchsorted(grouped, grouped, side="left")
    rank = np.arange(order.size) - starts
    return float(ex.y[order][rank < k].sum()) / total


def inner_split(graph: Graph, seed: int) -> tuple[Graph, Graph]:
    """(inner training graph, hidden edges) over the same members and dense indices."""
    src, dst = graph.edges()
    (ks, kd), (hs, hd) = split_edges(src, dst, INNER_HOLDOUT, seed)
    inner = Graph.from_edges(ks, kd, members=graph.ids, version="inner")
    hidden = Graph.from_edges(hs, hd, members=graph.ids, version="hidden")
    return inner, hidden


def train_ranker(
    graph: Graph,
    *,
    seed: int = 0,
    max_members: int = MAX_MEMBERS,
    name: str = "pymk-ranker",
    fof_limit: int = FOF_LIMIT,
    ebr_limit: int = EBR_LIMIT,
    stages: Stages | None = None,
) -> TrainedRanker:
    """Train, export to ONNX, verify the export and describe it in a model card.

    `stages` shows each step while it runs (see edgeflow.offline.progress); silent if None."""
    import skl2onnx
    import sklearn
    from sklearn.ensemble import HistGradientBoostingClassifier

    stages = stages if stages is not None else Stages(enabled=False)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if graph.edge_count < 10:
        raise TrainingError(
            f"the graph has {graph.edge_count} edges: at least 10 are needed to train a ranker"
        )
    with stages.stage("ranker: hiding edges, inner features and embeddings") as st:
        inner, hidden = inner_split(graph, seed)
        scalars = member_features(inner)
        embeddings = member_embeddings(inner, EMBEDDING_DIM, seed)
        st.note = f"{hidden.edge_count:,} of {graph.edge_count:,} edges hidden"
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(hidden.degree > 0)
    sample = np.sort(rng.choice(pool, size=min(max_members, pool.size), replace=False))
    shuffled = rng.permutation(sample)
    n_val = min(round(shuffled.size * VALIDATION_SHARE), max(shuffled.size - 1, 0))
    val_members, fit_members = np.sort(shuffled[:n_val]), np.sort(shuffled[n_val:])
    with stages.stage(
        "ranker: candidates and features of sampled members", sample.size, unit="members"
    ) as st:
        fit = build_examples(
            inner, hidden, fit_members, scalars, embeddings, fof_limit, ebr_limit, st.advance
        )
        val = build_examples(
            inner, hidden, val_members, scalars, embeddings, fof_limit, ebr_limit, st.advance
        )
        st.note = f"{sample.size:,} members, {fit.y.size + val.y.size:,} candidate rows"
    seconds["examples"] = time.perf_counter() - t0

    positives = int(fit.y.sum())
    if positives == 0 or positives == fit.y.size:
        raise TrainingError(
            f"no usable labels: {positives} of {fit.y.size} candidate rows are hidden edges "
            f"(graph: {graph.n} members, {graph.edge_count} edges); the graph is too small "
            "or too sparse for friends-of-friends and EBR to find its hidden edges"
        )
    neg = np.flatnonzero(fit.y == 0)
    keep_neg = min(neg.size, NEGATIVES_PER_POSITIVE * positives)
    rows = np.sort(np.concatenate([np.flatnonzero(fit.y == 1), rng.choice(neg, keep_neg, False)]))
    t1 = time.perf_counter()
    model = HistGradientBoostingClassifier(random_state=seed, **GBM_PARAMS)
    trees = int(GBM_PARAMS["max_iter"])
    with stages.stage(
        f"ranker: gradient boosting on {rows.size:,} rows", trees, unit="trees"
    ) as st:
        # fit() reports nothing while it runs; the trees it has grown so far are its count.
        st.watch(lambda: len(getattr(model, "_predictors", None) or ()))
        model.fit(fit.x[rows], fit.y[rows])
        st.update(model.n_iter_)
    seconds["fit"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    with stages.stage("ranker: ONNX export, checked against scikit-learn") as st:
        onnx_bytes = export_onnx(model, len(MODEL_COLUMNS))
        check = val.x if val.x.shape[0] else fit.x[rows]
        diff = verify_onnx(onnx_bytes, check, model.predict_proba(check)[:, OUTPUT_INDEX])
        st.note = f"{len(onnx_bytes):,} bytes, max difference {diff:.1e} on {check.shape[0]:,} rows"
    seconds["export"] = time.perf_counter() - t2

    with stages.stage(f"ranker: metrics on {val_members.size:,} validation members") as st:
        metrics = _metrics(model, val)
        if f"recall_at_{RECALL_K}" in metrics:
            st.note = f"recall@{RECALL_K} {metrics[f'recall_at_{RECALL_K}']:.4f}"
    with stages.stage("ranker: permutation importances", len(MODEL_COLUMNS), unit="features") as st:
        importances = permutation_importances(model, val, seed, st.advance)
    card: dict[str, Any] = {
        "name": name,
        "features": list(MODEL_COLUMNS),
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "output_index": OUTPUT_INDEX,
        "metrics": metrics,
        "training_data_hash": graph.data_hash(),
        "training": {
            **GBM_PARAMS,
            "seed": seed,
            "rows": int(rows.size),
            "positives": positives,
            "graph_version": graph.version,
            "members": graph.n,
            "edges": graph.edge_count,
            "inner_holdout": INNER_HOLDOUT,
            "fit_members": int(fit_members.size),
            "validation_members": int(val_members.size),
            "fof_limit": fof_limit,
            "ebr_limit": ebr_limit,
            "embedding_dim": EMBEDDING_DIM,
            "feature_importances_recall_drop": importances,
        },
        "framework": (
            f"scikit-learn {sklearn.__version__} HistGradientBoostingClassifier, "
            f"skl2onnx {skl2onnx.__version__}"
        ),
    }
    seconds["total"] = time.perf_counter() - t0
    return TrainedRanker(onnx_bytes=onnx_bytes, card=card, model=model, seconds=seconds)


def _metrics(model: Any, val: Examples) -> dict[str, float]:
    """AUC and recall@k on the held-out members' full candidate lists (no subsampling)."""
    from sklearn.metrics import roc_auc_score

    if val.y.size == 0:
        return {}
    scores = model.predict_proba(val.x)[:, OUTPUT_INDEX]
    aa = val.x[:, MODEL_COLUMNS.index("adamic_adar")].astype(np.float64)
    has_both = 0 < int(val.y.sum()) < val.y.size
    model_recall = recall_at_k(val, scores)
    aa_recall = recall_at_k(val, aa)
    found = float(val.y.sum()) / max(int(val.hidden_per_member.sum()), 1)
    # AUC is undefined with one class only; the card's JSON must not carry NaN.
    auc = {"auc": float(roc_auc_score(val.y, scores))} if has_both else {}
    return {
        **auc,
        f"recall_at_{RECALL_K}": model_recall,
        f"adamic_adar_recall_at_{RECALL_K}": aa_recall,
        f"lift_vs_adamic_adar_at_{RECALL_K}": model_recall / aa_recall if aa_recall else 0.0,
        "candidate_recall": found,
        "validation_members": float(val.members.size),
        "validation_hidden_edges": float(val.hidden_per_member.sum()),
    }


def permutation_importances(
    model: Any, val: Examples, seed: int, on_column: Callable[[], object] | None = None
) -> dict[str, float]:
    """Drop in validation recall@k when one column is shuffled: what the ranking relies on.
    `on_column()` is called after each column."""
    if val.y.size == 0:
        return {}
    val = val.first(IMPORTANCE_MEMBERS)
    rng = np.random.default_rng(seed)
    base = recall_at_k(val, model.predict_proba(val.x)[:, OUTPUT_INDEX])
    out: dict[str, float] = {}
    for j, column in enumerate(MODEL_COLUMNS):
        x = val.x.copy()
        x[:, j] = rng.permutation(x[:, j])
        out[column] = round(base - recall_at_k(val, model.predict_proba(x)[:, OUTPUT_INDEX]), 4)
        if on_column is not None:
            on_column()
    return out


def export_onnx(model: Any, width: int) -> bytes:
    """skl2onnx export: float32 input `features` [None, width], probabilities without ZipMap."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import HistGradientBoostingClassifier

    onx = convert_sklearn(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, width]))],
        options={id(model): {"zipmap": False}},
        custom_conversion_functions={HistGradientBoostingClassifier: _convert_hist_gbm},
    )
    names = [o.name for o in onx.graph.output]
    if OUTPUT_NAME not in names:
        raise TrainingError(f"the ONNX export has outputs {names}, expected {OUTPUT_NAME!r}")
    return bytes(onx.SerializeToString())


def _convert_hist_gbm(scope: Any, operator: Any, container: Any) -> None:
    """skl2onnx's own tree-ensemble converter, fed through _IntFlagContainer."""
    from skl2onnx.operator_converters.random_forest import (
        convert_sklearn_random_forest_classifier,
    )

    convert_sklearn_random_forest_classifier(scope, operator, _IntFlagContainer(container))


class _IntFlagContainer:
    """Passes everything to skl2onnx's container, turning bool flags in int lists into ints.

    skl2onnx 1.20 writes leaves' `nodes_missing_value_tracks_true` as Python bools, which
    onnx 1.23 refuses in an INTS attribute; the values are otherwise exactly right.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def add_node(self, *args: Any, **attrs: Any) -> Any:
        for key, value in attrs.items():
            if isinstance(value, list) and any(isinstance(v, bool | np.bool_) for v in value):
                attrs[key] = [int(v) for v in value]
        return self._inner.add_node(*args, **attrs)


def verify_onnx(onnx_bytes: bytes, x: np.ndarray, expected: np.ndarray) -> float:
    """onnxruntime's positive-class probability must equal scikit-learn's; returns max diff."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]
    diff = float(np.max(np.abs(np.asarray(got)[:, OUTPUT_INDEX] - expected), initial=0.0))
    if not diff < PROBA_TOLERANCE:
        raise TrainingError(
            f"the ONNX export disagrees with scikit-learn: max |p_onnx - p_sklearn| = {diff:.2e} "
            f"over {x.shape[0]} rows (tolerance {PROBA_TOLERANCE:g})"
        )
    return diff
