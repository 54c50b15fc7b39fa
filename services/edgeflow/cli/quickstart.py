"""`edgeflow quickstart`: the newcomer's one command after installation.

Ingest a real social graph (or a generated one), train, bring the suite up and print
recommendations for a few members.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

from edgeflow import config
from edgeflow.cli import CliError
from edgeflow.cli.harness import suite_config
from edgeflow.cli.recommend import fetch, render
from edgeflow.local import suite as local

FACEBOOK_CANDIDATES = (
    config.REPO_ROOT.parent / "shared" / "data" / "facebook_combined.txt",
    Path.cwd().parent / "shared" / "data" / "facebook_combined.txt",
)


def default_edges(home: Path, console: Console) -> Path:
    for path in FACEBOOK_CANDIDATES:
        if path.exists():
            console.print(f"using the SNAP ego-Facebook graph at {path}")
            return path
    from edgeflow.build.synthetic import social_graph, write_edge_list

    path = home / "generated_edges.txt"
    write_edge_list(path, social_graph())
    console.print(f"no Facebook graph found; generated a social graph at {path}")
    return path


def command_name() -> str:
    """How the user can call this command again: `edgeflow` if it is on PATH, else its path."""
    here = Path(sys.executable).parent / "edgeflow"
    found = shutil.which("edgeflow")
    if found and Path(found).resolve() == here.resolve():
        return "edgeflow"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


def run(args: argparse.Namespace) -> int:
    console = Console()
    cfg = config.load()
    cfg.home.mkdir(parents=True, exist_ok=True)
    edges = args.edges or default_edges(cfg.home, console)
    if not edges.exists():
        raise CliError(f"{edges}: edge file not found")

    existing = local.Suite.load(cfg.home)
    if existing is not None:
        console.print("stopping the suite that is already up (training rewrites its data)")
        local.stop_suite(existing)

    suite = local.new_suite(cfg.home, free_ports=False)
    t0 = time.perf_counter()
    local.ensure_redis(suite)
    from edgeflow.build.ingest import ingest_file
    from edgeflow.build.train import train
    from edgeflow.graph import EdgeFileError
    from edgeflow.redis_client import connect

    try:
        graph = ingest_file(connect(suite.redis_url), edges)
    except EdgeFileError as exc:
        local.stop_suite(suite)
        raise CliError(str(exc)) from None
    console.print(f"ingested {graph.n:,} members and {graph.edge_count:,} edges")
    console.print("training: embeddings -> Qdrant, member features -> Feast, ranker -> ONNX ...")
    report = train(suite_config(suite), seed=0)
    console.print(report.summary())
    console.print("starting the services ...")
    try:
        local.start_services(suite)
    except RuntimeError as exc:
        local.stop_suite(suite)
        raise CliError(str(exc)) from None
    console.print(
        f"suite up in {time.perf_counter() - t0:.0f}s; gateway at {suite.addr('gateway')}"
    )

    degrees = graph.degree
    picks = [int(graph.ids[i]) for i in range(graph.n) if degrees[i] >= 5][:: max(graph.n // 7, 1)]
    for member in picks[: args.members]:
        resp = fetch(suite.addr("gateway"), "pymk", member, 10, debug=False)
        render(resp, member, console)
    if args.keep_running:
        cmd = command_name()
        console.print(
            f"\nThe suite is still running. Try `{cmd} recommend --member 0 --debug`; "
            f"stop it with `{cmd} down`."
        )
    else:
        local.stop_suite(suite)
        console.print("suite stopped")
    return 0
