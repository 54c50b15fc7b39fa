"""`edgeflow ingest` and `edgeflow train`."""

from __future__ import annotations

import argparse
import time

from edgeflow import config
from edgeflow.cli import CliError
from edgeflow.graph import EdgeFileError
from edgeflow.offline.progress import Stages, duration
from edgeflow.stores.redis_client import connect


def run(args: argparse.Namespace) -> int:
    cfg = config.load()
    client = connect(cfg.redis_url)
    try:
        client.ping()
    except Exception as exc:
        raise CliError(
            f"cannot reach Redis at {cfg.redis_url} ({exc}); start the suite with `edgeflow up` "
            "or set REDIS_URL"
        ) from None
    stages = Stages()
    if args.action == "ingest":
        from edgeflow.build.ingest import current_version, ingest_file, live_graph, rebuild_steps

        live = live_graph(cfg, args.edges)
        if live and not args.replace_live:
            raise CliError(live)
        previous = current_version(client)
        notes: list[str] = []  # what the edge list had that the graph does not keep
        t0 = time.perf_counter()
        try:
            with stages.stage(f"ingesting {args.edges}") as st:
                graph = ingest_file(client, args.edges, on_note=notes.append)
                st.note = f"{graph.n:,} members, {graph.edge_count:,} edges"
        except EdgeFileError as exc:
            raise CliError(str(exc)) from None
        print(
            f"ingested {args.edges}: {graph.n:,} members, {graph.edge_count:,} edges "
            f"(graph version {graph.version}, {duration(time.perf_counter() - t0)})"
        )
        for note in notes:
            print(f"  {note}")
        if previous is not None:
            steps = rebuild_steps(cfg, args.edges, live=bool(live))
            print(f"replaced graph version {previous}: {steps}")
        return 0
    with stages.stage("loading scikit-learn, ONNX and Qdrant"):
        from edgeflow.build.train import train
        from edgeflow.stores.graph_store import GraphNotLoaded

    try:
        report = train(cfg, seed=args.seed, model_name=args.model, stages=stages)
    except (GraphNotLoaded, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    print(report.summary())
    return 0
