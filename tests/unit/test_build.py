"""Embeddings, the ranker and `edgeflow train`, on real graphs, a real Redis, qdrant-edge in
process, Feast's own CLI and onnxruntime."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import redis
from rich.console import Console

from edgeflow.build import ranker as rk
from edgeflow.build.embeddings import member_embeddings, normalized
from edgeflow.build.train import TrainError, train
from edgeflow.config import Config
from edgeflow.features.compute import member_features
from edgeflow.features.schema import EMBEDDING_DIM, MODEL_COLUMNS, SCALAR_FEATURES
from edgeflow.graph import Graph, read_edge_file, split_edges
from edgeflow.local.redis_server import RedisProcess
from edgeflow.offline.progress import Stages
from edgeflow.stores import keys, vectors
from edgeflow.stores.graph_store import save_graph


def community_graph(n: int = 400, groups: int = 8, seed: int = 0, isolated: int = 3) -> Graph:
    """Dense communities with a few bridges, sparse ids, and some isolated members."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, groups, n)
    u, v = np.triu_indices(n, 1)
    p = np.where(group[u] == group[v], 0.12, 0.004)
    keep = rng.random(u.size) < p
    ids = np.arange(n + isolated, dtype=np.int64) * 13 + 5
    return Graph.from_edges(ids[u[keep]], ids[v[keep]], members=ids[n:])


def outer_split(graph: Graph, seed: int = 1) -> tuple[Graph, Graph]:
    """(training graph, outer hidden edges), both over all of `graph`'s members."""
    (ks, kd), (hs, hd) = split_edges(*graph.edges(), 0.1, seed)
    return Graph.from_edges(ks, kd, members=graph.ids), Graph.from_edges(hs, hd, members=graph.ids)


# ---- embeddings ---------------------------------------------------------------------------
def test_embeddings_shape_deterministic_finite_and_isolated_zero() -> None:
    graph = community_graph()
    # A degree-1 member hanging off member 0.
    src, dst = graph.edges()
    graph = Graph.from_edges(np.append(src, graph.ids[0]), np.append(dst, 10**6), members=graph.ids)
    emb = member_embeddings(graph, seed=3)
    assert emb.shape == (graph.n, EMBEDDING_DIM) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert np.array_equal(emb, member_embeddings(graph, seed=3))
    isolated = graph.degree == 0
    assert isolated.sum() == 3 and not emb[isolated].any()
    leaf = graph.index_of(10**6)
    assert graph.degree[leaf] == 1 and np.linalg.norm(emb[leaf]) > 0
    # Unit rows of the non-isolated members; zero rows stay zero.
    unit = normalized(emb)
    assert np.allclose(np.linalg.norm(unit[~isolated], axis=1), 1.0, atol=1e-5)
    assert not unit[isolated].any()


@pytest.mark.parametrize(
    "graph",
    [
        Graph.from_edges(np.array([1, 2, 3]), np.array([2, 3, 1]), members=np.array([9])),
        Graph.from_edges(np.array([1]), np.array([2])),
        Graph.from_edges(np.zeros(0, np.int64), np.zeros(0, np.int64), members=np.array([4, 5])),
        Graph.from_edges(np.zeros(0, np.int64), np.zeros(0, np.int64)),
    ],
    ids=["triangle+isolated", "one-edge", "no-edges", "empty"],
)
def test_embeddings_tiny_graphs(graph: Graph) -> None:
    emb = member_embeddings(graph, dim=8)
    assert emb.shape == (graph.n, 8) and np.isfinite(emb).all()
    assert not emb[graph.degree == 0].any()


def test_embeddings_reject_bad_dim() -> None:
    with pytest.raises(ValueError, match="embedding dim must be positive"):
        member_embeddings(community_graph(), dim=0)


