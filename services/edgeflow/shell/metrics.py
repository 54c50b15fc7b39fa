"""Prometheus metrics of every edgeflow process, in one registry per process.

Names follow Prometheus conventions (`edgeflow_` prefix, base units, `_total` counters).
Labels only take values bounded by the workflow specs (surfaces, nodes, variants) or by
gRPC itself (methods, codes), never member ids.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app, start_http_server
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from edgeflow.v1 import gateway_pb2

# Latency buckets for request paths: 1 ms .. 2.5 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                   0.15, 0.25, 0.5, 1.0, 2.5)  # fmt: skip
COUNT_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 200, 300, 500, 750, 1000, 2000, 5000)
# A backend RPC on loopback takes well under a millisecond.
RPC_BUCKETS = (0.00025, 0.0005, *LATENCY_BUCKETS)
# Precomputed lists: nearline ones are seconds old, offline ones up to days.
AGE_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400,
               2 * 86400, 7 * 86400)  # fmt: skip
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

M = TypeVar("M", Counter, Gauge, Histogram)


class Children(Generic[M]):
    """A metric's labelled children, cached by their label tuple.

    `labels()` validates and locks on every call (a few microseconds); a dict lookup does
    not. Label values are bounded (see above), so the cache is too.
    """

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._cache: dict[tuple[str, ...], M] = {}

    def __call__(self, *key: str) -> M:
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = self._metric.labels(*key)
        return child


# ---- every gRPC server (tracing.ServerTracing observes them) -----------------------------
GRPC_HANDLING_SECONDS = Histogram(
    "edgeflow_grpc_server_handling_seconds",
    "Time a gRPC server spent on a call, per service and method.",
    ["service", "method"],
    buckets=RPC_BUCKETS,
)
GRPC_HANDLED = Counter(
    "edgeflow_grpc_server_handled_total",
    "gRPC calls completed by a server, per service, method and status code (OK, "
    "INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, ...).",
    ["service", "method", "code"],
)
grpc_handling = Children(GRPC_HANDLING_SECONDS)
grpc_handled = Children(GRPC_HANDLED)

# ---- gateway: one Recommend -------------------------------------------------------------
RECOMMEND_SECONDS = Histogram(
    "edgeflow_gateway_request_seconds",
    "Recommend latency in the gateway, per surface and variant.",
    ["surface", "variant"],
    buckets=LATENCY_BUCKETS,
)
NODE_SECONDS = Histogram(
    "edgeflow_gateway_node_seconds",
    "Time of one workflow node within a request, per surface, node and variant.",
    ["surface", "node", "op", "variant"],
    buckets=LATENCY_BUCKETS,
)
NODE_ITEMS = Histogram(
    "edgeflow_gateway_node_items",
    "Candidates a node passed on (the funnel), per surface, node and variant.",
    ["surface", "node", "variant"],
    buckets=COUNT_BUCKETS,
)
FALLBACKS = Counter(
    "edgeflow_gateway_fallbacks_total",
    "Nodes that failed or timed out and served their fallback.",
    ["surface", "node", "fallback"],
)
PARTIAL_RESPONSES = Counter(
    "edgeflow_gateway_partial_responses_total",
    "Recommend responses marked partial (a node fell back).",
    ["surface", "variant"],
)

# ---- gateway: workflow files -------------------------------------------------------------
WORKFLOW_FILES_REJECTED = Gauge(
    "edgeflow_gateway_workflow_files_rejected",
    "Workflow files the gateway refused at its last load (invalid, too large, nested too "
    "deeply); the surfaces they served keep their last valid version.",
)
WORKFLOW_REJECTIONS = Counter(
    "edgeflow_gateway_workflow_rejections_total",
    "Workflow files refused, counted once each time a file (or a new version of it) is.",
)

# ---- gateway: the workflows' model references (gateway/models.py) ------------------------
MODEL_PROBLEMS = Gauge(
    "edgeflow_gateway_model_problems",
    "Model references of a surface's workflow (its own graph, experiment variants, shadows) "
    "that the scoring service has no loaded model or version for, as of the last check.",
    ["surface"],
)
VARIANT_REROUTED = Gauge(
    "edgeflow_gateway_variant_rerouted",
    "1 while the members of an experiment variant are served another variant (its "
    "experiment's control) because the variant names a model the scoring service lacks.",
    ["surface", "experiment", "variant"],
)
REROUTED_REQUESTS = Counter(
    "edgeflow_gateway_rerouted_requests_total",
    "Recommend requests whose member's variant was served by another variant (see "
    "edgeflow_gateway_variant_rerouted).",
    ["surface", "experiment", "variant"],
)
rerouted_requests = Children(REROUTED_REQUESTS)

# ---- experiments ------------------------------------------------------------------------
EXPOSURES_LOGGED = Counter(
    "edgeflow_exposures_logged_total", "Exposure records written to the exposure stream."
)
EXPOSURES_DROPPED = Counter(
    "edgeflow_exposures_dropped_total",
    "Exposure records dropped instead of slowing or failing a request.",
    ["reason"],  # queue_full, redis_unavailable
)
SHADOW_RUNS = Counter(
    "edgeflow_shadow_runs_total",
    "Shadow variant executions, by outcome (compared, partial, failed, skipped).",
    ["surface", "shadow", "outcome"],
)
SHADOW_OVERLAP = Histogram(
    "edgeflow_shadow_overlap_at_k",
    "Overlap@k of the shadow ranking with the served one.",
    ["surface", "shadow"],
    buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)
SHADOW_SECONDS = Histogram(
    "edgeflow_shadow_seconds",
    "Latency of the shadow variant's run.",
    ["surface", "shadow"],
    buckets=LATENCY_BUCKETS,
)

# ---- candidates, scoring, features, nearline --------------------------------------------
LIST_AGE = Histogram(
    "edgeflow_precomputed_list_age_seconds",
    "Age of the precomputed list entries served, per list.",
    ["list"],
    buckets=AGE_BUCKETS,
)
list_age = Children(LIST_AGE)
SCORING_INFERENCE = Histogram(
    "edgeflow_scoring_inference_seconds",
    "Model inference time of one Score call, per model and version.",
    ["model", "version"],
    buckets=RPC_BUCKETS,
)
scoring_inference = Children(SCORING_INFERENCE)
FEATURES_ENTITIES = Histogram(
    "edgeflow_features_entities",
    "Entities asked for in one GetFeatures call.",
    buckets=COUNT_BUCKETS,
)
NEARLINE_LAG = Histogram(
    "edgeflow_nearline_lag_seconds",
    "From a member event's time to its changes being applied (features pushed, lists stored).",
    buckets=LAG_BUCKETS,
)
NEARLINE_EVENTS = Counter(
    "edgeflow_nearline_events_total",
    "Member events the nearline worker finished, by outcome (applied, duplicate, dead).",
    ["outcome"],
)
NEARLINE_BACKLOG = Gauge(
    "edgeflow_nearline_backlog_events",
    "Events of the stream not yet acknowledged by the nearline consumer group "
    "(undelivered plus pending), as of the worker's last batch.",
)

# ---- request CPU work and deadlines (cpu.py) ---------------------------------------------
CPU_OFFLOADED = Counter(
    "edgeflow_cpu_offloaded_total",
    "Request work run on the process's CPU thread pool instead of its event loop, per kind "
    "of work (fof, pair_features, score, ...).",
    ["work"],
)
DEADLINE_REFUSED = Counter(
    "edgeflow_deadline_refused_total",
    "Request work not started because the request's deadline had already passed, per kind "
    "of work (a candidate source, pair_features, score, ...).",
    ["work"],
)
FOF_CAPPED = Counter(
    "edgeflow_candidates_fof_capped_total",
    "Friends-of-friends answers whose two-hop expansion was cut to the neighbour-visit "
    "budget (EDGEFLOW_FOF_MAX_VISITS): hub members, ranked from their less-connected "
    "connections only.",
)
cpu_offloaded = Children(CPU_OFFLOADED)
deadline_refused = Children(DEADLINE_REFUSED)

# ---- gateway helpers ----------------------------------------------------------------------
_recommend = Children(RECOMMEND_SECONDS)
_node_seconds = Children(NODE_SECONDS)
_node_items = Children(NODE_ITEMS)
_fallbacks = Children(FALLBACKS)
_partial = Children(PARTIAL_RESPONSES)


def observe_recommend(
    surface: str,
    variant: str,
    total_s: float,
    partial: bool,
    traces: Sequence[gateway_pb2.NodeTrace],
) -> None:
    """Record one Recommend: its latency, each node's time and output count, fallbacks."""
    _recommend(surface, variant).observe(total_s)
    for t in traces:
        if t.status == "skipped":  # it did not run: no time, no funnel step
            continue
        node = t.node
        _node_seconds(surface, node, t.op, variant).observe(t.duration_ms / 1000.0)
        _node_items(surface, node, variant).observe(t.items_out)
        if t.status == "fallback":
            _fallbacks(surface, node, t.fallback).inc()
    if partial:
        _partial(surface, variant).inc()


# ---- the /metrics endpoint --------------------------------------------------------------
class Endpoint:
    """The process's /metrics HTTP server (prometheus_client's, on a daemon thread). With
    `healthy`, it also answers GET /healthz: 200 while `healthy()`, else 503; the probe that
    works when the gRPC port speaks TLS only, which Kubernetes' gRPC probes cannot."""

    def __init__(
        self, service: str, port: int, host: str = "0.0.0.0",
        healthy: Callable[[], bool] | None = None,
    ) -> None:  # fmt: skip
        try:
            if healthy is None:
                self._server, self._thread = start_http_server(port, addr=host)
            else:
                self._server, self._thread = _serve_with_health(port, host, healthy)
        except OSError as exc:
            raise RuntimeError(
                f"{service}: cannot serve metrics on {host}:{port} (METRICS_PORT): "
                f"{exc.strerror or exc}"
            ) from None
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def _serve_with_health(
    port: int, host: str, healthy: Callable[[], bool]
) -> tuple[WSGIServer, threading.Thread]:
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])  # fmt: skip
            return [b"SERVING\n" if ok else b"NOT_SERVING\n"]
        return metrics_app(environ, start_response)

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread
