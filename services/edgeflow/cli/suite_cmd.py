"""`edgeflow up`, `down` and `status` for the suite on this machine."""

from __future__ import annotations

import argparse

from edgeflow import config
from edgeflow.cli import CliError
from edgeflow.local import suite as local


def up(cfg: config.Config) -> local.Suite:
    existing = local.Suite.load(cfg.home)
    if existing and any(local._alive(p) for n, p in existing.pids.items() if n != "redis"):
        raise CliError(f"the suite under {cfg.home} is already up; `edgeflow down` stops it")
    suite = local.new_suite(cfg.home, free_ports=False)
    if existing and existing.redis_started and local._alive(existing.pids.get("redis", 0)):
        suite.pids["redis"], suite.redis_started = existing.pids["redis"], True
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
        started = up(cfg)
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
    for name in ("redis", *local.SERVICES):
        pid = suite.pids.get(name, 0)
        alive = local._alive(pid)
        health = ""
        if name != "redis" and alive:
            health = "SERVING" if local._serving(suite.addr(name)) else "NOT_SERVING"
        state = "running" if alive else ("external" if name == "redis" and not pid else "stopped")
        mport = suite.metrics_ports.get(name)
        metrics = f"metrics http://127.0.0.1:{mport}/metrics" if mport and alive else ""
        print(
            f"  {name:<11} {state:<8} pid {pid or '-':<8} port {suite.ports[name]:<6} "
            f"{health:<11} {metrics}".rstrip()
        )
