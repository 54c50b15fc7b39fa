"""The suite end to end on a real 3-master Redis Cluster, as a user runs it: quickstart with
--redis-cluster 3, Recommend, a block through Publish, the nearline worker, an offline run,
status and down."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.cluster
from test_cli import edgeflow

from edgeflow.build.synthetic import social_graph, write_edge_list
from edgeflow.local.redis_server import free_cluster_ports, process_alive
from edgeflow.local.suite import free_service_addrs
from edgeflow.stores import keys, redis_client

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    ports = free_cluster_ports(3)
    e = dict(os.environ)
    e.update(
        EDGEFLOW_HOME=str(tmp_path_factory.mktemp("home")),
        REDIS_URL=redis_client.cluster_url([("127.0.0.1", p) for p in ports]),
        **free_service_addrs(),
    )
    yield e
    edgeflow("down", env=e)


def test_the_suite_on_a_redis_cluster(env: dict[str, str], tmp_path: Path) -> None:
    edges = tmp_path / "edges.txt"
    write_edge_list(edges, social_graph(members=300, communities=6, seed=5))
    run = edgeflow("quickstart", "--edges", str(edges), "--redis-cluster", "3", "--members", "1",
                   env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr + run.stdout
    assert "ingested 300 members" in run.stdout and "pymk for member" in run.stdout
    status = edgeflow("status", env=env).stdout
    assert status.count("cluster:ok") == 3 and status.count(" SERVING") == 6, status

    # Every kind of data is spread over the three masters, not kept on one.
    client = redis_client.connect(env["REDIS_URL"])
    assert isinstance(client, redis.cluster.RedisCluster)
    nodes = redis_client.parse_url(env["REDIS_URL"]).nodes
    sizes = [int(redis.Redis(host=h, port=p).dbsize()) for h, p in nodes]
    assert len(sizes) == 3 and min(sizes) > 0.2 * sum(sizes) / 3, sizes

    rec = edgeflow("recommend", "--member", "7", "--k", "10", "--json", env=env)
    assert rec.returncode == 0, rec.stderr
    served = json.loads(rec.stdout)
    assert len(served["edges"]) == 10 and not served["partial"], served
    shown = served["edges"][0]["target"]

    # A block is honoured by the next request, and a repeat of its id stores nothing.
    block = ("publish", "--type", "block", "--member", "7", "--target", str(shown),
             "--event-id", "cluster-block-7")  # fmt: skip
    assert edgeflow(*block, env=env).returncode == 0
    after = edgeflow("recommend", "--member", "7", "--k", "50", "--json", env=env)
    assert shown not in [e["target"] for e in json.loads(after.stdout)["edges"]]
    assert json.loads(edgeflow(*block, "--json", env=env).stdout)["duplicate"] is True

    # A connect reaches the nearline worker, which applies it once and acknowledges it.
    target = json.loads(after.stdout)["edges"][0]["target"]
    connect = ("publish", "--type", "connect", "--member", "7", "--target", str(target),
               "--event-id", "cluster-connect-7")  # fmt: skip
    assert edgeflow(*connect, env=env).returncode == 0
    deadline = time.monotonic() + 60

    def applied() -> int:  # the block and the connect, each once, in whichever batches
        return int(client.hget(keys.NEARLINE_STATS, "applied") or 0)

    while not client.exists(keys.event_done("cluster-connect-7")) or applied() < 2:
        assert time.monotonic() < deadline, (
            "the nearline worker did not apply the block and the connect: "
            f"applied {applied()}, dead letters {client.xlen(keys.EVENTS_DEAD)}"
        )
        time.sleep(0.2)
    assert applied() == 2
    assert str(target).encode() in client.smembers(keys.adjacency(7))
    groups = client.xinfo_groups(keys.EVENTS)
    assert [g["pending"] for g in groups] == [0]

    # A CLI command beside the suite finds the cluster; an offline run replaces the list.
    offline = edgeflow("offline", "run", "--workflow", "pymk", "--local", "--shards", "2",
                       env=env)  # fmt: skip
    assert offline.returncode == 0 and "is live" in offline.stdout, offline.stderr
    assert edgeflow("recommend", "--member", "7", "--k", "5", env=env).returncode == 0

    pids = json.loads((Path(env["EDGEFLOW_HOME"]) / "run" / "suite.json").read_text())["pids"]
    client.close()
    down = edgeflow("down", env=env)
    assert down.returncode == 0 and "redis-2" in down.stdout, down.stdout
    assert not any(process_alive(pid) for pid in pids.values())
