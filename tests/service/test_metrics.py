"""Prometheus metrics: the in-process suite's real services, scraped over HTTP from /metrics
and parsed with prometheus_client's own parser; the nearline worker on a real Redis; and
`edgeflow serve` with METRICS_PORT as a process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from inprocess import Suite, members_with_degree
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edgeflow.config import Config
from edgeflow.local.ports import free_port
from edgeflow.local.redis_server import RedisProcess
from edgeflow.local.suite import METRICS_OFFSET, new_suite
from edgeflow.nearline.events import Event, publish
from edgeflow.nearline.worker import Processor, backlog, ensure_group
from edgeflow.shell import metrics
from edgeflow.shell.server import channel
from edgeflow.stores import keys, lists
from edgeflow.stores.redis_client import connect, connect_async
from edgeflow.v1 import candidates_pb2, candidates_pb2_grpc, gateway_pb2

Samples = dict[str, list[Sample]]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[metrics.Endpoint]:
    ep = metrics.Endpoint("tests", 0, "127.0.0.1")
    yield ep
    ep.close()


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    return sum(
        s.value
        for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    )


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


HANDLED = "edgeflow_grpc_server_handled_total"
HANDLING = "edgeflow_grpc_server_handling_seconds"


async def test_grpc_server_metrics_by_service_method_and_code(
    suite: Suite, endpoint: metrics.Endpoint
) -> None:
    member = members_with_degree(suite.graph, 8)[0]
    before = scrape(endpoint.port)
    await suite.recommend(member, k=10)
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await suite.recommend(member, k=0)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await suite.recommend(10**12, k=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    candidates = channel(suite.cfg.candidates_addr)
    stub = candidates_pb2_grpc.CandidateServiceStub(candidates)
    with pytest.raises(grpc.aio.AioRpcError) as bad_source:
        await stub.Generate(candidates_pb2.GenerateRequest(source="nope", member=1, limit=5))
    assert bad_source.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await candidates.close()
    after = scrape(endpoint.port)

    recommender = {"service": "edgeflow.v1.Recommender", "method": "Recommend"}
    assert delta(before, after, HANDLED, **recommender, code="OK") == 1
    assert delta(before, after, HANDLED, **recommender, code="INVALID_ARGUMENT") == 1
    assert delta(before, after, HANDLED, **recommender, code="NOT_FOUND") == 1
    assert delta(before, after, f"{HANDLING}_count", **recommender) == 3
    assert delta(before, after, f"{HANDLING}_sum", **recommender) > 0
    generate = {"service": "edgeflow.v1.CandidateService", "method": "Generate"}
    assert delta(before, after, HANDLED, **generate, code="INVALID_ARGUMENT") == 1
    # The gateway asks for a request's sources in one GenerateMany: its call is OK, and the
    # unknown member's NOT_FOUND travels in the per-source results.
    many = {"service": "edgeflow.v1.CandidateService", "method": "GenerateMany"}
    assert delta(before, after, HANDLED, **many, code="OK") == 2
    for service, method in (("CandidateService", "GenerateMany"), ("FeatureService", "GetFeatures"),
                            ("ScoringService", "Score"), ("MergingService", "Merge")):  # fmt: skip
        labels = {"service": f"edgeflow.v1.{service}", "method": method}
        assert delta(before, after, HANDLED, **labels, code="OK") >= 1, labels
        buckets = [s for s in after[f"{HANDLING}_bucket"] if s.labels.items() >= labels.items()]
        assert buckets[-1].labels["le"] == "+Inf", labels
    # Health checks and reflection are gRPC's own services: probes are not traffic.
    assert not [s for s in after[HANDLED] if s.labels["service"].startswith("grpc.")]
    codes = {s.labels["code"] for s in after[HANDLED]}
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= codes


async def test_recommend_funnel_fallbacks_and_backend_metrics(
    suite: Suite, endpoint: metrics.Endpoint
) -> None:
    g = suite.graph
    member = members_with_degree(g, 8)[2]
    i = g.index_of(member)
    far = [int(m) for m in g.ids if m != member and m not in set(g.ids[g.neighbors(i)].tolist())]
    rds = connect(suite.cfg.redis_url)
    lists.write_lists(
        rds, "pymk", np.asarray([member]), [(np.asarray([far[-1]]), np.asarray([0.9], np.float32))]
    )
    before = scrape(endpoint.port)
    await suite.recommend(member, k=10)
    partial = await suite.recommend(member, k=10, surface="pymk-nomodel")
    assert partial.partial
    after = scrape(endpoint.port)

    pymk = {"surface": "pymk"}
    # The test workflows run no experiment: the variant label says so.
    requests = "edgeflow_gateway_request_seconds_count"
    assert delta(before, after, requests, **pymk, variant="none") == 1
    ops = {"fof": "candidates.graph", "ebr": "candidates.ebr", "precomputed":
           "candidates.precomputed", "features": "features.fetch", "rank": "scoring.onnx",
           "blend": "merge.blend"}  # fmt: skip
    for node, op in ops.items():
        labels = {**pymk, "node": node}
        assert delta(before, after, "edgeflow_gateway_node_seconds_count", **labels, op=op) == 1
        assert delta(before, after, "edgeflow_gateway_node_items_count", **labels) == 1
    blend_items = delta(before, after, "edgeflow_gateway_node_items_sum", **pymk, node="blend")
    assert blend_items == 10  # the funnel ends with the k served
    nomodel = {"surface": "pymk-nomodel"}
    assert (
        delta(before, after, "edgeflow_gateway_fallbacks_total", **nomodel, node="rank",
              fallback="passthrough") == 1
    )  # fmt: skip
    assert delta(before, after, "edgeflow_gateway_partial_responses_total", **nomodel) == 1
    assert delta(before, after, "edgeflow_gateway_partial_responses_total", **pymk) == 0
    score = {"service": "edgeflow.v1.ScoringService", "method": "Score"}
    assert delta(before, after, HANDLED, **score, code="NOT_FOUND") == 1

    # Both surfaces' precomputed node read the member's entry of the pymk list.
    assert delta(before, after, "edgeflow_precomputed_list_age_seconds_count", list="pymk") == 2
    # The one model these requests ran (the process may hold other tests' samples too).
    inference = "edgeflow_scoring_inference_seconds_count"
    ran = {(s.labels["model"], s.labels["version"]) for s in after[inference]
           if delta(before, after, inference, **s.labels) >= 1}  # fmt: skip
    assert len(ran) == 1, ran
    ((model, version),) = ran
    assert model == "pymk-ranker" and version
    assert delta(before, after, "edgeflow_features_entities_count") >= 2
    assert delta(before, after, "edgeflow_features_entities_sum") > 0


def test_observe_recommend_labels_from_node_traces() -> None:
    traces = [
        gateway_pb2.NodeTrace(node="fof", op="candidates.graph", status="ok", items_out=120,
                              duration_ms=4.0),
        gateway_pb2.NodeTrace(node="rank", op="scoring.onnx", status="fallback",
                              fallback="passthrough", items_out=80, duration_ms=2.5),
        gateway_pb2.NodeTrace(node="extra", op="candidates.popular", status="skipped"),
    ]  # fmt: skip

    def get(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    surface = {"surface": "unit-surface"}
    for _ in range(2):
        metrics.observe_recommend("unit-surface", "ranker-v2=v2", 0.012, True, traces)
    metrics.observe_recommend("unit-surface", "none", 0.010, False, traces[:1])
    v2 = {**surface, "variant": "ranker-v2=v2"}
    assert get("edgeflow_gateway_request_seconds_count", **v2) == 2
    assert get("edgeflow_gateway_request_seconds_sum", **v2) == pytest.approx(0.024)
    assert get("edgeflow_gateway_request_seconds_count", **surface, variant="none") == 1
    fof = {**v2, "node": "fof"}
    assert get("edgeflow_gateway_node_seconds_count", **fof, op="candidates.graph") == 2
    assert get("edgeflow_gateway_node_seconds_sum", **fof, op="candidates.graph") == (
        pytest.approx(0.008)
    )
    assert get("edgeflow_gateway_node_items_sum", **fof) == 240
    assert get("edgeflow_gateway_node_items_bucket", **fof, le="100.0") == 0
    assert get("edgeflow_gateway_node_items_bucket", **fof, le="200.0") == 2
    assert get("edgeflow_gateway_node_seconds_count", **v2, node="rank", op="scoring.onnx") == 2
    assert (
        get("edgeflow_gateway_fallbacks_total", **surface, node="rank", fallback="passthrough") == 2
    )
    assert get("edgeflow_gateway_fallbacks_total", **surface, node="fof", fallback="") == 0
    assert get("edgeflow_gateway_partial_responses_total", **v2) == 2
    assert get("edgeflow_gateway_partial_responses_total", **surface, variant="none") == 0
    # A skipped node did not run: it has no time and no step in the funnel.
    assert get("edgeflow_gateway_node_seconds_count", **v2, node="extra",
               op="candidates.popular") == 0  # fmt: skip


async def test_nearline_lag_outcomes_and_backlog(
    redis_proc: RedisProcess, redis_client: redis.Redis, tmp_path: Path
) -> None:
    client = connect(redis_proc.url)
    ensure_group(client)
    now = time.time()
    events = [Event(id=f"lag-{i}", type="connect", member=10 + i, target=20 + i, time=now - 30)
              for i in range(3)]  # fmt: skip
    aclient = connect_async(redis_proc.url)
    await publish(aclient, events)
    await aclient.aclose()
    client.xadd(keys.EVENTS, {"id": "broken"})  # no type, member, ...: dead-lettered
    has_lag = "lag" in client.xinfo_groups(keys.EVENTS)[0]  # Redis 7+ counts undelivered
    assert backlog(client) == (4 if has_lag else 0)
    reply = client.xreadgroup(keys.NEARLINE_GROUP, "c1", {keys.EVENTS: ">"}, count=10)
    entries = reply[0][1]
    assert backlog(client) == 4  # all delivered, none acknowledged

    workflows = tmp_path / "workflows"
    workflows.mkdir()
    cfg = dataclasses.replace(
        Config(), home=tmp_path, redis_url=redis_proc.url, workflows_dir=workflows,
        features_addr=f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    processor = Processor(cfg, client, "c1")

    def get(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    lag_count, lag_sum = (
        get("edgeflow_nearline_lag_seconds_count"),
        get("edgeflow_nearline_lag_seconds_sum"),
    )
    counts = {o: get("edgeflow_nearline_events_total", outcome=o)
              for o in ("applied", "duplicate", "dead")}  # fmt: skip
    try:
        outcome = processor.handle(entries)
        assert len(outcome.applied) == 3 and len(outcome.dead) == 1
        assert backlog(client) == 0
        processor.handle(entries[:3])  # redelivered: already done, not applied twice
    finally:
        processor.close()
        client.close()
    assert get("edgeflow_nearline_lag_seconds_count") - lag_count == 3
    assert get("edgeflow_nearline_lag_seconds_sum") - lag_sum >= 3 * 30
    assert get("edgeflow_nearline_events_total", outcome="applied") - counts["applied"] == 3
    assert get("edgeflow_nearline_events_total", outcome="duplicate") - counts["duplicate"] == 3
    assert get("edgeflow_nearline_events_total", outcome="dead") - counts["dead"] == 1


def test_local_suite_gives_each_service_a_metrics_port(tmp_path: Path) -> None:
    fixed = new_suite(tmp_path, free_ports=False)
    for name, port in fixed.metrics_ports.items():
        assert port == fixed.ports[name] + METRICS_OFFSET, name
    free = new_suite(tmp_path, free_ports=True)
    assert set(free.metrics_ports) == set(free.ports) - {"redis"}
    assert not set(free.metrics_ports.values()) & set(free.ports.values())


def test_serve_exports_metrics_and_names_a_taken_port(tmp_path: Path) -> None:
    mport = free_port()
    env = dict(os.environ, PORT=str(free_port()), METRICS_PORT=str(mport),
               METRICS_HOST="127.0.0.1", EDGEFLOW_HOME=str(tmp_path))  # fmt: skip
    cmd = [sys.executable, "-m", "edgeflow.cli.main", "serve", "merging"]
    log = tmp_path / "merging.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        samples: Samples = {}
        for _ in range(300):
            try:
                samples = scrape(mport)
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
        assert "process_cpu_seconds_total" in samples, samples.keys()
        # A second process on the same metrics port fails at once, naming service and port.
        taken = subprocess.run(cmd, env=dict(env, PORT=str(free_port())), capture_output=True,
                               text=True, timeout=120, check=False)  # fmt: skip
        assert taken.returncode != 0
        assert f"merging: cannot serve metrics on 127.0.0.1:{mport}" in taken.stderr + taken.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_endpoint_bind_failure_names_the_service_and_port(endpoint: metrics.Endpoint) -> None:
    with pytest.raises(RuntimeError, match=rf"gateway: cannot serve metrics on 127\.0\.0\.1:"
                       rf"{endpoint.port} \(METRICS_PORT\)"):  # fmt: skip
        metrics.Endpoint("gateway", endpoint.port, "127.0.0.1")
