"""The whole suite as local processes: a Redis server (or a Redis Cluster of N local masters),
the five services and the nearline worker.

`edgeflow up` uses it with fixed ports under EDGEFLOW_HOME; `eval` and `bench` use it with
free ports in a temporary home so they can run beside a suite that is already up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeflow.config import Config
from edgeflow.local.ports import free_port, port_bindable
from edgeflow.local.redis_server import (
    AOF_FILES,
    MIN_CLUSTER_NODES,
    RDB,
    check_cluster_ports,
    find_redis_server,
    form_cluster,
    free_cluster_ports,
    nodes_conf,
    process_alive,
    quick_client,
    start_cluster,
    start_cluster_node,
    start_redis,
    stop_pid,
)
from edgeflow.shell import auth
from edgeflow.shell.server import configured_channel, health_name
from edgeflow.stores.redis_client import cluster_url, parse_url

SERVICES = ("candidates", "features", "scoring", "merging", "gateway", "nearline")
PROCESSES = ("redis", *SERVICES)
# With fixed ports, each service's /metrics listens this far above its gRPC port.
METRICS_OFFSET = 1000
# Where a suite's Redis keeps its data under its home: one server, or one directory per
# cluster node (node-PORT) for a Redis Cluster.
REDIS_DIR = "redis"
CLUSTER_DIR = "redis-cluster"


def redis_names(cluster_size: int) -> list[str]:
    """The suite's Redis processes: "redis" (one server, or the first cluster node), then
    "redis-1", "redis-2", ... for the other nodes of a cluster."""
    return ["redis", *(f"redis-{i}" for i in range(1, cluster_size))]


def is_redis_name(name: str) -> bool:
    return name == "redis" or name.startswith("redis-")


@dataclass
class Suite:
    home: Path
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    redis_started: bool = False
    # A suite of `edgeflow up` keeps its data across down/up; a throwaway one does not.
    persist: bool = False
    # Each service's Prometheus /metrics port (on loopback).
    metrics_ports: dict[str, int] = field(default_factory=dict)
    # How many times the supervisor restarted each process (local/supervisor.py).
    restarts: dict[str, int] = field(default_factory=dict)
    # Masters of a local Redis Cluster (ports "redis", "redis-1", ...); 0: one Redis server.
    redis_cluster: int = 0

    @property
    def redis_names(self) -> list[str]:
        """The names of the suite's Redis processes (in ports and pids)."""
        return redis_names(self.redis_cluster)

    @property
    def redis_ports(self) -> list[int]:
        return [self.ports[name] for name in self.redis_names]

    @property
    def redis_dir(self) -> Path:
        """The data directory of the suite's Redis (a cluster's nodes each have one inside)."""
        return self.home / (CLUSTER_DIR if self.redis_cluster else REDIS_DIR)

    @property
    def redis_url(self) -> str:
        if self.redis_cluster:
            return cluster_url([("127.0.0.1", port) for port in self.redis_ports])
        return f"redis://127.0.0.1:{self.ports['redis']}/0"

    def addr(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    @property
    def state_file(self) -> Path:
        return self.home / "run" / "suite.json"

    def env(self) -> dict[str, str]:
        """The environment every process of this suite runs with. Importing feast (training
        does, in `quickstart`) points PROMETHEUS_MULTIPROC(ESS)_DIR at a directory it deletes
        when that process exits: the suite's processes, which outlive it, must not use it."""
        env = {k: v for k, v in os.environ.items() if not _feast_metrics_dir(k, v)}
        env.update(
            EDGEFLOW_HOME=str(self.home),
            REDIS_URL=self.redis_url,
            CANDIDATES_ADDR=self.addr("candidates"),
            FEATURES_ADDR=self.addr("features"),
            SCORING_ADDR=self.addr("scoring"),
            MERGING_ADDR=self.addr("merging"),
            GATEWAY_ADDR=self.addr("gateway"),
            # The gateway asks for API keys; the CLI sends the local admin key by itself.
            EDGEFLOW_AUTH="on",
            EDGEFLOW_AUTH_KEYS=str(self.home / auth.KEYS_FILE),
        )
        return env

    def save(self) -> None:
        """Written whole and renamed: the supervisor rewrites it while others read it."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self) | {"home": str(self.home)}
        tmp = self.state_file.with_name(f".suite.{os.getpid()}.json")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, home: Path) -> Suite | None:
        path = home / "run" / "suite.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(
            home=Path(data["home"]),
            ports=data["ports"],
            pids=data["pids"],
            redis_started=data["redis_started"],
            persist=data.get("persist", False),
            metrics_ports=data.get("metrics_ports", {}),
            restarts=data.get("restarts", {}),
            redis_cluster=data.get("redis_cluster", 0),  # absent from files before clusters
        )


def _feast_metrics_dir(name: str, value: str) -> bool:
    return name.startswith("PROMETHEUS_MULTIPROC") and Path(value).name.startswith("feast_metrics_")


def new_suite(home: Path, free_ports: bool, redis_cluster: int = 0) -> Suite:
    """A suite on free ports, or on the ports the configuration names (REDIS_URL, *_ADDR).

    With `redis_cluster` N (at least 3), its Redis is a Redis Cluster of N local masters. On
    fixed ports their ports are those of a redis+cluster:// REDIS_URL that names N nodes, or
    N consecutive ports from REDIS_URL's port; a redis+cluster:// REDIS_URL of 3 or more
    nodes makes a cluster of that many by itself. A RuntimeError says what does not fit,
    including a home whose Redis data was made with another cluster size (see
    `check_home_redis`)."""
    if redis_cluster and redis_cluster < MIN_CLUSTER_NODES:
        raise RuntimeError(
            f"a Redis Cluster needs at least {MIN_CLUSTER_NODES} masters (redis-cli refuses "
            f"fewer), got {redis_cluster}"
        )
    if free_ports:
        if not redis_cluster:
            return Suite(
                home=home.resolve(),
                ports={k: free_port() for k in PROCESSES},
                metrics_ports={k: free_port() for k in SERVICES},
            )
        # Each node's cluster bus port (CLUSTER_BUS_OFFSET above its own) is taken too.
        node_ports = free_cluster_ports(redis_cluster)
        ports = dict(zip(redis_names(redis_cluster), node_ports, strict=True))
        ports |= {name: free_port() for name in SERVICES}
        metrics = {name: free_port() for name in SERVICES}
        return Suite(
            home=home.resolve(), ports=ports, metrics_ports=metrics, redis_cluster=redis_cluster
        )
    from edgeflow import config

    cfg = config.load()
    ports = {name: service_port(cfg, name) for name in SERVICES}
    try:
        addr = parse_url(cfg.redis_url)
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None
    url_ports = [port for _, port in addr.nodes]
    if addr.cluster and not redis_cluster:
        if len(url_ports) < MIN_CLUSTER_NODES:
            raise RuntimeError(
                f"REDIS_URL {cfg.redis_url} names a Redis Cluster by {len(url_ports)} node(s): "
                f"name its {MIN_CLUSTER_NODES} or more masters, or pass --redis-cluster N for a "
                "local one"
            )
        redis_cluster = len(url_ports)
    if redis_cluster:
        if len(url_ports) == 1:
            url_ports = [url_ports[0] + i for i in range(redis_cluster)]
        elif len(url_ports) != redis_cluster:
            raise RuntimeError(
                f"REDIS_URL {cfg.redis_url} names {len(url_ports)} nodes, but the cluster "
                f"asked for has {redis_cluster}: name one node (the others take the ports "
                "after it) or all of them"
            )
        try:
            check_cluster_ports(url_ports)
        except ValueError as exc:
            raise RuntimeError(f"REDIS_URL {cfg.redis_url}: {exc}") from None
        ports.update(zip(redis_names(redis_cluster), url_ports, strict=True))
        clash = sorted(set(url_ports) & {ports[name] for name in SERVICES})
        if clash:
            raise RuntimeError(
                f"the Redis Cluster's node ports {url_ports} take the services' port(s) "
                f"{clash}: choose another REDIS_URL port"
            )
    else:
        ports["redis"] = url_ports[0]
    metrics_ports = {name: metrics_port(ports[name]) for name in SERVICES}
    suite = Suite(
        home=home.resolve(), ports=ports, persist=True, metrics_ports=metrics_ports,
        redis_cluster=redis_cluster,
    )  # fmt: skip
    check_home_redis(suite)
    return suite


def home_redis_layout(home: Path) -> tuple[int, list[int]] | None:
    """What Redis data a suite's home holds: (0, []) for one server's, (N, node ports) for a
    Redis Cluster of N nodes, None for none."""
    node_ports = []
    for node in (home / CLUSTER_DIR).glob("node-*"):
        port = node.name.removeprefix("node-")
        if port.isdigit() and (node / nodes_conf(int(port))).exists():
            node_ports.append(int(port))
    node_ports.sort()
    if node_ports:
        return len(node_ports), node_ports
    single = home / REDIS_DIR
    if any((single / name).exists() for name in (RDB, *AOF_FILES)):
        return 0, []
    return None


def check_home_redis(suite: Suite) -> None:
    """A RuntimeError when the suite's home holds Redis data of another kind: one server's
    for a cluster, a cluster's for one server or of another size, or on other ports."""
    layout = home_redis_layout(suite.home)
    if layout is None:
        return
    size, node_ports = layout
    if size == suite.redis_cluster:
        if size and sorted(suite.redis_ports) != node_ports:
            raise RuntimeError(
                f"the Redis Cluster under {suite.home / CLUSTER_DIR} has its nodes on ports "
                f"{node_ports}, not {sorted(suite.redis_ports)}: set REDIS_URL to "
                f"{cluster_url([('127.0.0.1', p) for p in node_ports])}, or use another "
                "EDGEFLOW_HOME"
            )
        return

    def kind(n: int) -> str:
        return f"a Redis Cluster of {n} nodes" if n else "one Redis server"

    flag = f"with --redis-cluster {size}" if size else "without --redis-cluster"
    raise RuntimeError(
        f"the suite under {suite.home} keeps its data in {kind(size)}, not "
        f"{kind(suite.redis_cluster)}: run it {flag}, or use another EDGEFLOW_HOME"
    )


def service_port(cfg: Config, name: str) -> int:
    """The port of a service's address: GATEWAY_ADDR, ..., NEARLINE_ADDR (or its default)."""
    return int(getattr(cfg, f"{name}_addr").rsplit(":", 1)[1])


def metrics_port(grpc_port: int) -> int:
    """The /metrics port of a service on a fixed gRPC port: METRICS_OFFSET above it."""
    above = grpc_port + METRICS_OFFSET
    return above if above <= 65535 else grpc_port - METRICS_OFFSET


def free_service_addrs() -> dict[str, str]:
    """`<SERVICE>_ADDR` for each of SERVICES, on free loopback ports whose metrics ports are
    free too: a suite of its own beside others (tests, benchmarks)."""
    return {f"{name.upper()}_ADDR": f"127.0.0.1:{free_port(METRICS_OFFSET)}" for name in SERVICES}


def ensure_redis(suite: Suite) -> None:
    """Start a Redis server for the suite unless one already answers on its port (for a
    cluster: start the nodes that do not answer, and make them one cluster)."""
    if suite.redis_cluster:
        _ensure_cluster(suite)
        return
    if redis_answers(suite.ports["redis"]):
        return
    find_redis_server()
    proc = start_redis(suite.home / "redis", port=suite.ports["redis"], persist=suite.persist)
    suite.pids["redis"] = proc.pid
    suite.redis_started = True
    suite.save()


def redis_answers(port: int) -> bool:
    """Whether a Redis answers PING on 127.0.0.1:`port`."""
    import redis

    client = quick_client(port, timeout_s=2.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _ensure_cluster(suite: Suite) -> None:
    """Nodes that already answer are kept: all of them (a cluster someone else runs, or this
    home's, still up) must be one working cluster; some of them must be this suite's own,
    and the missing nodes are started to rejoin them. With none answering, the cluster is
    started (and created, the first time) in the suite's home."""
    names, ports = suite.redis_names, suite.redis_ports
    answering = [name for name in names if redis_answers(suite.ports[name])]
    if not answering:
        procs = start_cluster(suite.redis_dir, ports, persist=suite.persist)
        suite.pids.update(zip(names, (p.pid for p in procs), strict=True))
        suite.redis_started = True
        suite.save()
        return
    if len(answering) < len(names):
        ours = suite.redis_started
        strangers = [n for n in answering if not (ours and _alive(suite.pids.get(n, 0)))]
        if strangers:
            raise RuntimeError(
                "Redis answers on "
                + ", ".join(f"port {suite.ports[n]}" for n in strangers)
                + f" but not on the cluster's other node ports ({ports}): stop it, or choose "
                "other ports with REDIS_URL"
            )
        for name in names:
            if name not in answering:
                node = start_cluster_node(suite.redis_dir, suite.ports[name], suite.persist)
                suite.pids[name] = node.pid
        suite.save()
    form_cluster(suite.redis_dir, ports)


def start_services(
    suite: Suite, timeout_s: float = 120.0, on_ready: Callable[[str], object] | None = None
) -> None:
    """Spawn each service as `edgeflow serve NAME` and wait until all report SERVING;
    `on_ready(name)` is called as each one does."""
    busy = [
        f"{name} port {suite.ports[name]}" for name in SERVICES if not port_free(suite.ports[name])
    ]
    busy += [
        f"{name} metrics port {port}"
        for name, port in suite.metrics_ports.items()
        if not port_free(port)
    ]
    if busy:
        # Otherwise a health check could reach whatever already listens there.
        raise RuntimeError(
            f"in use: {', '.join(busy)}. Another edgeflow suite may be up: run `edgeflow down` "
            "where it was started, or choose other ports with GATEWAY_ADDR, CANDIDATES_ADDR, "
            "FEATURES_ADDR, SCORING_ADDR, MERGING_ADDR and NEARLINE_ADDR (each service's "
            f"metrics port is {METRICS_OFFSET} above its own)"
        )
    auth.ensure_admin_key(suite.home, suite.home / auth.KEYS_FILE)
    for name in SERVICES:
        suite.pids[name] = spawn_service(suite, name)
    suite.save()
    wait_serving(suite, timeout_s, on_ready)
    if suite.persist:  # `edgeflow up`: a crashed process is started again
        suite.pids["supervisor"] = spawn_supervisor(suite)
        suite.save()


def spawn_service(suite: Suite, name: str) -> int:
    """Start `edgeflow serve NAME` for the suite, detached, logging to run/NAME.log."""
    log_dir = suite.home / "run"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(
        suite.env(),
        PORT=str(suite.ports[name]),
        METRICS_PORT=str(suite.metrics_ports.get(name, 0)),
        METRICS_HOST="127.0.0.1",
    )
    with open(log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeflow.cli.main", "serve", name],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    return proc.pid


def spawn_supervisor(suite: Suite) -> int:
    with open(suite.home / "run" / "supervisor.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeflow.local.supervisor", str(suite.home)],
            env=suite.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    return proc.pid


def port_free(port: int) -> bool:
    """Whether a service could bind the port (services may listen on all interfaces)."""
    return port_bindable(port, "0.0.0.0")


def wait_serving(
    suite: Suite, timeout_s: float, on_ready: Callable[[str], object] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(SERVICES)
    while pending:
        name = pending[0]
        if not _alive(suite.pids.get(name, 0)):
            raise RuntimeError(f"{name} exited during start-up:\n{log_tail(suite, name)}")
        if _serving(suite.addr(name), name):
            pending.pop(0)
            if on_ready is not None:
                on_ready(name)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} did not become SERVING within {timeout_s:.0f}s:\n{log_tail(suite, name)}"
            )
        time.sleep(0.2)


def _serving(addr: str, name: str) -> bool:
    """Whether the edgeflow process `name` serves at `addr`: asked by its own health name, so
    another server that took the port in a race does not pass for it."""
    with configured_channel(addr) as ch:
        request = health_pb2.HealthCheckRequest(service=health_name(name))
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(request, timeout=1)
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


_alive = process_alive


def running_services(suite: Suite) -> list[str]:
    """The suite's services (and worker) whose processes are alive."""
    return [name for name in SERVICES if _alive(suite.pids.get(name, 0))]


def uses_redis(suite: Suite, redis_url: str) -> bool:
    """Whether `redis_url` names the suite's own Redis (its port on this machine; for a
    cluster, any of its nodes' ports)."""
    try:
        addr = parse_url(redis_url)
    except ValueError:
        return False
    own = set(suite.redis_ports)
    return any(
        (host or "127.0.0.1") in ("127.0.0.1", "localhost", "::1", "0.0.0.0") and port in own
        for host, port in addr.nodes
    )


def log_tail(suite: Suite, name: str, lines: int = 25) -> str:
    path = suite.home / "run" / f"{name}.log"
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_suite(suite: Suite) -> list[str]:
    """Stop the supervisor (first: nothing is restarted after), the services (gracefully,
    SIGTERM) and the Redis this suite started. The pids are read again after the supervisor
    stopped, so a process it restarted is stopped too."""
    stopped = []
    supervisor = suite.pids.pop("supervisor", 0)
    if supervisor and _alive(supervisor):
        stop_pid(supervisor)
        stopped.append("supervisor")
        latest = Suite.load(suite.home)
        if latest is not None:
            suite.pids.update({k: v for k, v in latest.pids.items() if k != "supervisor"})
    for name in reversed(SERVICES):
        pid = suite.pids.pop(name, 0)
        if pid and _alive(pid):
            stop_pid(pid)
            stopped.append(name)
    if suite.redis_started:
        for name in suite.redis_names:
            pid = suite.pids.pop(name, 0)
            if pid:
                stop_pid(pid)
                stopped.append(name)
        suite.redis_started = False
    suite.state_file.unlink(missing_ok=True)
    return stopped


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far, from /proc/<pid>/stat; NaN
    when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")
