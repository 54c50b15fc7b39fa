"""The suite's services in the test's own process, on real grpc.aio servers; and
`small_eval`, `edgeflow eval` run as a user would on a small generated social graph."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from world import World, clone

from edgeflow.build.synthetic import social_graph
from edgeflow.candidates.service import CandidatesService
from edgeflow.config import REPO_ROOT, Config
from edgeflow.features.service import FeaturesService
from edgeflow.gateway.service import GatewayService
from edgeflow.graph import Graph
from edgeflow.local.redis_server import RedisProcess
from edgeflow.merging.service import MergingService
from edgeflow.offline import job
from edgeflow.offline.context import find_workflow, load_inputs
from edgeflow.offline.executor import BatchRunner
from edgeflow.scoring.service import ScoringService
from edgeflow.shell import tls
from edgeflow.shell.server import Service, channel, start_server
from edgeflow.stores.redis_client import SyncClient, connect
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc

Servers = dict[str, tuple[Service, grpc.aio.Server, int]]


@dataclasses.dataclass
class Suite:
    """A running suite (the `suite` fixture in conftest.py) and its gateway's address."""

    graph: Graph
    redis: RedisProcess
    cfg: Config
    stub: gateway_pb2_grpc.RecommenderStub
    servers: Servers
    gateway_port: int

    async def recommend(self, member: int, k: int = 10, surface: str = "pymk",
                        debug: bool = False, explain: bool = False,
                        ) -> gateway_pb2.RecommendResponse:  # fmt: skip
        req = gateway_pb2.RecommendRequest(
            surface=surface, member=member, k=k, debug=debug, explain=explain
        )
        return await self.stub.Recommend(req, timeout=10)


def members_with_degree(graph: Graph, lo: int) -> list[int]:
    return [int(graph.ids[i]) for i in np.flatnonzero(graph.degree >= lo)]


async def start_backends(cfg: Config) -> tuple[Config, Servers]:
    """Candidates, features, scoring and merging on free ports; the returned config (for the
    gateway) carries their addresses. With cfg.tls_dir, they serve mutual TLS."""
    servers: Servers = {}
    for svc in (CandidatesService(cfg), FeaturesService(cfg), ScoringService(cfg),
                MergingService(cfg)):  # fmt: skip
        server, port, _ = await start_server(svc, "127.0.0.1:0", tls_files=tls.load(cfg.tls_dir))
        servers[svc.name] = (svc, server, port)
    addr = {n: f"127.0.0.1:{p}" for n, (_, _, p) in servers.items()}
    cfg = dataclasses.replace(
        cfg, candidates_addr=addr["candidates"], features_addr=addr["features"],
        scoring_addr=addr["scoring"], merging_addr=addr["merging"],
    )  # fmt: skip
    return cfg, servers


async def start_gateway(cfg: Config, servers: Servers) -> int:
    gateway = GatewayService(cfg)
    server, port, _ = await start_server(gateway, "127.0.0.1:0", tls_files=tls.load(cfg.tls_dir))
    servers["gateway"] = (gateway, server, port)
    return port


@contextlib.asynccontextmanager
async def running(graph: Graph, redis: RedisProcess, cfg: Config) -> AsyncIterator[Suite]:
    """The five services over `cfg` (a clone of a trained world and its Redis) and a stub
    of the gateway; all stopped, and the Redis too, afterwards."""
    cfg, servers = await start_backends(cfg)
    port = await start_gateway(cfg, servers)
    ch = channel(f"127.0.0.1:{port}")
    try:
        yield Suite(graph, redis, cfg, gateway_pb2_grpc.RecommenderStub(ch), servers, port)
    finally:
        await ch.close()
        await stop_all(servers)
        redis.stop()


async def stop_all(servers: Servers, timeout_s: float = 20.0) -> None:
    """Stop every server and service. Teardown is not what these tests check, so one that
    does not stop in time is reported with every task's stack, and the rest still stop."""
    for name, (svc, srv, _) in servers.items():
        try:
            await asyncio.wait_for(srv.stop(None), timeout_s)
            await asyncio.wait_for(svc.stop(), timeout_s)
        except TimeoutError:
            warnings.warn(f"the {name} service did not stop within {timeout_s} s", stacklevel=1)
            for task in asyncio.all_tasks():
                task.print_stack(file=sys.stderr)


def relaxed_copy(source: Path, directory: Path) -> Path:
    """Copy a checked-in workflow with deadlines a loaded CI machine always meets, for tests
    of what a graph computes (tests of what deadlines do set their own)."""
    doc: dict[str, Any] = yaml.safe_load(source.read_text())
    doc["spec"]["budgetMs"] = 10_000
    for node in doc["spec"]["nodes"]:
        node["timeoutMs"] = 5_000
    target = directory / source.name
    target.write_text(yaml.safe_dump(doc))
    return target


def clone_serving(
    world: World, dest: Path, surfaces: tuple[str, ...]
) -> tuple[Config, RedisProcess, SyncClient]:
    """A clone of the trained world serving the checked-in `surfaces` (relaxed_copy), each
    with its offline list stored, as the nearline worker and the stored-list sources expect."""
    cfg, proc = clone(world, dest)
    client = connect(proc.url)
    workflows = dest / "served-workflows"
    workflows.mkdir()
    for name in surfaces:
        relaxed_copy(REPO_ROOT / "workflows" / f"{name}.yaml", workflows)
    cfg = dataclasses.replace(cfg, reload_interval_s=0.3, workflows_dir=workflows)
    for name in surfaces:
        wf = find_workflow(cfg, name)
        run = job.begin(client, name, 1, name)
        job.run_shard(client, BatchRunner(wf, load_inputs(cfg, client, wf)), run, 0,
                      world.graph.ids, 64)  # fmt: skip
    return cfg, proc, client


def small_eval(tmp_path: Path, *options: str) -> dict[str, Any]:
    """`edgeflow eval --json` with `options` on a 500-member generated social graph (k 20,
    seed 2, 120 members), in its own home under `tmp_path`: its report."""
    edges = tmp_path / "social.txt"
    np.savetxt(edges, social_graph(members=500, seed=5), fmt="%d")
    run = subprocess.run(
        [sys.executable, "-m", "edgeflow.cli.main", "eval", "--edges", str(edges),
         "--k", "20", "--seed", "2", "--max-members", "120", *options, "--json"],
        env=dict(os.environ, EDGEFLOW_HOME=str(tmp_path / "home")), capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report: dict[str, Any] = json.loads(run.stdout)
    return report