def test_embedding_retrieval_finds_hidden_edges(facebook_edges: Path) -> None:
    full = Graph.from_edges(*read_edge_file(facebook_edges))
    graph, hidden = outer_split(full)
    unit = normalized(member_embeddings(graph))
    members = np.flatnonzero(hidden.degree > 0)[::4]
    found = sum(
        np.isin(
            rk.ebr_candidates(unit, int(i), graph.neighbors(int(i)), rk.EBR_LIMIT),
            hidden.neighbors(int(i)),
        ).sum()
        for i in members
    )
    recall = found / hidden.degree[members].sum()
    random_recall = rk.EBR_LIMIT / graph.n
    assert recall > 0.6 > 20 * random_recall


# ---- candidates, labels and metrics -------------------------------------------------------
def test_candidates_exclude_self_and_connections_and_union_fof_first() -> None:
    graph = community_graph()
    inv = np.zeros(graph.n)
    unit = normalized(member_embeddings(graph))
    for i in (0, 17, 101):
        cands = rk.candidates(graph, inv, unit, i, fof_limit=30, ebr_limit=20)
        assert i not in cands and not np.isin(cands, graph.neighbors(i)).any()
        assert np.unique(cands).size == cands.size
        fof = rk.friends_of_friends(graph, i, 30, weights=inv)[0]
        assert np.array_equal(cands[: fof.size], fof) and 30 <= cands.size <= 50
    isolated = int(np.flatnonzero(graph.degree == 0)[0])
    assert rk.candidates(graph, inv, unit, isolated).size == 0


def test_recall_at_k_counts_missed_hidden_edges() -> None:
    ex = rk.Examples(
        x=np.zeros((5, len(MODEL_COLUMNS)), np.float32),
        y=np.array([1, 0, 0, 1, 0], np.int8),
        group=np.array([0, 0, 0, 1, 1]),
        cand=np.array([4, 5, 6, 7, 9]),
        members=np.array([3, 8]),
        hidden_per_member=np.array([2, 1]),  # member 3 has a hidden edge no candidate found
    )
    scores = np.array([0.9, 0.1, 0.5, 0.2, 0.8])
    assert rk.recall_at_k(ex, scores, k=1) == pytest.approx(1 / 3)
    assert rk.recall_at_k(ex, scores, k=2) == pytest.approx(2 / 3)
    # Ties keep candidate order.
    assert rk.recall_at_k(ex, np.zeros(5), k=1) == pytest.approx(2 / 3)


def test_labels_come_only_from_the_given_graph() -> None:
    """Outer hidden edges are never positives; every positive is a hidden inner edge."""
    full = community_graph(seed=5)
    graph, outer_hidden = outer_split(full)
    inner, hidden = rk.inner_split(graph, seed=0)
    assert inner.edge_count + hidden.edge_count == graph.edge_count
    members = np.flatnonzero(hidden.degree > 0)
    ex = rk.build_examples(inner, hidden, members, member_features(inner), member_embeddings(inner))
    assert ex.y.sum() > 0
    pos = ex.y == 1
    for a, b in zip(members[ex.group[pos]].tolist(), ex.cand[pos].tolist(), strict=True):
        assert b in hidden.neighbors(a) and b in graph.neighbors(a)
        assert b not in outer_hidden.neighbors(a) and b not in inner.neighbors(a)
    # And every hidden inner edge that is a candidate is labelled positive.
    neg = ~pos
    for a, b in zip(members[ex.group[neg]].tolist(), ex.cand[neg].tolist(), strict=True):
        assert b not in hidden.neighbors(a)


# ---- the ranker on the Facebook graph -----------------------------------------------------
@pytest.fixture(scope="module")
def fb_ranker(facebook_edges: Path) -> tuple[Graph, Graph, rk.TrainedRanker]:
    full = Graph.from_edges(*read_edge_file(facebook_edges))
    graph, hidden = outer_split(full, seed=7)
    return graph, hidden, rk.train_ranker(graph, seed=0)


