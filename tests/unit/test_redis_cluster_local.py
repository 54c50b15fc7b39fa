"""A real Redis Cluster on loopback: started, joined, used through redis_client, stopped, and
started again from its own directories; and its plumbing through the local suite and the CLI."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from edgeflow_bench import scale

from edgeflow.cli import CliError
from edgeflow.local import redis_server, supervisor
from edgeflow.local import suite as local
from edgeflow.local.redis_server import (
    CLUSTER_BUS_OFFSET,
    MAX_CLUSTER_PORT,
    RedisProcess,
    cluster_info,
    cluster_node_dir,
    free_cluster_ports,
    nodes_conf,
    process_alive,
    start_cluster,
    wait_cluster_ok,
)
from edgeflow.stores import redis_client

# Keys whose hash slots lie on different masters of a 3-master cluster (slots 0-5460,
# 5461-10922, 10923-16383 with --cluster create's even split), checked below anyway.
KEYS = [f"member:{i}" for i in range(30)]


def _node_of_slot(client: redis_client.SyncClient, key: str) -> int:
    assert isinstance(client, redis_client.redis.cluster.RedisCluster)
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def _stop_all(procs: list[RedisProcess]) -> None:
    for proc in procs:
        proc.stop()


@pytest.fixture
def cluster_ports() -> list[int]:
    return free_cluster_ports(3)


def test_free_cluster_ports_leave_room_for_the_cluster_bus() -> None:
    ports = free_cluster_ports(4)
    assert len(set(ports)) == 4
    assert all(p <= MAX_CLUSTER_PORT for p in ports)
    assert not {p + CLUSTER_BUS_OFFSET for p in ports} & set(ports)


def test_start_cluster_refuses_what_redis_cli_would(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3 masters"):
        start_cluster(tmp_path, free_cluster_ports(2))
    with pytest.raises(ValueError, match="distinct"):
        start_cluster(tmp_path, [7000, 7000, 7001])
    with pytest.raises(ValueError, match="cluster bus"):
        start_cluster(tmp_path, [7000, 7001, 60000])
    assert not list(tmp_path.iterdir())  # nothing was started


def test_cluster_serves_keys_of_every_slot_and_stops(
    tmp_path: Path, cluster_ports: list[int]
) -> None:
    procs = start_cluster(tmp_path, cluster_ports, persist=False)
    try:
        assert [p.port for p in procs] == cluster_ports
        for proc in procs:
            assert process_alive(proc.pid)
            assert cluster_node_dir(tmp_path, proc.port) == proc.workdir
            assert (proc.workdir / nodes_conf(proc.port)).exists()
            info = cluster_info(proc.port)
            assert info["cluster_state"] == "ok", info
            assert info["cluster_known_nodes"] == "3" and info["cluster_size"] == "3"
            assert info["cluster_slots_assigned"] == "16384"

        url = redis_client.cluster_url([("127.0.0.1", p) for p in cluster_ports])
        assert redis_client.is_cluster(url)
        client = redis_client.connect(url)
        try:
            assert redis_client.is_cluster_client(client)
            for i, key in enumerate(KEYS):
                client.set(key, i)
            owners = {_node_of_slot(client, key) for key in KEYS}
            assert owners == set(cluster_ports)  # the keys live on every master
            assert [client.get(key) for key in KEYS] == [str(i).encode() for i in range(30)]
        finally:
            client.close()
        # Each node holds only its own slots' keys.
        counts = []
        for port in cluster_ports:
            node = redis_client.redis.Redis(port=port)
            counts.append(node.dbsize())
            node.close()
        assert sum(counts) == len(KEYS) and all(counts)
    finally:
        _stop_all(procs)
    for proc in procs:
        assert not process_alive(proc.pid)
        assert not local.redis_answers(proc.port)


def test_cluster_restarts_from_its_directories_without_creating_again(
    tmp_path: Path, cluster_ports: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = redis_client.cluster_url([("127.0.0.1", p) for p in cluster_ports])
    procs = start_cluster(tmp_path, cluster_ports, persist=True)
    try:
        ids = {p.port: _myid(p.port) for p in procs}
        client = redis_client.connect(url)
        for key in KEYS:
            client.set(key, key.upper())
        client.close()
    finally:
        _stop_all(procs)
    assert not any(process_alive(p.pid) for p in procs)

    def no_create(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cluster was created again")

    monkeypatch.setattr(redis_server, "_create_cluster", no_create)
    again = start_cluster(tmp_path, cluster_ports, persist=True)
    try:
        assert {p.port: _myid(p.port) for p in again} == ids  # the same nodes rejoined
        for proc in again:
            assert cluster_info(proc.port)["cluster_state"] == "ok"
        client = redis_client.connect(url)
        assert [client.get(key) for key in KEYS] == [key.upper().encode() for key in KEYS]
        client.close()
    finally:
        _stop_all(again)
    assert not any(process_alive(p.pid) for p in again)


def test_a_lost_node_directory_is_named_not_created_over(
    tmp_path: Path, cluster_ports: list[int]
) -> None:
    _stop_all(start_cluster(tmp_path, cluster_ports))
    lost = cluster_node_dir(tmp_path, cluster_ports[1])
    for child in lost.iterdir():
        child.unlink()
    with pytest.raises(RuntimeError, match=rf"ports \[{cluster_ports[1]}\] are new") as err:
        start_cluster(tmp_path, cluster_ports)
    assert f"remove {tmp_path}" in str(err.value)
    for port in cluster_ports:  # nothing left running
        assert not local.redis_answers(port)


def _myid(port: int) -> str:
    node = redis_client.redis.Redis(port=port)
    try:
        raw = node.execute_command("CLUSTER", "MYID")
    finally:
        node.close()
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# ---- the local suite ---------------------------------------------------------------------------
def test_suite_on_a_cluster_starts_restarts_a_node_shows_and_stops_every_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeflow.cli import suite_cmd

    suite = local.new_suite(tmp_path / "home", free_ports=True, redis_cluster=3)
    assert suite.redis_names == ["redis", "redis-1", "redis-2"]
    ports = suite.redis_ports
    every = [*ports, *(p + CLUSTER_BUS_OFFSET for p in ports)]
    every += [suite.ports[n] for n in local.SERVICES] + list(suite.metrics_ports.values())
    assert len(set(every)) == len(every)  # nodes, their buses, services, metrics: all distinct
    assert suite.redis_url == redis_client.cluster_url([("127.0.0.1", p) for p in ports])
    assert local.uses_redis(suite, suite.redis_url)
    assert local.uses_redis(suite, f"redis://localhost:{ports[2]}/0")
    assert not local.uses_redis(suite, "redis+cluster://127.0.0.1:1,127.0.0.1:2")
    assert suite.env()["REDIS_URL"] == suite.redis_url

    local.ensure_redis(suite)
    try:
        assert suite.redis_started and set(suite.pids) == set(suite.redis_names)
        loaded = local.Suite.load(suite.home)
        assert loaded is not None and loaded.redis_cluster == 3 and loaded.pids == suite.pids
        assert loaded.redis_dir == suite.home / local.CLUSTER_DIR

        # A crashed node is started again by the supervisor, on its port and in its directory,
        # and rejoins the cluster from its nodes-PORT.conf.
        crashed = suite.pids["redis-1"]
        os.kill(crashed, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(crashed) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(crashed)
        suite.pids["redis-1"] = supervisor._start(suite, "redis-1")
        assert suite.pids["redis-1"] != crashed
        wait_cluster_ok(suite.redis_dir, ports)
        assert {cluster_info(p)["cluster_known_nodes"] for p in ports} == {"3"}
        client = redis_client.connect(suite.redis_url)
        try:
            for key in KEYS:
                client.set(key, key)
            assert [client.get(key) for key in KEYS] == [key.encode() for key in KEYS]
        finally:
            client.close()

        suite_cmd._print_status(suite)
        out = capsys.readouterr().out.splitlines()
        for name, port in zip(suite.redis_names, ports, strict=True):
            line = next(line for line in out if line.split()[0] == name)
            assert "running" in line and f"port {port}" in line and "cluster:ok" in line

        # `bench --scale`'s memory figures count every master, not the one INFO reached.
        client = redis_client.connect(suite.redis_url)
        try:
            client.set("{big}", b"x" * (4 << 20))
        finally:
            client.close()
        mem = scale.memory(
            SimpleNamespace(suite=suite, cfg=SimpleNamespace(redis_url=suite.redis_url))
        )
        used = [_info_memory(p) for p in ports]
        assert sorted(mem["redis_nodes_rss_mb"]) == suite.redis_names
        assert mem["rss_mb"]["redis"] == pytest.approx(
            sum(mem["redis_nodes_rss_mb"].values()), abs=0.2
        )
        assert mem["redis_used_memory_mb"] == pytest.approx(sum(used) / 2**20, abs=0.5)
        assert mem["redis_used_memory_mb"] > max(used) / 2**20 + 0.5  # more than one node's
    finally:
        stopped = local.stop_suite(suite)
    assert stopped == ["redis", "redis-1", "redis-2"]
    assert not any(local.redis_answers(p) for p in ports)
    assert not suite.state_file.exists()


def _info_memory(port: int) -> int:
    node = redis.Redis(port=port)
    try:
        return int(node.info("memory")["used_memory"])
    finally:
        node.close()


def test_old_state_files_load_as_one_server(tmp_path: Path) -> None:
    suite = local.new_suite(tmp_path, free_ports=True)
    suite.save()
    data = json.loads(suite.state_file.read_text())
    assert data["redis_cluster"] == 0
    del data["redis_cluster"]  # a file written before clusters
    suite.state_file.write_text(json.dumps(data))
    loaded = local.Suite.load(tmp_path)
    assert loaded is not None and loaded.redis_cluster == 0
    assert loaded.redis_names == ["redis"] and loaded.redis_url == suite.redis_url
    assert loaded.redis_url == f"redis://127.0.0.1:{suite.ports['redis']}/0"


def test_fixed_ports_and_homes_of_another_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("EDGEFLOW_HOME", str(home))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:16390/0")
    one = local.new_suite(home, free_ports=False)
    assert one.redis_cluster == 0 and one.ports["redis"] == 16390
    three = local.new_suite(home, free_ports=False, redis_cluster=3)
    assert three.redis_ports == [16390, 16391, 16392]
    assert three.redis_url == "redis+cluster://127.0.0.1:16390,127.0.0.1:16391,127.0.0.1:16392"
    monkeypatch.setenv("REDIS_URL", "redis+cluster://127.0.0.1:17000,127.0.0.1:17005,h:17009")
    named = local.new_suite(home, free_ports=False)  # the URL's nodes say it is a cluster
    assert named.redis_cluster == 3 and named.redis_ports == [17000, 17005, 17009]
    with pytest.raises(RuntimeError, match="names 3 nodes, but the cluster asked for has 4"):
        local.new_suite(home, free_ports=False, redis_cluster=4)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:55535/0")
    with pytest.raises(RuntimeError, match="cluster bus"):
        local.new_suite(home, free_ports=False, redis_cluster=3)

    # A home whose Redis data is one server's: `up --redis-cluster 3` refuses, `up` does not.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:16390/0")
    (home / "redis").mkdir(parents=True)
    (home / "redis" / "appendonlydir").mkdir()
    from edgeflow import config
    from edgeflow.cli import suite_cmd

    with pytest.raises(CliError, match="keeps its data in one Redis server, not a Redis Cluster"):
        suite_cmd.up(config.load(), redis_cluster=3)
    assert local.new_suite(home, free_ports=False).redis_cluster == 0
    # ... and a cluster's: `up` without the flag, or with another size, refuses.
    (home / "redis" / "appendonlydir").rmdir()
    for port in (16390, 16391, 16392):
        node = cluster_node_dir(home / local.CLUSTER_DIR, port)
        node.mkdir(parents=True)
        (node / nodes_conf(port)).write_text("")
    with pytest.raises(CliError, match="run it with --redis-cluster 3"):
        suite_cmd.up(config.load())
    with pytest.raises(RuntimeError, match="Redis Cluster of 3 nodes, not a Redis Cluster of 4"):
        local.new_suite(home, free_ports=False, redis_cluster=4)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:16490/0")
    with pytest.raises(RuntimeError, match=r"has its nodes on ports \[16390, 16391, 16392\]"):
        local.new_suite(home, free_ports=False, redis_cluster=3)
    assert not (home / "run").exists()  # nothing was started


@pytest.mark.parametrize("command", ["up", "eval", "bench", "quickstart"])
def test_cli_takes_redis_cluster_of_three_or_more(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeflow.cli.main import build_parser, main

    extra = ["--edges", "x.txt"] if command == "eval" else []
    args = build_parser().parse_args([command, *extra, "--redis-cluster", "3"])
    assert args.redis_cluster == 3
    assert build_parser().parse_args([command, *extra]).redis_cluster == 0
    with pytest.raises(SystemExit) as exit_:
        main([command, *extra, "--redis-cluster", "2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--redis-cluster: a Redis Cluster needs at least 3 masters" in err and "got 2" in err


def test_bench_scale_takes_a_cluster() -> None:
    from edgeflow.cli.main import build_parser

    args = build_parser().parse_args(["bench", "--scale", "--redis-cluster", "3"])
    assert args.scale and args.redis_cluster == 3
