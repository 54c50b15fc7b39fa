"""A self-contained suite for `eval` and `bench`: its own Redis and services on free loopback
ports in a temporary home, so it runs beside a suite that is already up."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeflow import config
from edgeflow.graph import Graph
from edgeflow.local import suite as local
from edgeflow.redis_client import connect


@dataclasses.dataclass
class Harness:
    suite: local.Suite
    cfg: config.Config


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
def running_suite(graph: Graph, seed: int, log: bool = True) -> Iterator[Harness]:
    """Store the graph, train on it, start the services; stop and clean up afterwards."""
    from edgeflow.build.train import train
    from edgeflow.graph_store import save_graph

    home = Path(tempfile.mkdtemp(prefix="edgeflow-"))
    suite = local.new_suite(home, free_ports=True)
    try:
        local.ensure_redis(suite)
        cfg = suite_config(suite)
        save_graph(connect(cfg.redis_url), graph)
        _note(log, f"training on {graph.n:,} members / {graph.edge_count:,} edges ...")
        report = train(cfg, seed=seed)
        _note(log, report.summary())
        _note(log, "starting the services ...")
        local.start_services(suite)
        yield Harness(suite=suite, cfg=cfg)
    finally:
        local.stop_suite(suite)
        shutil.rmtree(home, ignore_errors=True)


def _note(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)
