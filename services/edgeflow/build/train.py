"""`edgeflow train`: everything learned from the ingested graph, built and then published.

Learning happens first (embeddings, member features, the ranker), publishing after (Qdrant,
Feast, the model registry), so a graph that cannot yield a model publishes nothing. The vector
store is opened before the learning starts, so a bad setting fails in a second, not later.
Without QDRANT_URL the embeddings go into a fresh in-process shard (vectors.py), so training
runs beside a candidates service that serves the previous one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from edgeflow.build.embeddings import member_embeddings
from edgeflow.build.ranker import EBR_LIMIT, FOF_LIMIT, train_ranker
from edgeflow.config import Config
from edgeflow.features.compute import member_features
from edgeflow.features.schema import EMBEDDING_DIM
from edgeflow.offline.progress import Stages, duration
from edgeflow.stores import redis_client, vectors
from edgeflow.stores.graph_store import GraphNotLoaded, load_graph


class TrainError(RuntimeError):
    """Training could not start or finish; the message says what and where."""


@dataclass
class TrainReport:
    graph_version: str
    members: int
    edges: int
    embedding_collection: str
    embedding_dim: int
    feature_rows: int
    feature_repo: str
    model_name: str
    model_version: str
    metrics: dict[str, float]
    feature_importances: dict[str, float]  # drop in validation recall@50 when shuffled
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def summary(self, times: bool = True) -> str:
        """What was trained and published; with `times`, each step's duration."""
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
        steps = ", ".join(f"{k} {duration(v)}" for k, v in self.seconds.items())
        text = (
            f"trained on graph {self.graph_version} ({self.members:,} members, "
            f"{self.edges:,} edges)\n"
            f"  embeddings: {self.members:,} x {self.embedding_dim} in Qdrant collection "
            f"{self.embedding_collection}\n"
            f"  features:   {self.feature_rows:,} members materialised into Feast "
            f"({self.feature_repo})\n"
            f"  model:      {self.model_name} {self.model_version} ({metrics})"
        )
        return text + f"\n  time:       {steps}" if times else text


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._last, 3)
        self._last = now

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self._start, 3)}


def candidate_limits(workflows_dir: Path, model_name: str) -> tuple[int, int]:
    """Friends-of-friends and EBR limits of the workflows that serve `model_name`, so the
    ranker learns on the candidates it will score (the largest limit of each kind wins)."""
    from edgeflow.workflow.ops import EbrParams, GraphParams, OnnxParams
    from edgeflow.workflow.validate import load_directory

    workflows, _ = load_directory(workflows_dir) if workflows_dir.is_dir() else ({}, [])
    fof, ebr = 0, 0
    for wf in workflows.values():
        if not any(isinstance(n.params, OnnxParams) and n.params.model == model_name
                   for n in wf.nodes):  # fmt: skip
            continue
        for n in wf.nodes:
            if isinstance(n.params, GraphParams):
                fof = max(fof, n.params.limit)
            elif isinstance(n.params, EbrParams):
                ebr = max(ebr, n.params.limit)
    return fof or FOF_LIMIT, ebr or EBR_LIMIT


def train(
    cfg: Config,
    *,
    seed: int = 0,
    model_name: str = "pymk-ranker",
    stages: Stages | None = None,
) -> TrainReport:
    """Embeddings -> Qdrant, member features -> Feast, ranker -> the model registry.

    `stages` shows each step while it runs (see edgeflow.offline.progress); silent if None.
    """
    from edgeflow.build.feast_features import publish_member_features
    from edgeflow.scoring.registry import publish_model

    stages = stages if stages is not None else Stages(enabled=False)
    clock = _Clock()
    rds = redis_client.connect(cfg.redis_url)
    try:
        with stages.stage("reading the member graph from Redis") as st:
            try:
                graph = load_graph(rds, cache_dir=cfg.graph_dir)
            except GraphNotLoaded as exc:
                raise TrainError(f"Redis at {cfg.redis_url}: {exc}") from exc
            except redis.RedisError as exc:
                raise TrainError(
                    f"cannot read the member graph from Redis at {cfg.redis_url}: {exc}"
                ) from exc
            st.note = f"{graph.n:,} members, {graph.edge_count:,} edges"
        if graph.edge_count == 0:
            raise TrainError(f"the member graph {graph.version} has no edges: nothing to learn")
        clock.lap("load_graph")

        with stages.stage("opening Qdrant") as st:
            try:
                qdrant = vectors.open_store(cfg)
            except (ValueError, OSError) as exc:
                raise TrainError(f"cannot open the vector store: {exc}") from exc
            st.note = qdrant.describe()
        try:
            with stages.stage(f"embeddings (spectral, {EMBEDDING_DIM} dimensions)") as st:
                embeddings = member_embeddings(graph, EMBEDDING_DIM, seed)
                st.note = f"{graph.n:,} members"
            clock.lap("embeddings")
            with stages.stage("member features") as st:
                scalars = member_features(graph)
                st.note = f"{graph.n:,} members"
            clock.lap("member_features")
            fof_limit, ebr_limit = candidate_limits(cfg.workflows_dir, model_name)
            ranker = train_ranker(
                graph,
                seed=seed,
                name=model_name,
                fof_limit=fof_limit,
                ebr_limit=ebr_limit,
                stages=stages,
            )
            clock.lap("ranker")
            points = vectors.storable(embeddings)
            with stages.stage("Qdrant upsert", points, unit="points") as st:
                build = qdrant.begin(
                    vectors.collection_name(graph.version), graph.ids, embeddings, st.advance
                )
                st.note = f"{points:,} points into collection {build.name}" + (
                    f" ({graph.n - points:,} members without an embedding)"
                    if points < graph.n
                    else ""
                )
            clock.lap("qdrant")
            with stages.stage("Qdrant index") as st:
                written = build.finish()
                collection = vectors.publish(qdrant, rds, build.name)
                st.note = f"{collection} is current" + (
                    f" (HNSW over {written.points:,} points)"
                    if written.index_s
                    else " (the server indexes it)"
                )
            clock.lap("qdrant_index")
        finally:
            qdrant.close()
    finally:
        rds.close()

    repo = publish_member_features(cfg, graph, scalars, embeddings, stages)
    clock.lap("feast")
    with stages.stage("model registry") as st:
        version = publish_model(cfg.model_dir, model_name, ranker.onnx_bytes, ranker.card)
        st.note = f"{model_name} {version} in {cfg.model_dir}"
    clock.lap("registry")
    return TrainReport(
        graph_version=graph.version,
        members=graph.n,
        edges=graph.edge_count,
        embedding_collection=collection,
        embedding_dim=EMBEDDING_DIM,
        feature_rows=graph.n,
        feature_repo=str(repo),
        model_name=model_name,
        model_version=version,
        metrics=ranker.card["metrics"],
        feature_importances=ranker.card["training"]["feature_importances_recall_drop"],
        seconds=clock.total(),
    )