def test_ranker_beats_adamic_adar_on_inner_split(
    fb_ranker: tuple[Graph, Graph, rk.TrainedRanker],
) -> None:
    _, _, trained = fb_ranker
    m = trained.card["metrics"]
    assert m["recall_at_50"] > m["adamic_adar_recall_at_50"] > 0.5
    assert m["auc"] > 0.9 and m["candidate_recall"] > 0.95
    assert m["validation_members"] == 500


def test_ranker_beats_adamic_adar_on_outer_hidden_edges(
    fb_ranker: tuple[Graph, Graph, rk.TrainedRanker],
) -> None:
    """Served the way the suite serves it: features and embeddings of the training graph."""
    graph, hidden, trained = fb_ranker
    members = np.flatnonzero(hidden.degree > 0)[::3]
    ex = rk.build_examples(graph, hidden, members, member_features(graph), member_embeddings(graph))
    session = ort.InferenceSession(trained.onnx_bytes, providers=["CPUExecutionProvider"])
    scores = session.run([rk.OUTPUT_NAME], {rk.INPUT_NAME: ex.x})[0][:, rk.OUTPUT_INDEX]
    aa = ex.x[:, MODEL_COLUMNS.index("adamic_adar")].astype(np.float64)
    assert rk.recall_at_k(ex, scores) > rk.recall_at_k(ex, aa)


def test_onnx_equals_sklearn(fb_ranker: tuple[Graph, Graph, rk.TrainedRanker]) -> None:
    graph, hidden, trained = fb_ranker
    members = np.flatnonzero(hidden.degree > 0)[:200]
    ex = rk.build_examples(graph, hidden, members, member_features(graph), member_embeddings(graph))
    x = ex.x.copy()
    x[:7, :2] = np.nan  # a member the online store has no row for
    session = ort.InferenceSession(trained.onnx_bytes, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    got = session.run([rk.OUTPUT_NAME], {rk.INPUT_NAME: x})[0]
    want = trained.model.predict_proba(x)
    assert got.shape == want.shape == (x.shape[0], 2)
    assert np.abs(got - want).max() < 1e-4


def test_card_describes_the_model(fb_ranker: tuple[Graph, Graph, rk.TrainedRanker]) -> None:
    graph, _, trained = fb_ranker
    card = trained.card
    assert card["features"] == list(MODEL_COLUMNS)
    assert card["training_data_hash"] == graph.data_hash()
    assert (card["input"], card["output"], card["output_index"]) == ("features", "probabilities", 1)
    training = card["training"]
    assert training["positives"] > 1000 and training["rows"] > 20 * training["positives"] * 0.9
    assert (training["fof_limit"], training["ebr_limit"]) == (400, 100)
    importances = training["feature_importances_recall_drop"]
    assert set(importances) == set(MODEL_COLUMNS)
    assert max(importances, key=importances.__getitem__) == "resource_allocation"
    json.dumps(card, allow_nan=False)  # the registry writes it as strict JSON


def test_verify_onnx_refuses_a_mismatch(fb_ranker: tuple[Graph, Graph, rk.TrainedRanker]) -> None:
    _, _, trained = fb_ranker
    x = np.zeros((4, len(MODEL_COLUMNS)), np.float32)
    right = trained.model.predict_proba(x)[:, 1]
    assert rk.verify_onnx(trained.onnx_bytes, x, right) < 1e-4
    with pytest.raises(rk.TrainingError, match="disagrees with scikit-learn"):
        rk.verify_onnx(trained.onnx_bytes, x, right + 0.01)


def test_ranker_refuses_a_graph_too_small() -> None:
    tiny = Graph.from_edges(np.array([1, 2]), np.array([2, 3]))
    with pytest.raises(rk.TrainingError, match="at least 10 are needed"):
        rk.train_ranker(tiny)
    # A perfect matching: no friends of friends, so nothing hidden is ever a candidate.
    matching = Graph.from_edges(np.arange(0, 80, 2), np.arange(1, 80, 2))
    with pytest.raises(rk.TrainingError, match="no usable labels"):
        rk.train_ranker(matching)


# ---- `edgeflow train` end to end ----------------------------------------------------------
@pytest.fixture
def cfg(redis_proc: RedisProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    for name in ("EDGEFLOW_MODEL_DIR", "QDRANT_PATH", "EDGEFLOW_FEATURE_REPO"):
        monkeypatch.delenv(name, raising=False)
    return Config(home=tmp_path / "home", redis_url=redis_proc.url, qdrant_url="")


def test_train_publishes_embeddings_features_and_model(
    cfg: Config, redis_client: redis.Redis
) -> None:
    graph = community_graph(n=300)
    save_graph(redis_client, graph)
    out = io.StringIO()
    report = train(cfg, seed=0, stages=Stages(Console(file=out, width=80)))

    # Not a terminal: one plain line per stage, naming it, with its duration; no bars.
    lines = out.getvalue().splitlines()
    for stage in (
        "reading the member graph from Redis",
        "embeddings (spectral",
        "member features",
        "ranker: candidates and features",
        "ranker: gradient boosting",
        "ranker: ONNX export",
        "ranker: permutation importances",
        "Qdrant upsert",
        "Qdrant index",
        "Feast apply",
        "Feast materialize",
        "model registry",
    ):
        assert [ln for ln in lines if ln.startswith(stage) and re.search(r"\(\d+\.\ds\)$", ln)], (
            stage,
            lines,
        )
    expected = member_embeddings(graph, seed=0)
    stored = vectors.storable(expected)  # members with an embedding (not the isolated ones)
    assert 0 < stored < graph.n
    assert f"Qdrant upsert: {stored:,} points into collection" in out.getvalue()
    trees = rk.GBM_PARAMS["max_iter"]
    assert f"{trees}/{trees} trees" in out.getvalue()
    assert "\x1b[" not in out.getvalue() and "━" not in out.getvalue()

    assert (report.members, report.edges) == (graph.n, graph.edge_count)
    assert report.model_version == "v1" and report.feature_rows == graph.n
    assert set(report.seconds) >= {"embeddings", "ranker", "qdrant", "feast", "registry", "total"}
    card = json.loads((cfg.model_dir / "pymk-ranker" / "v1" / "card.json").read_text())
    assert card["training_data_hash"] == graph.data_hash()
    assert card["metrics"] == report.metrics and "recall_at_50" in card["metrics"]
    assert (cfg.model_dir / "pymk-ranker" / "v1" / "model.onnx").stat().st_size > 1000

    # The sealed in-process shard holds one vector per member with an embedding, equal to
    # the embedding of the graph (stored normalised: cosine is a dot product).
    assert redis_client.get(keys.EMBEDDINGS_CURRENT) == report.embedding_collection.encode()
    replica = vectors.EdgeReplica.open(cfg.qdrant_path, report.embedding_collection)
    try:
        assert replica.points == stored
        isolated = int(graph.ids[-1])
        assert not np.any(expected[-1]) and replica.vector(isolated) is None
        got = np.asarray(replica.vector(int(graph.ids[5])))
    finally:
        replica.close()
    cos = got @ expected[5] / (np.linalg.norm(got) * np.linalg.norm(expected[5]))
    assert cos == pytest.approx(1.0, abs=1e-5)

    # Feast's own SDK reads the materialised member features back.
    from edgeflow.build.feast_features import feature_store

    rows = (
        feature_store(cfg)
        .get_online_features(
            features=[f"member_features:{name}" for name in SCALAR_FEATURES],
            entity_rows=[{"member_id": int(m)} for m in graph.ids[:3]],
        )
        .to_dict()
    )
    assert rows["degree"] == pytest.approx(graph.degree[:3].astype(float).tolist())


def test_train_without_a_graph_says_so(cfg: Config, redis_client: redis.Redis) -> None:
    with pytest.raises(TrainError, match=r"no member graph in Redis.*edgeflow ingest"):
        train(cfg)


def test_train_with_redis_down_says_where(cfg: Config) -> None:
    dead = Config(home=cfg.home, redis_url="redis://127.0.0.1:1/0", qdrant_url="")
    with pytest.raises(TrainError, match=r"redis://127\.0\.0\.1:1/0"):
        train(dead)


def test_train_with_bad_vector_settings_fails_before_learning(
    cfg: Config, redis_client: redis.Redis
) -> None:
    save_graph(redis_client, community_graph(n=100))
    bad = dataclasses.replace(cfg, qdrant_quantization="int4")
    with pytest.raises(TrainError, match=r"QDRANT_QUANTIZATION must be 'int8' or 'none'"):
        train(bad)
    assert not cfg.model_dir.exists()


# ---- `edgeflow ingest` ---------------------------------------------------------------------
def test_ingest_says_what_the_graph_does_not_keep(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    from edgeflow.build.ingest import current_version, ingest_file

    path = tmp_path / "edges.txt"
    path.write_text("1 2 0.5\n2 3\n3 3\n2 1\n4 1\n")
    notes: list[str] = []
    graph = ingest_file(redis_client, path, on_note=notes.append)
    assert (graph.n, graph.edge_count) == (4, 3)
    assert current_version(redis_client) == graph.version
    assert [n.split(" (")[0] for n in notes] == [
        "dropped 1 self loop",
        "dropped 1 duplicate edge",
        "ignored the columns after the first two on 1 line",
    ]
    assert "(first on line 3)" in notes[0] and "(first on line 4)" in notes[1]
    assert "(first on line 1)" in notes[2]


def test_ingest_refuses_a_file_of_self_loops_and_keeps_the_old_graph(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    from edgeflow.build.ingest import current_version, ingest_file
    from edgeflow.graph import EdgeFileError

    assert current_version(redis_client) is None
    good = tmp_path / "good.txt"
    good.write_text("1 2\n")
    kept = ingest_file(redis_client, good).version
    loop = tmp_path / "loop.txt"
    loop.write_text("7 7\n")
    with pytest.raises(EdgeFileError, match=rf"^{loop}: no edges: its 1 edge line is a self loop"):
        ingest_file(redis_client, loop)
    assert current_version(redis_client) == kept


def test_ingest_knows_when_a_running_local_suite_serves_the_graph(tmp_path: Path) -> None:
    import os

    from edgeflow.build.ingest import live_graph, rebuild_steps
    from edgeflow.local import suite as local

    home = tmp_path / "home"
    cfg = Config(home=home, redis_url="redis://127.0.0.1:16390/0", qdrant_url="")
    edges = tmp_path / "new.txt"
    assert live_graph(cfg, edges) == ""  # no suite
    ports = {name: 0 for name in local.PROCESSES} | {"redis": 16390}
    suite = local.Suite(home=home, ports=ports, pids={"gateway": os.getpid()}, persist=True)
    suite.save()
    why = live_graph(cfg, edges)
    assert why.startswith(f"the suite under {home} is up (gateway) and serves the graph")
    assert f"`edgeflow quickstart --edges {edges}`" in why and "--replace-live" in why
    elsewhere = dataclasses.replace(cfg, redis_url="redis://127.0.0.1:16391/0")
    assert live_graph(elsewhere, edges) == ""  # another Redis: not the suite's graph
    suite.pids = {"gateway": 0}  # services stopped: nothing is served
    suite.save()
    assert live_graph(cfg, edges) == ""

    live = rebuild_steps(cfg, edges, live=True)
    stale = (
        "the embeddings (Qdrant), member features (Feast), the ranker and the precomputed lists "
        "(follows, pymk) were built from the previous graph: rebuild them with "
    )
    runs = (
        "`edgeflow train`, then `edgeflow offline run --workflow follows`, "
        "`edgeflow offline run --workflow pymk`"
    )
    # Training runs beside a running suite: it writes a fresh in-process shard.
    assert live == stale + runs + " (the running suite switches to each as it is published)"
    assert rebuild_steps(cfg, edges, live=False) == stale + runs
