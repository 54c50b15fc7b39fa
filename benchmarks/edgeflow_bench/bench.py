"""`edgeflow bench`: end-to-end and per-service latency, against the straightforward
in-process pipeline (Feast SDK + qdrant-client + onnxruntime) timed in the same run."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from edgeflow import config, tensor
from edgeflow.cli import CliError
from edgeflow.cli.harness import Harness, running_suite
from edgeflow.cli.quickstart import FACEBOOK_CANDIDATES
from edgeflow.features import schema
from edgeflow.features.compute import model_matrix
from edgeflow.features.service import MAX_ENTITIES
from edgeflow.graph import Graph, friends_of_friends, inverse_log_degree, read_edge_file
from edgeflow.local.suite import SERVICES, cpu_seconds, peak_rss_mb
from edgeflow.shell import auth
from edgeflow.v1 import (
    candidates_pb2,
    candidates_pb2_grpc,
    features_pb2,
    features_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    merging_pb2,
    merging_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)
from edgeflow.workflow.ops import EbrParams, GraphParams
from edgeflow.workflow.validate import load_workflow
from edgeflow_bench.capacity import recommend_capacity

ENTITY_REFS = [f"{schema.FEATURE_VIEW}:{f}" for f in schema.ENTITY_FEATURES]
# qdrant-client's local mode is an exact search in Python that warns above this many points;
# past it the in-process pipeline searches the same vectors exactly with numpy (what a
# Qdrant server would be for), so its upsert and queries do not decide the comparison.
NAIVE_QDRANT_MAX_POINTS = 20_000
# Offline runs in `bench` stop after this long (a graph of millions of members).
OFFLINE_TIMEOUT_S = 3600.0


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 3)


async def timed(
    fn: Callable[[], Awaitable[Any]],
    n: int,
    warmup: int = 20,
    failures: Counter[str] | None = None,
) -> list[float]:
    """Milliseconds of `n` calls after `warmup` ones. With `failures`, a call that fails
    with a gRPC error is counted there by status (and timed no further) instead of raised:
    for end-to-end calls, whose deadlines can run out on a busy machine."""
    for _ in range(warmup):
        try:
            await fn()
        except grpc.aio.AioRpcError:
            if failures is None:
                raise
    out = []
    for _ in range(n):
        t = time.perf_counter()
        try:
            await fn()
        except grpc.aio.AioRpcError as exc:
            if failures is None:
                raise
            failures[exc.code().name] += 1
            continue
        out.append((time.perf_counter() - t) * 1000)
    return out


class NaivePipeline:
    """What a team writes first: one process calling the SDKs directly per request."""

    def __init__(self, h: Harness, graph: Graph, embeddings: np.ndarray) -> None:
        import onnxruntime as ort
        from feast import FeatureStore
        from qdrant_client import QdrantClient, models

        self.graph = graph
        self.weights = inverse_log_degree(graph)
        wf = load_workflow(h.cfg.workflows_dir / "pymk.yaml")
        self.fof_limit = next(n.params for n in wf.nodes if isinstance(n.params, GraphParams)).limit
        self.ebr_limit = next(n.params for n in wf.nodes if isinstance(n.params, EbrParams)).limit
        self.store = FeatureStore(repo_path=str(h.cfg.feature_repo))
        self.embeddings = embeddings
        self.qdrant: QdrantClient | None = None
        self.unit: np.ndarray | None = None
        if graph.n <= NAIVE_QDRANT_MAX_POINTS:
            self.ebr = "qdrant-client local mode (in memory)"
            self.qdrant = QdrantClient(":memory:")
            self.qdrant.create_collection(
                "members",
                vectors_config=models.VectorParams(
                    size=embeddings.shape[1], distance=models.Distance.COSINE
                ),
            )
            for start in range(0, graph.n, 5000):
                stop = start + 5000
                self.qdrant.upsert(
                    "members",
                    points=models.Batch(
                        ids=graph.ids[start:stop].tolist(), vectors=embeddings[start:stop].tolist()
                    ),
                )
        else:
            self.ebr = (
                f"numpy exact search (more than {NAIVE_QDRANT_MAX_POINTS:,} points, the most "
                "qdrant-client local mode is meant for)"
            )
            self.unit = unit_rows(embeddings)
        model_dir = max((h.cfg.model_dir / "pymk-ranker").iterdir(), key=lambda p: int(p.name[1:]))
        card = json.loads((model_dir / "card.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), opts)
        self.card = card
        self.col_index = [schema.MODEL_COLUMNS.index(c) for c in card["features"]]

    def recommend(self, member: int, k: int) -> list[int]:
        g = self.graph
        i = g.index_of(member)
        fof, _, _ = friends_of_friends(g, i, self.fof_limit, self.weights)
        fetch = self.ebr_limit + int(g.degree[i]) + 1
        if self.qdrant is not None:
            hits = self.qdrant.query_points(
                "members", query=self.embeddings[i].tolist(), limit=fetch
            ).points
            ebr = g.indices_of(np.asarray([p.id for p in hits], dtype=np.int64))
        else:
            assert self.unit is not None
            ebr = top_by_cosine(self.unit, self.unit[i : i + 1], fetch)[0]
        nbrs = set(g.neighbors(i).tolist()) | {i}
        ebr = np.asarray(
            [x for x in ebr if x >= 0 and x not in nbrs][: self.ebr_limit], dtype=np.int64
        )
        cands = np.unique(np.concatenate([fof, ebr]))
        rows = [{schema.JOIN_KEY: int(m)} for m in [member, *g.ids[cands].tolist()]]
        feats = self.store.get_online_features(features=ENTITY_REFS, entity_rows=rows).to_dict()
        scal = np.asarray([feats[f] for f in schema.SCALAR_FEATURES], dtype=np.float32).T
        emb = np.asarray(feats[schema.EMBEDDING_FEATURE], dtype=np.float32)
        x = model_matrix(g, self.weights, i, cands, scal[0], scal[1:], emb[0], emb[1:])
        out = self.session.run([self.card["output"]], {self.card["input"]: x[:, self.col_index]})
        probs = np.asarray(out[0])[:, self.card.get("output_index", 1)]
        top = np.argsort(-probs, kind="stable")[:k]
        return [int(m) for m in g.ids[cands[top]]]


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


def top_by_cosine(
    unit: np.ndarray, queries: np.ndarray, k: int, exclude: list[np.ndarray] | None = None
) -> np.ndarray:
    """Rows of `unit` (unit-length) nearest each query row by cosine, best first: (q, k)
    dense indices, -1 where fewer exist. `exclude[j]` are rows query j must not return;
    zero rows are never returned."""
    sims = queries @ unit.T  # (q, n): callers keep q small
    sims[:, ~unit.any(axis=1)] = -np.inf
    for j, rows in enumerate(exclude or []):
        sims[j, rows] = -np.inf
    k = min(k, unit.shape[0])
    out = np.full((queries.shape[0], k), -1, dtype=np.int64)
    if k == 0:
        return out
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    for j in range(queries.shape[0]):
        row = top[j][np.isfinite(sims[j, top[j]])]
        row = row[np.lexsort((row, -sims[j, row]))]
        out[j, : row.size] = row
    return out


async def entity_features(
    stub: features_pb2_grpc.FeatureServiceStub, ids: np.ndarray, batch: int = MAX_ENTITIES
) -> np.ndarray:
    """Entity features (scalars, then the embedding) of every id, in calls of at most
    `batch` ids (the features service takes at most MAX_ENTITIES per request)."""
    parts = []
    for start in range(0, ids.size, batch):
        req = features_pb2.GetFeaturesRequest(entities=ids[start : start + batch].tolist())
        parts.append(tensor.unpack((await stub.GetFeatures(req, timeout=60)).features))
    return np.concatenate(parts) if parts else np.zeros((0, len(schema.ENTITY_COLUMNS)))


async def bench(h: Harness, graph: Graph, requests: int) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    pool = graph.ids[graph.degree > 0]
    members = rng.choice(pool, size=min(requests, pool.size), replace=False)
    gw = h.channel("gateway", auth.local_key(h.suite.home))
    stub = gateway_pb2_grpc.RecommenderStub(gw)
    result: dict[str, Any] = {}

    # End to end, sequential.
    it = iter(np.resize(members, requests + 50).tolist())

    async def recommend() -> None:
        await stub.Recommend(
            gateway_pb2.RecommendRequest(surface="pymk", member=next(it), k=50), timeout=5
        )

    failed: Counter[str] = Counter()
    cpu_before = {name: cpu_seconds(pid) for name, pid in h.suite.pids.items()}
    lat = await timed(recommend, requests, warmup=50, failures=failed)
    # CPU of every process of the suite (Redis included) over those calls, warm-up too.
    spent = {name: (cpu_seconds(pid) - cpu_before[name]) * 1000 / (requests + 50)
             for name, pid in h.suite.pids.items()}  # fmt: skip
    result["recommend_p50_ms"] = pct(lat, 50)
    result["recommend_p99_ms"] = pct(lat, 99)
    result["recommend_failed"] = dict(failed)
    spent = {name: v for name, v in sorted(spent.items()) if math.isfinite(v)}  # still alive
    result["cpu_ms_per_recommend"] = round(sum(spent.values()), 2)
    result["cpu_ms_per_recommend_by_process"] = {name: round(v, 3) for name, v in spent.items()}
    partial, scored = 0, []
    for m in members[:100].tolist():
        try:
            resp = await stub.Recommend(
                gateway_pb2.RecommendRequest(surface="pymk", member=m, k=50, debug=True),
                timeout=5,
            )
        except grpc.aio.AioRpcError as exc:
            failed[exc.code().name] += 1
            continue
        partial += int(resp.partial)
        scored += [n.items_in for n in resp.funnel.nodes if n.op == "scoring.onnx"]
    result["recommend_candidates_scored_mean"] = round(float(np.mean(scored)), 1)
    result["recommend_partial_responses"] = partial

    # Shadow traffic: the same requests with and without a shadow variant running.
    result.update(await shadow_overhead(stub, members.tolist()))

    # End to end under concurrent load.
    for conc in (4, 16):
        result.update(await load(stub, np.resize(members, requests).tolist(), conc))

    # Capacity: the highest open-loop rate that keeps p99 <= 100 ms, partial+failed <= 1%.
    result.update((await recommend_capacity(stub, members.tolist())).as_json())

    # Per service.
    result.update(await per_service(h, graph, members))

    # Features for 500 entities against Feast's SDK on the same Redis.
    fch = h.channel("features")
    fstub = features_pb2_grpc.FeatureServiceStub(fch)
    ents = rng.choice(graph.ids, size=500, replace=False).tolist()
    req = features_pb2.GetFeaturesRequest(entities=ents)
    ours = await timed(lambda: fstub.GetFeatures(req, timeout=5), 200)
    served = tensor.unpack((await fstub.GetFeatures(req)).features)
    all_emb = await entity_features(fstub, graph.ids)
    await fch.close()
    embeddings = np.ascontiguousarray(all_emb[:, len(schema.SCALAR_FEATURES) :])

    naive = NaivePipeline(h, graph, embeddings)
    rows = [{schema.JOIN_KEY: m} for m in ents]
    feast_lat = []
    for _ in range(40):
        t = time.perf_counter()
        ref = naive.store.get_online_features(features=ENTITY_REFS, entity_rows=rows).to_dict()
        feast_lat.append((time.perf_counter() - t) * 1000)
    ref_matrix = np.column_stack(
        [np.asarray(ref[f], dtype=np.float32) for f in schema.SCALAR_FEATURES]
        + [np.asarray(ref[schema.EMBEDDING_FEATURE], dtype=np.float32)]
    )
    result["features_500_p50_ms"] = pct(ours, 50)
    result["feast_sdk_500_p50_ms"] = pct(feast_lat, 50)
    result["features_speedup"] = round(
        result["feast_sdk_500_p50_ms"] / result["features_500_p50_ms"], 1
    )
    result["features_identical"] = bool(np.array_equal(served, ref_matrix))

    # The in-process pipeline, same model and the same candidate recipe, same members.
    naive_lat = []
    for m in members[: min(requests, 150)].tolist():
        t = time.perf_counter()
        naive.recommend(m, 50)
        naive_lat.append((time.perf_counter() - t) * 1000)
    result["naive_pipeline_ebr"] = naive.ebr
    result["naive_pipeline_p50_ms"] = pct(naive_lat, 50)
    result["naive_pipeline_p99_ms"] = pct(naive_lat, 99)
    result["speedup_vs_naive_p50"] = round(
        result["naive_pipeline_p50_ms"] / result["recommend_p50_ms"], 2
    )

    # Offline against Recommend, then nearline freshness on the lists the offline run wrote.
    result.update(await offline_throughput(h, stub, members))
    result.update(await nearline_freshness(h, graph, stub))

    result["rss_mb"] = {name: peak_rss_mb(h.suite.pids[name]) for name in SERVICES}
    await gw.close()
    return result


SHADOW_SURFACES = {"pymk-shadow-10": 0.1, "pymk-shadow-100": 1.0}


def write_shadow_workflows(src: Path, dst: Path) -> None:
    """Copy the workflows and add pymk with a shadow (twice the EBR candidates, a wider
    friends-of-friends) run on 10% and on 100% of requests."""
    import yaml

    shutil.copytree(src, dst, dirs_exist_ok=True)
    doc = yaml.safe_load((src / "pymk.yaml").read_text())
    for surface, share in SHADOW_SURFACES.items():
        doc["metadata"]["name"] = doc["spec"]["surface"] = surface
        doc["spec"]["modes"] = {"online": {"enabled": True}}
        doc["spec"]["shadows"] = [
            {
                "name": "wider",
                "share": share,
                "overrides": {"params": {"ebr": {"limit": 400}, "fof": {"limit": 700}}},
            }
        ]
        (dst / f"{surface}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


async def shadow_overhead(
    stub: gateway_pb2_grpc.RecommenderStub, members: list[int], rounds: int = 4, block: int = 75
) -> dict[str, Any]:
    """Served latency with a shadow on 10% and 100% of requests, against none, in blocks that
    alternate on the same members, so drift on a shared machine hits all alike."""
    lat: dict[str, list[float]] = {"pymk": [], **{s: [] for s in SHADOW_SURFACES}}
    failed: Counter[str] = Counter()
    ring = np.resize(np.asarray(members), block).tolist()
    for _ in range(rounds):
        for surface in lat:
            it = iter(ring)

            async def call(surface: str = surface, it: Any = it) -> None:
                req = gateway_pb2.RecommendRequest(surface=surface, member=next(it), k=50)
                await stub.Recommend(req, timeout=5)

            lat[surface] += await timed(call, block, warmup=0, failures=failed)
            await asyncio.sleep(0.2)  # let the block's last shadows finish
    base = pct(lat["pymk"], 50)
    out: dict[str, Any] = {"shadow_baseline_p50_ms": base}
    for surface, share in SHADOW_SURFACES.items():
        tag = f"{round(share * 100)}pct"
        p50, p99 = pct(lat[surface], 50), pct(lat[surface], 99)
        out[f"shadow_{tag}_p50_ms"] = p50
        out[f"shadow_{tag}_p99_ms"] = p99
        out[f"shadow_{tag}_latency_overhead_pct"] = round((p50 / base - 1) * 100, 1)
    out["shadow_baseline_p99_ms"] = pct(lat["pymk"], 99)
    out["shadow_latency_overhead_pct"] = out["shadow_10pct_latency_overhead_pct"]
    out["shadow_failed"] = dict(failed)
    return out


async def load(
    stub: gateway_pb2_grpc.RecommenderStub, members: list[int], concurrency: int
) -> dict[str, Any]:
    """Recommend at a fixed concurrency: throughput, latency, partial and failed requests."""
    it = iter(members)
    lats: list[float] = []
    partial = 0
    failed: Counter[str] = Counter()

    async def worker() -> None:
        nonlocal partial
        for m in it:
            t = time.perf_counter()
            req = gateway_pb2.RecommendRequest(surface="pymk", member=m, k=50)
            try:
                resp = await stub.Recommend(req, timeout=5)
            except grpc.aio.AioRpcError as exc:
                failed[exc.code().name] += 1
                continue
            partial += int(resp.partial)
            lats.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        f"recommend_c{concurrency}_qps": round(len(lats) / wall, 1),
        f"recommend_c{concurrency}_p50_ms": pct(lats, 50),
        f"recommend_c{concurrency}_p99_ms": pct(lats, 99),
        f"recommend_c{concurrency}_partial": partial,
        f"recommend_c{concurrency}_failed": dict(failed),
    }


async def per_service(h: Harness, graph: Graph, members: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    hub = int(graph.ids[int(np.argmax(graph.degree))])
    typical = int(members[0])
    cch = h.channel("candidates")
    cstub = candidates_pb2_grpc.CandidateServiceStub(cch)
    for label, member, source, limit in (
        ("generate_graph_typical", typical, "graph", 400),
        ("generate_graph_hub", hub, "graph", 400),
        ("generate_ebr", typical, "ebr", 100),
    ):
        req = candidates_pb2.GenerateRequest(member=member, source=source, limit=limit)
        lat = await timed(functools.partial(cstub.Generate, req, timeout=5), 200)
        out[f"{label}_p50_ms"], out[f"{label}_p99_ms"] = pct(lat, 50), pct(lat, 99)
    cands = (
        await cstub.Generate(candidates_pb2.GenerateRequest(member=hub, source="graph", limit=500))
    ).ids
    await cch.close()

    fch = h.channel("features")
    fstub = features_pb2_grpc.FeatureServiceStub(fch)
    freq = features_pb2.GetFeaturesRequest(member=hub, entities=cands)
    lat = await timed(lambda: fstub.GetFeatures(freq, timeout=5), 200)
    out["features_pairs_500_p50_ms"], out["features_pairs_500_p99_ms"] = pct(lat, 50), pct(lat, 99)
    feats = (await fstub.GetFeatures(freq)).features
    await fch.close()

    sch = h.channel("scoring")
    sstub = scoring_pb2_grpc.ScoringServiceStub(sch)
    sreq = scoring_pb2.ScoreRequest(model="pymk-ranker", features=feats)
    lat = await timed(lambda: sstub.Score(sreq, timeout=5), 200)
    out["score_500_p50_ms"], out["score_500_p99_ms"] = pct(lat, 50), pct(lat, 99)
    scores = tensor.unpack((await sstub.Score(sreq)).scores)[:, 0]
    await sch.close()

    mch = h.channel("merging")
    mstub = merging_pb2_grpc.MergingServiceStub(mch)
    mreq = merging_pb2.MergeRequest(
        member=hub, k=50, filters=["self", "connected", "blocked", "dismissed"],
        lists=[merging_pb2.ScoredList(name="rank", ids=cands, weight=1.0, model_column=0,
                                      scores=tensor.pack(scores, ["score"]))],
    )  # fmt: skip
    lat = await timed(lambda: mstub.Merge(mreq, timeout=5), 200)
    out["merge_500_p50_ms"], out["merge_500_p99_ms"] = pct(lat, 50), pct(lat, 99)
    await mch.close()
    return out


async def offline_throughput(
    h: Harness, stub: gateway_pb2_grpc.RecommenderStub, members: np.ndarray
) -> dict[str, Any]:
    """Member-candidate pairs scored per second: Recommend for one member after another
    (pairs = what its scoring node scored), and the offline job over every member."""
    pairs, t0 = 0, time.perf_counter()
    for m in members[:300].tolist():
        req = gateway_pb2.RecommendRequest(surface="pymk", member=m, k=50, debug=True)
        try:
            resp = await stub.Recommend(req, timeout=5)
        except grpc.aio.AioRpcError:  # a busy machine: its pairs are not counted
            continue
        pairs += sum(n.items_in for n in resp.funnel.nodes if n.op == "scoring.onnx")
    online = pairs / (time.perf_counter() - t0)
    out: dict[str, Any] = {"recommend_pairs_per_s": round(online)}
    for workflow in ("pymk", "follows"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeflow.cli.main", "offline", "run", "--workflow", workflow,
            "--json", "--quiet", env=h.suite.env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), OFFLINE_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CliError(
                f"offline run of {workflow} took over {OFFLINE_TIMEOUT_S:.0f}s"
            ) from None
        if proc.returncode != 0:
            raise CliError(f"offline run of {workflow} failed:\n{stderr.decode()[-2000:]}")
        if workflow == "pymk":
            summary = json.loads(stdout.decode().splitlines()[-1])
            offline = summary["pairs_scored"] / summary["seconds"]
            out["offline_pairs_per_s"] = round(offline)
            out["offline_members"] = summary["members"]
            out["offline_seconds"] = summary["seconds"]
            out["offline_speedup"] = round(offline / online, 1)
    return out


async def nearline_freshness(
    h: Harness, graph: Graph, stub: gateway_pb2_grpc.RecommenderStub, rate: float = 50.0,
    events: int = 250,
) -> dict[str, Any]:  # fmt: skip
    """From Publish of a connect to the worker's announcement that the lists reflecting it
    are stored, at `rate` events per second (after a warm-up that loads Feast's push)."""
    import redis.asyncio as aioredis

    from edgeflow.stores import keys, lists
    from edgeflow.stores.redis_client import connect, parse_url

    rng = np.random.default_rng(11)
    stored: dict[str, float] = {}
    addr = parse_url(h.cfg.redis_url)
    if addr.cluster:
        # redis-py's async cluster client has no pub/sub; PUBLISH in a Redis Cluster reaches
        # every node, so one node's subscription sees every message.
        host, port = addr.nodes[0]
        listener = aioredis.Redis(host=host, port=port, username=addr.username,
                                  password=addr.password, ssl=addr.tls)  # fmt: skip
    else:
        listener = aioredis.Redis.from_url(h.cfg.redis_url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(keys.NEARLINE_STORED)

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                now = time.perf_counter()
                for event_id in json.loads(msg["data"])["events"]:
                    stored.setdefault(event_id, now)

    async def publish(event_id: str) -> tuple[int, float]:
        while True:
            u, v = (int(x) for x in rng.choice(graph.ids, 2, replace=False))
            if graph.index_of(v) not in graph.neighbors(graph.index_of(u)):
                break
        t = time.perf_counter()
        event = gateway_pb2.MemberEvent(
            type=gateway_pb2.MemberEvent.CONNECT, member=u, target=v, event_id=event_id
        )
        await stub.Publish(gateway_pb2.PublishRequest(events=[event]), timeout=5)
        return u, t

    async def settle(ids: list[str], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while any(i not in stored for i in ids) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)

    task = asyncio.create_task(listen())
    try:
        warm = [f"warm-{time.time()}-{i}" for i in range(3)]
        for event_id in warm:
            await publish(event_id)
        await settle(warm, 120)
        sent: dict[str, tuple[int, float]] = {}
        t0 = time.perf_counter()
        for i in range(events):
            event_id = f"bench-{time.time()}-{i}"
            sent[event_id] = await publish(event_id)
            await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.perf_counter()))
        await settle(list(sent), 30)
    finally:
        task.cancel()
        await pubsub.aclose()
        await listener.aclose()
    lat = [(stored[e] - t) * 1000 for e, (_, t) in sent.items() if e in stored]
    if not lat:
        raise CliError("the nearline worker stored no list during the benchmark")
    last = max(stored[e] for e in sent if e in stored)
    client = connect(h.cfg.redis_url)
    sample = [u for u, _ in list(sent.values())[-20:]]
    modes = {e.mode for e in lists.read_lists(client, "pymk", sample) if e is not None}
    client.close()
    return {
        "nearline_freshness_p50_ms": pct(lat, 50),
        "nearline_freshness_p99_ms": pct(lat, 99),
        "nearline_events_per_s": round(len(lat) / (last - t0), 1),
        "nearline_offered_events_per_s": rate,
        "nearline_events_stored": f"{len(lat)}/{events}",
        "nearline_stored_modes": sorted(modes),
    }


