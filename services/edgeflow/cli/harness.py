"""A self-contained suite for `eval` and `bench`: its own Redis (or Redis Cluster) and services
on free loopback ports in a temporary home, so it runs beside a suite that is already up."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from edgeflow import config
from edgeflow.graph import Graph
from edgeflow.local import suite as local
from edgeflow.shell import server, tls
from edgeflow.stores.redis_client import connect

if TYPE_CHECKING:
    from edgeflow.build.train import TrainReport
    from edgeflow.offline.progress import Stages


@dataclasses.dataclass
class Harness:
    suite: local.Suite
    cfg: config.Config
    graph: Graph | None = None
    # Seconds of each set-up step: ingest (or store), train, services.
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    train_report: TrainReport | None = None

    def channel(self, service: str, key: str | None = None) -> grpc.aio.Channel:
        """An async channel to one of the suite's services (over TLS if it serves TLS)."""
        return server.channel(self.suite.addr(service), key, tls.load(self.cfg.tls_dir))


def suite_config(suite: local.Suite) -> config.Config:
    return dataclasses.replace(
        config.load(),
        home=suite.home,
        redis_url=suite.redis_url,
        candidates_addr=suite.addr("candidates"),
        features_addr=suite.addr("features"),
        scoring_addr=suite.addr("scoring"),
        merging_addr=suite.addr("merging"),
        gateway_addr=suite.addr("gateway"),
    )


@contextmanager
def running_suite(
    graph: Graph | None,
    seed: int,
    log: bool = True,
    *,
    edges: Path | None = None,
    stages: Stages | None = None,
    home_root: Path | None = None,
    redis_cluster: int = 0,
) -> Iterator[Harness]:
    """Store the graph, train on it, start the services; stop and clean up afterwards.

    With `edges` (and no `graph`) the edge file is ingested as `edgeflow ingest` does. `stages`
    sees the training steps; the suite's home is made under `home_root` (default: the
    temporary directory), where its `run/suite.json` names its processes while it runs.
    With `redis_cluster` N (at least 3) the suite runs on a Redis Cluster of N local masters
    instead of one Redis server.
    """
    from edgeflow.build.train import train
    from edgeflow.stores.graph_store import save_graph

    if (graph is None) == (edges is None):
        raise ValueError("running_suite needs a graph or an edge file, not both")
    home = Path(tempfile.mkdtemp(prefix="edgeflow-", dir=home_root))
    try:
        suite = local.new_suite(home, free_ports=True, redis_cluster=redis_cluster)
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise
    try:
        local.ensure_redis(suite)
        cfg = suite_config(suite)
        h = Harness(suite=suite, cfg=cfg)
        t = time.perf_counter()
        client = connect(cfg.redis_url)
        try:
            if edges is not None:
                from edgeflow.build.ingest import ingest_file

                _note(log, f"ingesting {edges} ...")
                graph = ingest_file(client, edges)
                h.seconds["ingest"] = round(time.perf_counter() - t, 3)
            else:
                assert graph is not None
                save_graph(client, graph)
                h.seconds["store_graph"] = round(time.perf_counter() - t, 3)
        finally:
            client.close()
        h.graph = graph
        _note(log, f"training on {graph.n:,} members / {graph.edge_count:,} edges ...")
        t = time.perf_counter()
        report = train(cfg, seed=seed, stages=stages)
        h.seconds["train"] = round(time.perf_counter() - t, 3)
        h.train_report = report
        _note(log, report.summary())
        _note(log, "starting the services ...")
        t = time.perf_counter()
        # Ports picked before a long training run may have been taken since: pick again.
        _fresh_ports(suite)
        h.cfg = suite_config(suite)
        # Each service loads the graph (and candidates every embedding) before it serves.
        local.start_services(suite, timeout_s=120.0 + graph.n / 2000)
        h.seconds["services"] = round(time.perf_counter() - t, 3)
        yield h
    finally:
        local.stop_suite(suite)
        shutil.rmtree(home, ignore_errors=True)


def stop_leftovers(home_root: Path) -> list[str]:
    """Stop what suites under `home_root` still run (a run killed before its clean-up):
    the processes their `run/suite.json` name. Returns what was stopped."""
    stopped = []
    for state in sorted(home_root.glob("*/run/suite.json")):
        suite = local.Suite.load(state.parent.parent)
        if suite is not None:
            stopped += [f"{state.parent.parent.name}: {name}" for name in local.stop_suite(suite)]
        shutil.rmtree(state.parent.parent, ignore_errors=True)
    return stopped


def _fresh_ports(suite: local.Suite) -> None:
    """Free loopback ports for the services and their metrics, Redis kept where it runs."""
    from edgeflow.local.ports import free_port

    for table in (suite.ports, suite.metrics_ports):
        for name in local.SERVICES:
            table[name] = free_port()


def _note(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)
