"""`edgeflow up`, `down` and `status` for the suite on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from edgeflow import config
from edgeflow.cli import CliError
from edgeflow.local import suite as local
from edgeflow.shell import auth
from edgeflow.shell.server import configured_channel
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc


def up(cfg: config.Config, redis_cluster: int = 0) -> local.Suite:
    """Start the suite under cfg.home; with `redis_cluster` N, on a Redis Cluster of N local
    masters instead of one Redis server."""
    existing = local.Suite.load(cfg.home)
    if existing and any(
        local._alive(p) for n, p in existing.pids.items() if not local.is_redis_name(n)
    ):
        raise CliError(f"the suite under {cfg.home} is already up; `edgeflow down` stops it")
    try:
        suite = local.new_suite(cfg.home, free_ports=False, redis_cluster=redis_cluster)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    if existing and existing.redis_started and existing.redis_cluster == suite.redis_cluster:
        # The Redis (or cluster nodes) it started and left running: kept, and stopped by down.
        alive = {n: existing.pids.get(n, 0) for n in suite.redis_names}
        alive = {n: pid for n, pid in alive.items() if local._alive(pid)}
        if alive:
            suite.pids.update(alive)
            suite.redis_started = True
    try:
        local.ensure_redis(suite)
        local.start_services(suite)
    except RuntimeError as exc:
        local.stop_suite(suite)
        raise CliError(str(exc)) from None
    return suite


def run(args: argparse.Namespace) -> int:
    cfg = config.load()
    if args.action == "up":
        started = up(cfg, getattr(args, "redis_cluster", 0) or 0)
        print(f"edgeflow is up (home {started.home}):")
        _print_status(started)
        print(f"Recommend at {started.addr('gateway')}; stop everything with `edgeflow down`.")
        return 0
    suite = local.Suite.load(cfg.home)
    if suite is None:
        print(f"nothing is running under {cfg.home}")
        return 0 if args.action == "down" else 1
    if args.action == "down":
        stopped = local.stop_suite(suite)
        print("stopped: " + (", ".join(stopped) or "nothing (already stopped)"))
        return 0
    _print_status(suite)
    return 0


def _print_status(suite: local.Suite) -> None:
    gateway_serving = False
    redis_names = suite.redis_names
    for name in (*redis_names, *local.SERVICES):
        pid = suite.pids.get(name, 0)
        alive = local._alive(pid)
        health = ""
        if name not in redis_names and alive:
            health = "SERVING" if local._serving(suite.addr(name), name) else "NOT_SERVING"
            gateway_serving |= name == "gateway" and health == "SERVING"
        elif suite.redis_cluster and (alive or not pid):  # a cluster node: its view of it
            health = _cluster_state(suite.ports[name])
        external = name in redis_names and not pid
        state = "running" if alive else ("external" if external else "stopped")
        mport = suite.metrics_ports.get(name)
        metrics = f"metrics http://127.0.0.1:{mport}/metrics" if mport and alive else ""
        restarts = suite.restarts.get(name, 0)
        again = f"  (restarted {restarts}x)" if restarts else ""
        print(
            f"  {name:<11} {state:<8} pid {pid or '-':<8} port {suite.ports[name]:<6} "
            f"{health:<11} {metrics}".rstrip() + again
        )
    supervisor = suite.pids.get("supervisor", 0)
    if supervisor:
        state = "running" if local._alive(supervisor) else "stopped: crashed processes stay down"
        print(f"  {'supervisor':<11} {state:<8} pid {supervisor}")
    if gateway_serving:
        print_workflows(suite.addr("gateway"), suite.home)


def _cluster_state(port: int) -> str:
    """The cluster state as the node on `port` sees it ("cluster:ok"); "" when it does not say."""
    import redis

    from edgeflow.local.redis_server import cluster_info

    try:
        return f"cluster:{cluster_info(port).get('cluster_state', '?')}"
    except redis.RedisError:
        return ""


def print_workflows(addr: str, home: Path | None = None) -> None:
    """The gateway's surfaces and what is wrong with each (ListSurfaces)."""
    try:
        with configured_channel(addr) as ch:
            resp = gateway_pb2_grpc.RecommenderStub(ch).ListSurfaces(
                gateway_pb2.ListSurfacesRequest(), timeout=5, metadata=auth.cli_metadata(home)
            )
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        details = " ".join((exc.details() or "").split())
        print(f"workflows: the gateway at {addr} did not list them: {code.name}: {details}")
        return
    for line in workflow_lines(resp, addr):
        print(line)


def workflow_lines(resp: gateway_pb2.ListSurfacesResponse, addr: str) -> list[str]:
    """One line per surface (ok, or its problems and which variants serve whom instead),
    then the workflow files the gateway refused."""
    lines = [f"workflows (gateway {addr}):"]
    statuses = {s.surface: s for s in resp.statuses}
    width = max((len(s) for s in resp.surfaces), default=0)
    for surface in resp.surfaces:
        st = statuses.get(surface)
        if st is None:  # a gateway older than the status field
            lines.append(f"  {surface:<{width}}  served")
            continue
        if st.problems:
            n = len(st.problems)
            state = f"PROBLEM: {n} model reference{'s' if n > 1 else ''} not loaded by scoring"
        elif not st.models_checked:
            state = f"models not checked yet ({st.check_error})"
        else:
            state = "ok"
        name = surface if st.workflow == surface else f"{surface} ({st.workflow})"
        lines.append(f"  {name:<{width}}  {state}")
        lines.extend(f"      - {p}" for p in st.problems)
        for r in st.reroutes:
            instead = (f"{r.experiment}={r.served} (its control)" if r.served
                       else "the workflow's own graph")  # fmt: skip
            lines.append(
                f"      members of {r.experiment}={r.variant} are served {instead} "
                "until the model is loaded"
            )
        if st.models_checked and st.check_error:
            lines.append(f"      (as of the last check; now {st.check_error})")
    for rejected in resp.rejected:
        first, *rest = rejected.splitlines()
        lines.append(f"  REJECTED {first}")
        lines.extend(f"    {line}" for line in rest)
    return lines
