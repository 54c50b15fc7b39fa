"""`edgeflow ingest` and `edgeflow train`."""

from __future__ import annotations

import argparse
import time

from edgeflow import config
from edgeflow.cli import CliError
from edgeflow.graph import EdgeFileError
from edgeflow.redis_client import connect


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
    if args.action == "ingest":
        from edgeflow.build.ingest import ingest_file

        t0 = time.perf_counter()
        try:
            graph = ingest_file(client, args.edges)
        except EdgeFileError as exc:
            raise CliError(str(exc)) from None
        print(
            f"ingested {args.edges}: {graph.n:,} members, {graph.edge_count:,} edges "
            f"(graph version {graph.version}, {time.perf_counter() - t0:.1f}s)"
        )
        return 0
    from edgeflow.build.train import train
    from edgeflow.graph_store import GraphNotLoaded

    try:
        report = train(cfg, seed=args.seed, model_name=args.model)
    except (GraphNotLoaded, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    print(report.summary())
    return 0