def run(args: argparse.Namespace) -> int:
    cluster = getattr(args, "redis_cluster", 0) or 0
    if getattr(args, "scale", False):
        from edgeflow_bench import scale

        return scale.run(args)
    edges = args.edges or next((p for p in FACEBOOK_CANDIDATES if p.exists()), None)
    if edges is None:
        raise CliError("no edge list: pass --edges (the Facebook graph was not found)")
    if args.requests < 50:
        raise CliError("--requests must be at least 50")
    t0 = time.perf_counter()
    src, dst = read_edge_file(edges)
    graph = Graph.from_edges(src, dst)
    with tempfile.TemporaryDirectory(prefix="edgeflow-bench-") as tmp:
        # The services read the workflows from here: the repository's, plus shadowed pymk.
        write_shadow_workflows(config.load().workflows_dir, Path(tmp))
        os.environ["EDGEFLOW_WORKFLOWS"] = tmp
        with running_suite(graph, seed=0, log=not args.json, redis_cluster=cluster) as h:
            result = asyncio.run(bench(h, graph, args.requests))
    result["edges"] = str(Path(edges).name)
    result["members"] = graph.n
    result["requests"] = args.requests
    result["machine"] = f"{platform.machine()} {_cpus()} cpus, python {platform.python_version()}"
    result["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=None if args.json else 2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
