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
from edgeflow.offline.progress import Stages, duration

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


def time_summary(seconds: dict[str, float], training: dict[str, float]) -> str:
    """Where quickstart's time went: each step, training's own steps, and the total."""
    steps = {k: v for k, v in training.items() if k != "total"}
    width = max(len(k) for k in seconds)
    lines = ["time:"]
    for name, took in seconds.items():
        line = f"  {name:<{width}}  {duration(took):>7}"
        if name == "training" and steps:
            line += "  (" + ", ".join(f"{k} {duration(v)}" for k, v in steps.items()) + ")"
        lines.append(line)
    return "\n".join(lines)


def activate_hint() -> str:
    """How to get this `edgeflow` on PATH: empty when it is, else the venv's activate line."""
    here = Path(sys.executable).parent
    found = shutil.which("edgeflow")
    if found and Path(found).resolve() == (here / "edgeflow").resolve():
        return ""
    try:
        where = here.relative_to(Path.cwd())
    except ValueError:
        where = here
    return f"`source {where / 'activate'}`, then "


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

    try:
        suite = local.new_suite(
            cfg.home, free_ports=False, redis_cluster=getattr(args, "redis_cluster", 0) or 0
        )
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    stages = Stages(console)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    where = f"Redis on port {suite.ports['redis']}"
    if suite.redis_cluster:
        where = f"Redis Cluster on ports {', '.join(map(str, suite.redis_ports))}"
    with stages.stage(where) as st:
        try:
            local.ensure_redis(suite)
        except RuntimeError as exc:
            raise CliError(str(exc)) from None
        st.note = "started" if suite.redis_started else "already running"
    seconds["Redis"] = st.seconds
    with stages.stage("loading scikit-learn, ONNX and Qdrant") as st:
        from edgeflow.build.ingest import ingest_file
        from edgeflow.build.train import train
        from edgeflow.graph import EdgeFileError
        from edgeflow.stores.redis_client import connect
    seconds["loading libraries"] = st.seconds

    notes: list[str] = []
    try:
        with stages.stage(f"ingesting {edges.name}") as st:
            graph = ingest_file(connect(suite.redis_url), edges, on_note=notes.append)
            st.update(text=f"ingested {graph.n:,} members and {graph.edge_count:,} edges")
    except EdgeFileError as exc:
        local.stop_suite(suite)
        raise CliError(str(exc)) from None
    seconds["ingest"] = st.seconds
    for note in notes:  # what the edge list had that the graph does not keep
        console.print(f"  {note}", markup=False, highlight=False)
    console.print("training: embeddings -> Qdrant, member features -> Feast, ranker -> ONNX")
    t_train = time.perf_counter()
    report = train(suite_config(suite), seed=0, stages=stages.nested())
    seconds["training"] = time.perf_counter() - t_train
    console.print(report.summary(times=False), markup=False, highlight=False, soft_wrap=True)
    # The lists the surfaces read: pymk blends its list in, follows serves only its list.
    from edgeflow.offline.bulk import compute_served_lists

    with stages.stage("computing the offline lists the surfaces read") as st:
        computed = compute_served_lists(suite_config(suite), connect(suite.redis_url))
        st.note = ", ".join(repr(done.list) for done in computed)
    for done in computed:
        console.print(f"offline {done.summary()}", markup=False, highlight=False, soft_wrap=True)
    seconds["offline lists"] = st.seconds
    names = local.SERVICES
    with stages.stage(
        "starting the services and the nearline worker", len(names), unit="serving"
    ) as st:
        try:
            local.start_services(suite, on_ready=lambda name: st.advance())
        except RuntimeError as exc:
            local.stop_suite(suite)
            raise CliError(str(exc)) from None
        st.note = ", ".join(names)
    seconds["services"] = st.seconds
    seconds["total"] = time.perf_counter() - t0
    console.print(
        time_summary(seconds, report.seconds), markup=False, highlight=False, soft_wrap=True
    )
    console.print(f"suite up; gateway at {suite.addr('gateway')}")

    degrees = graph.degree
    picks = [int(graph.ids[i]) for i in range(graph.n) if degrees[i] >= 5][:: max(graph.n // 7, 1)]
    shown = picks[: args.members]
    for member in shown:
        resp = fetch(suite.addr("gateway"), "pymk", member, 10, debug=False)
        render(resp, member, console, legend=member == shown[-1])  # the legend once, at the end
    if args.keep_running:
        console.print(
            f"\nThe suite is still running. Try {activate_hint()}`edgeflow recommend "
            "--member 0 --debug`; stop it with `edgeflow down`."
        )
    else:
        local.stop_suite(suite)
        console.print("suite stopped")
    return 0
