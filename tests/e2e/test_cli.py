"""The edgeflow command as a user runs it: real processes, real ports, real output."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edgeflow.build.synthetic import social_graph, write_edge_list
from edgeflow.local.ports import free_port
from edgeflow.local.suite import free_service_addrs

pytestmark = pytest.mark.e2e


def edgeflow(
    *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeflow.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("home")
    e = dict(os.environ)
    e.update(
        EDGEFLOW_HOME=str(home),
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        **free_service_addrs(),
    )
    yield e
    edgeflow("down", env=e)


@pytest.fixture
def suite_env(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The module's environment, with the suite a test started stopped even if it fails, so
    the next test does not find it up."""
    yield env
    edgeflow("down", env=env)


def test_quickstart_recommend_status_down(suite_env: dict[str, str], tmp_path: Path) -> None:
    env = suite_env
    edges = tmp_path / "edges.txt"
    write_edge_list(edges, social_graph(members=300, communities=6, seed=5))
    run = edgeflow("quickstart", "--edges", str(edges), "--members", "1", env=env)
    assert run.returncode == 0, run.stderr + run.stdout
    assert "ingested 300 members" in run.stdout
    assert "pymk for member" in run.stdout and "provenance" in run.stdout
    assert "edgeflow down" in run.stdout
    # Not a terminal: one plain line per stage with its duration (no bars), then the time
    # of each step, training's own steps, and the total, rather than one "suite up in 99s".
    took = r"(\d+\.\ds|\d+m \d\ds|\d+h \d\dm)"
    for stage in (
        "ingested 300 members",
        "  reading the member graph from Redis",
        "  ranker: gradient boosting",
        "  Qdrant upsert",
        "  Feast apply",
        "  Feast materialize",
        "starting the services",
    ):
        assert re.search(rf"^{re.escape(stage)}.* \({took}\)$", run.stdout, re.M), stage
    for step in ("Redis", "ingest", "training", "services", "total"):
        assert re.search(rf"^  {step} +{took}", run.stdout, re.M), (step, run.stdout)
    assert re.search(rf"^  training +{took}  \(load_graph ", run.stdout, re.M)
    assert "suite up in" not in run.stdout
    before_tables = run.stdout.split("pymk for member")[0]
    assert "\x1b[" not in before_tables and "\u2501" not in before_tables  # no ANSI, no bar
    # The lists its surfaces read are computed, so follows serves at once.
    assert "offline list 'pymk' (workflow pymk): 300 members" in run.stdout
    assert "offline list 'follows' (workflow follows): 300 members" in run.stdout
    assert run.stdout.count("what the rows are ranked by") == 1  # the legend, once

    follows = edgeflow("recommend", "--member", "7", "--surface", "follows", "--k", "5", env=env)
    assert follows.returncode == 0, follows.stderr
    rows = [line for line in follows.stdout.splitlines() if line.startswith("│ ")]
    assert len(rows) == 5, follows.stdout
    # No model scores follows at request time: an en dash, never a made-up 0.0000.
    assert all(line.split("│")[4].strip() == "\u2013" for line in rows), follows.stdout
    assert "0.0000" not in follows.stdout and "what the rows are ranked by" in follows.stdout

    rec = edgeflow("recommend", "--member", "7", "--k", "5", "--json", "--debug", env=env)
    assert rec.returncode == 0, rec.stderr
    resp = json.loads(rec.stdout)
    assert len(resp["edges"]) == 5 and resp["surface"] == "pymk"
    assert [n["node"] for n in resp["funnel"]["nodes"]][-1] == "blend"

    missing = edgeflow("recommend", "--member", "123456789", env=env)
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr

    # The gateway `up` started asks for a key; the CLI sent the local admin key until here.
    stranger = edgeflow("recommend", "--member", "7", env=dict(env, EDGEFLOW_API_KEY="ef_x_y"))
    assert stranger.returncode == 2 and "UNAUTHENTICATED: unknown API key" in stranger.stderr
    made = edgeflow("auth", "create-key", "--scopes", "recommend", env=env)
    reader = dict(env, EDGEFLOW_API_KEY=made.stdout.strip())
    assert edgeflow("recommend", "--member", "7", "--k", "3", env=reader).returncode == 0
    explain = edgeflow("recommend", "--member", "7", "--debug", env=reader)
    assert explain.returncode == 2 and "PERMISSION_DENIED" in explain.stderr, explain.stderr

    # Training runs beside the suite: a fresh embedding shard (the candidates service reads
    # its own copy of the old one, then switches), new features, a new model version.
    retrain = edgeflow("train", env=env)
    assert retrain.returncode == 0, retrain.stderr + retrain.stdout
    assert "qdrant_index" in retrain.stdout  # the time of the HNSW build
    again = edgeflow("recommend", "--member", "7", "--k", "5", "--json", env=env)
    assert again.returncode == 0 and len(json.loads(again.stdout)["edges"]) == 5, again.stderr

    # A block from the command line: acknowledged once stored, honoured by the next request,
    # and the same event id sent again stores nothing.
    shown = json.loads(again.stdout)["edges"][0]["target"]  # int64: a string in JSON
    block = ("publish", "--type", "block", "--member", "7", "--target", str(shown),
             "--event-id", "cli-block-7")  # fmt: skip
    published = edgeflow(*block, env=env)
    assert published.returncode == 0, published.stderr
    assert f"published block 7 -> {shown}: event cli-block-7, stream entry " in published.stdout
    after = edgeflow("recommend", "--member", "7", "--k", "50", "--json", env=env)
    assert after.returncode == 0, after.stderr
    assert shown not in [e["target"] for e in json.loads(after.stdout)["edges"]]
    repeat = edgeflow(*block, "--json", env=env)
    assert json.loads(repeat.stdout) == {"event_id": "cli-block-7", "entry_id": "",
                                         "duplicate": True}, repeat.stdout  # fmt: skip
    bad = edgeflow("publish", "--type", "block", "--member", "-3", "--target", "1", env=env)
    assert bad.returncode == 2 and "INVALID_ARGUMENT: events[0].member" in bad.stderr, bad

    status = edgeflow("status", env=env)
    assert status.stdout.count(" SERVING") == 6, status.stdout  # five services, the worker
    assert re.search(r"^  supervisor +running", status.stdout, re.M), status.stdout

    # A crashed service is started again by the suite's supervisor, on its port.
    state = Path(env["EDGEFLOW_HOME"]) / "run" / "suite.json"
    crashed = json.loads(state.read_text())["pids"]["merging"]
    os.kill(crashed, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = json.loads(state.read_text())["pids"]
        if (
            pids["merging"] != crashed
            and "merging     running" in (now := edgeflow("status", env=env).stdout)
            and now.count(" SERVING") == 6
        ):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"merging was not restarted: {state.read_text()}")
    assert "(restarted 1x)" in now, now
    back = edgeflow("recommend", "--member", "7", "--k", "5", "--json", env=env)
    assert back.returncode == 0 and not json.loads(back.stdout)["partial"], back.stdout

    # The suite serves the graph in its Redis: ingest refuses to swap it under the suite.
    refused = edgeflow("ingest", "--edges", str(edges), env=env)
    assert refused.returncode == 2, refused.stdout
    assert "is up (candidates, features, scoring, merging, gateway, nearline)" in refused.stderr
    assert f"`edgeflow quickstart --edges {edges}`" in refused.stderr
    assert "--replace-live" in refused.stderr and "ingested" not in refused.stdout
    forced = edgeflow("ingest", "--edges", str(edges), "--replace-live", env=env)
    assert forced.returncode == 0, forced.stderr
    assert "ingested" in forced.stdout and "replaced graph version " in forced.stdout
    assert "were built from the previous graph: rebuild them with" in forced.stdout

    pids = json.loads((Path(env["EDGEFLOW_HOME"]) / "run" / "suite.json").read_text())["pids"]
    down = edgeflow("down", env=env)
    assert down.returncode == 0 and "gateway" in down.stdout and "redis" in down.stdout
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_ingest_names_the_bad_line(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("# members\n1 2\n2 x\n")
    from edgeflow.local.redis_server import start_redis

    proc = start_redis(
        tmp_path / "redis", port=int(env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    )
    try:
        run = edgeflow("ingest", "--edges", str(bad), env=env)
        assert run.returncode == 2
        assert f"{bad}:3: member ids must be integers, got '2' 'x'" in run.stderr
        assert "Traceback" not in run.stderr
        ok = tmp_path / "ok.txt"
        ok.write_text("1 2\n2 3\n")
        run = edgeflow("ingest", "--edges", str(ok), env=env)
        assert run.returncode == 0 and "3 members, 2 edges" in run.stdout
        assert "dropped" not in run.stdout and "replaced" not in run.stdout
        # What the graph does not keep is said, with the first line of each kind.
        odd = tmp_path / "odd.txt"
        odd.write_text("1 2 0.5\n2 2\n2 1\n3 4\n")
        run = edgeflow("ingest", "--edges", str(odd), env=env)
        assert run.returncode == 0 and "4 members, 2 edges" in run.stdout, run.stderr
        assert "dropped 1 self loop (first on line 2)" in run.stdout
        assert "dropped 1 duplicate edge (first on line 3)" in run.stdout
        assert "ignored the columns after the first two on 1 line (first on line 1)" in run.stdout
        assert "replaced graph version " in run.stdout and "`edgeflow train`" in run.stdout
        # A file whose only line is a self loop is not a graph.
        loop = tmp_path / "loop.txt"
        loop.write_text("5 5\n")
        run = edgeflow("ingest", "--edges", str(loop), env=env)
        assert run.returncode == 2 and "ingested" not in run.stdout
        assert f"{loop}: no edges: its 1 edge line is a self loop (first on line 1)" in run.stderr
    finally:
        proc.stop()


def test_commands_without_redis_say_what_to_do(env: dict[str, str], tmp_path: Path) -> None:
    e = dict(env, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    run = edgeflow("ingest", "--edges", str(tmp_path / "x.txt"), env=e)
    assert run.returncode == 2 and "cannot reach Redis" in run.stderr


def test_serve_drains_on_sigterm(env: dict[str, str], tmp_path: Path) -> None:
    import signal
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    log = tmp_path / "merging.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeflow.cli.main", "serve", "merging"],
            # No PORT: it listens on the port of its own address, where its peers look.
            env=dict(env, MERGING_ADDR=f"127.0.0.1:{port}"), stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="edgeflow.v1.MergingService")
            status = None
            for _ in range(300):
                try:
                    status = health.Check(req, timeout=1).status
                    break
                except grpc.RpcError:
                    time.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.SERVING
        # Without BIND_HOST a service run by hand listens on loopback only.
        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}  # fmt: skip
        addrs = [ipaddress.ip_address(ip) for ip in listening]  # "::ffff:127.0.0.1" too
        assert addrs and all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in addrs)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    messages = [entry["msg"] for entry in lines]
    assert any("serving on port" in m for m in messages)
    assert messages[-2:] == ["merging draining", "merging stopped"]


