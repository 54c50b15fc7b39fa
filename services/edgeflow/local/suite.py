"""The whole suite as local processes: a Redis server, the five services and the nearline worker.

`edgeflow up` uses it with fixed ports under EDGEFLOW_HOME; `eval` and `bench` use it with
free ports in a temporary home so they can run beside a suite that is already up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeflow import auth
from edgeflow.config import Config
from edgeflow.local.redis_server import (
    find_redis_server,
    free_port,
    process_alive,
    start_redis,
    stop_pid,
)

SERVICES = ("candidates", "features", "scoring", "merging", "gateway", "nearline")
# The nearline worker serves health only; its port is not a peer address in Config.
NEARLINE_ADDR = "127.0.0.1:50065"
PROCESSES = ("redis", *SERVICES)
# With fixed ports, each service's /metrics listens this far above its gRPC port.
METRICS_OFFSET = 1000


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

    @property
    def redis_url(self) -> str:
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
        )


def _feast_metrics_dir(name: str, value: str) -> bool:
    return name.startswith("PROMETHEUS_MULTIPROC") and Path(value).name.startswith(
        "feast_metrics_"
    )


def new_suite(home: Path, free_ports: bool) -> Suite:
    """A suite on free ports, or on the ports the configuration names (REDIS_URL, *_ADDR)."""
    if free_ports:
        return Suite(
            home=home.resolve(),
            ports={k: free_port() for k in PROCESSES},
            metrics_ports={k: free_port() for k in SERVICES},
        )
    from urllib.parse import urlparse

    from edgeflow import config

    cfg = config.load()
    ports = {name: service_port(cfg, name) for name in SERVICES}
    ports["redis"] = urlparse(cfg.redis_url).port or 6379
    metrics_ports = {name: metrics_port(ports[name]) for name in SERVICES}
    return Suite(home=home.resolve(), ports=ports, persist=True, metrics_ports=metrics_ports)


def service_port(cfg: Config, name: str) -> int:
    """The port of a service's address: GATEWAY_ADDR, ..., NEARLINE_ADDR (or its default)."""
    if name == "nearline":
        addr = os.environ.get("NEARLINE_ADDR", "").strip() or NEARLINE_ADDR
    else:
        addr = getattr(cfg, f"{name}_addr")
    return int(addr.rsplit(":", 1)[1])


def metrics_port(grpc_port: int) -> int:
    """The /metrics port of a service on a fixed gRPC port: METRICS_OFFSET above it."""
    above = grpc_port + METRICS_OFFSET
    return above if above <= 65535 else grpc_port - METRICS_OFFSET


def ensure_redis(suite: Suite) -> None:
    """Start a Redis server for the suite unless one already answers on its port."""
    import redis

    try:
        redis.Redis(port=suite.ports["redis"], socket_connect_timeout=0.3).ping()
        return
    except redis.RedisError:
        pass
    find_redis_server()
    proc = start_redis(suite.home / "redis", port=suite.ports["redis"], persist=suite.persist)
    suite.pids["redis"] = proc.pid
    suite.redis_started = True
    suite.save()


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
    """Whether a service could bind the port (services listen on all interfaces)."""
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def wait_serving(
    suite: Suite, timeout_s: float, on_ready: Callable[[str], object] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(SERVICES)
    while pending:
        name = pending[0]
        if not _alive(suite.pids.get(name, 0)):
            raise RuntimeError(f"{name} exited during start-up:\n{log_tail(suite, name)}")
        if _serving(suite.addr(name)):
            pending.pop(0)
            if on_ready is not None:
                on_ready(name)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} did not become SERVING within {timeout_s:.0f}s:\n{log_tail(suite, name)}"
            )
        time.sleep(0.2)


def _serving(addr: str) -> bool:
    with grpc.insecure_channel(addr) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


_alive = process_alive


def running_services(suite: Suite) -> list[str]:
    """The suite's services (and worker) whose processes are alive."""
    return [name for name in SERVICES if _alive(suite.pids.get(name, 0))]


def uses_redis(suite: Suite, redis_url: str) -> bool:
    """Whether `redis_url` names the suite's own Redis (its port on this machine)."""
    from urllib.parse import urlparse

    url = urlparse(redis_url)
    local_host = (url.hostname or "127.0.0.1") in ("127.0.0.1", "localhost", "::1", "0.0.0.0")
    return local_host and (url.port or 6379) == suite.ports["redis"]


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
    if suite.redis_started and suite.pids.get("redis"):
        stop_pid(suite.pids.pop("redis"))
        stopped.append("redis")
        suite.redis_started = False
    suite.state_file.unlink(missing_ok=True)
    return stopped


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")