def test_up_refuses_ports_already_in_use(env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        e = dict(env, GATEWAY_ADDR=f"127.0.0.1:{port}")
        run = edgeflow("up", env=e)
    assert run.returncode == 2
    # (other ports may be listed too: a parallel test worker can hold one of the free ports)
    assert run.stderr.startswith("edgeflow up: in use: ")
    assert f"gateway port {port}" in run.stderr and "edgeflow down" in run.stderr
    status = edgeflow("status", env=e)
    assert status.stdout.startswith("nothing is running")  # nothing was left behind


def test_free_service_addrs_leave_each_services_metrics_port_free_too() -> None:
    from edgeflow.local.ports import port_bindable
    from edgeflow.local.suite import SERVICES, metrics_port

    addrs = free_service_addrs()
    assert set(addrs) == {f"{s.upper()}_ADDR" for s in SERVICES}
    ports = [int(a.rsplit(":", 1)[1]) for a in addrs.values()]
    both = ports + [metrics_port(p) for p in ports]
    assert len(set(both)) == len(both)  # no service's port is another's metrics port
    assert all(port_bindable(p) for p in both)


def test_a_port_left_in_time_wait_is_free_but_a_listener_holds_it() -> None:
    """`edgeflow up` right after `down`: the old connections' TIME_WAIT does not hold a port
    (Redis and gRPC bind with SO_REUSEADDR), a listening socket does."""
    import socket

    from edgeflow.local.ports import port_bindable

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and Redis do
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_bindable(port, "0.0.0.0")
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.recv(1)
        client.close()
    assert port_bindable(port, "0.0.0.0")
