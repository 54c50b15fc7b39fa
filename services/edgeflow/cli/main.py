"""`edgeflow`: one console script for the suite (argparse; heavy imports happen per command)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from edgeflow.cli import CliError

SERVICE_MODULES = {
    "candidates": "edgeflow.candidates.service",
    "features": "edgeflow.features.service",
    "scoring": "edgeflow.scoring.service",
    "merging": "edgeflow.merging.service",
    "gateway": "edgeflow.gateway.service",
    "nearline": "edgeflow.nearline.worker",
}


# `edgeflow publish --type` (edgeflow.cli.publish.TYPES; not imported: a command's modules
# load only when it runs).
EVENT_TYPES = ("connect", "disconnect", "block", "dismiss", "follow", "deactivate", "reactivate")


def _serve(args: argparse.Namespace) -> int:
    from edgeflow import config
    from edgeflow.shell import server

    cfg = config.load()
    if not cfg.port:  # the port of the service's own address, where its peers look for it
        from edgeflow.local.suite import service_port

        cfg = dataclasses.replace(cfg, port=service_port(cfg, args.service))
    server.setup_logging(cfg.log_level)
    module = importlib.import_module(SERVICE_MODULES[args.service])
    try:
        import uvloop  # spends less CPU per request than asyncio's loop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # not built for this platform (Windows): asyncio's loop serves too
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(server.serve(module.create(cfg), cfg))
    return 0


def _command(name: str, package: str = "edgeflow.cli") -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != package:
                raise
            # The benchmark is installed from a source checkout's benchmarks/, not in images.
            raise CliError(
                f"{package} is not installed here: it runs from a source checkout, "
                "where scripts/setup.sh installs it"
            ) from None
        result: int = module.run(args)
        return result

    return run


def _cluster_size(text: str) -> int:
    """--redis-cluster N: at least 3 masters, the fewest `redis-cli --cluster create` takes."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of masters") from None
    if n < 3:
        raise argparse.ArgumentTypeError(
            f"a Redis Cluster needs at least 3 masters (redis-cli creates none with fewer), got {n}"
        )
    return n


def _add_redis_cluster(s: argparse.ArgumentParser, more: str = "") -> None:
    s.add_argument("--redis-cluster", type=_cluster_size, default=0, metavar="N",
                   help="run on a Redis Cluster of N local masters (N >= 3) instead of one "
                   f"Redis server{more}")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeflow", description="Serving for edge recommendations (people you may know)."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("quickstart", help="ingest a graph, train, start the suite, recommend")
    s.add_argument("--edges", type=Path, help="edge list (default: the SNAP Facebook graph "
                   "in ../shared/data when present, else a generated graph)")  # fmt: skip
    s.add_argument("--members", type=int, default=3, help="members to show recommendations for")
    s.add_argument("--keep-running", action=argparse.BooleanOptionalAction, default=True,
                   help="leave the suite up afterwards (stop it with `edgeflow down`)")  # fmt: skip
    _add_redis_cluster(s, "; as for `up`, a home keeps the kind it was made with")
    s.set_defaults(func=_command("quickstart"))

    s = sub.add_parser("ingest", help="load an edge list into the member graph in Redis")
    s.add_argument("--edges", type=Path, required=True, help="whitespace-separated edge list")
    s.add_argument("--replace-live", action="store_true",
                   help="replace the graph even while the local suite serves it")  # fmt: skip
    s.set_defaults(func=_command("build"), action="ingest")

    s = sub.add_parser("train", help="embeddings, Feast features and the ranker from the graph")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--model", default="pymk-ranker", help="model name in the registry")
    s.set_defaults(func=_command("build"), action="train")

    s = sub.add_parser("up", help="start Redis, the five services and the nearline worker here")
    _add_redis_cluster(s, ", on REDIS_URL's port and the N-1 after it; a home keeps the kind "
                       "of Redis it was made with")  # fmt: skip
    s.set_defaults(func=_command("suite_cmd"), action="up")
    s = sub.add_parser("down", help="stop what `edgeflow up` started")
    s.set_defaults(func=_command("suite_cmd"), action="down")
    s = sub.add_parser("status", help="show the local suite's processes and health")
    s.set_defaults(func=_command("suite_cmd"), action="status")

    s = sub.add_parser("serve", help="run one service in the foreground (what `up` spawns)")
    s.add_argument("service", choices=sorted(SERVICE_MODULES))
    s.set_defaults(func=_serve)

    s = sub.add_parser("recommend", help="ask the gateway for recommendations")
    s.add_argument("--member", type=int, required=True)
    s.add_argument("--surface", default="pymk")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--debug", action="store_true", help="also print the funnel")
    s.add_argument("--json", action="store_true", help="print the response as JSON")
    s.add_argument("--addr", help="gateway address (default: GATEWAY_ADDR)")
    s.set_defaults(func=_command("recommend"))

    s = sub.add_parser("publish", help="send one member event (block, connect, ...) to the gateway")
    s.add_argument("--type", required=True, choices=EVENT_TYPES)
    s.add_argument("--member", type=int, required=True, help="the member who acted")
    s.add_argument("--target", type=int,
                   help="the other member (every type but deactivate and reactivate)")  # fmt: skip
    s.add_argument("--event-id", default="", help="idempotency key (generated when empty)")
    s.add_argument("--json", action="store_true", help="print the ids as JSON")
    s.add_argument("--addr", help="gateway address (default: GATEWAY_ADDR)")
    s.set_defaults(func=_command("publish"))

    s = sub.add_parser("explain", help="one request's funnel, top items, drops and DAG picture")
    s.add_argument("--member", type=int, required=True)
    s.add_argument("--surface", default="pymk")
    s.add_argument("--top", type=int, default=10, help="top items to show with their features")
    s.add_argument("--k", type=int, help="edges to ask for (default: --top)")
    s.add_argument("--gateway", help="gateway address (default: GATEWAY_ADDR)")
    s.add_argument(
        "--out",
        type=Path,
        help="SVG path, replaced if it exists (default: explain-SURFACE-MEMBER.svg "
        "in the current directory, which replaces only an earlier picture)",
    )
    s.add_argument(
        "--force", action="store_true", help="replace whatever file is at the default SVG path"
    )
    s.set_defaults(func=_command("explain"))  # fmt: skip

    s = sub.add_parser("validate", help="check workflow files")
    s.add_argument("files", type=Path, nargs="+")
    s.add_argument("--model-dir", type=Path,
                   help="also check model references against this registry")  # fmt: skip
    s.set_defaults(func=_command("validate"))

    s = sub.add_parser("auth", help="API keys for the gateway: create one, list them")
    keys_cmd = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = keys_cmd.add_parser("create-key", help="print a new key with these scopes")
    k.add_argument("--scopes", required=True,
                   help="comma-separated: recommend, publish, explain, admin")  # fmt: skip
    k.add_argument("--name", default="", help="what the key is for (listed, never sent)")
    k.add_argument(
        "--keys-file", type=Path, help="default: EDGEFLOW_AUTH_KEYS, $EDGEFLOW_HOME/auth/keys.json"
    )
    k.set_defaults(func=_command("keys"))
    k = keys_cmd.add_parser("list", help="the keys: id, scopes, created, name")
    k.add_argument("--keys-file", type=Path)
    k.set_defaults(func=_command("keys"))

    s = sub.add_parser("operator", help="run the Kubernetes operator for EdgeWorkflow resources")
    importlib.import_module("edgeflow_operator.main").add_arguments(s)

    s = sub.add_parser("experiments", help="A/B experiment reports and shadow comparisons")
    importlib.import_module("edgeflow.cli.experiments").add_arguments(s)

    s = sub.add_parser("models", help="the model registry: versions, canary, promote, rollback")
    importlib.import_module("edgeflow.cli.models").add_arguments(s)
    s.set_defaults(func=_command("models"))

    s = sub.add_parser("offline", help="the offline job: a workflow's lists for every member")
    off = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    o = off.add_parser("run", help="compute the list for every member, or for one shard")
    o.add_argument("--workflow", required=True, help="surface name or workflow YAML file")
    o.add_argument("--shard", type=int, help="this shard's index (default: JOB_COMPLETION_INDEX, "
                   "else every shard in turn)")  # fmt: skip
    o.add_argument("--shards", type=int, help="shard count (default: the workflow's)")
    o.add_argument("--local", action="store_true", help="run every shard as a local process")
    o.add_argument("--batch-size", type=int, default=256, help="members per batch")
    o.add_argument("--threads", type=int, default=2, help="batches computed at once per shard")
    o.add_argument("--restart", action="store_true", help="abandon a run in progress first")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    o.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    o.add_argument("--progress", action="store_true",
                   help="when not a terminal, also a count line every 10 s")  # fmt: skip
    o.set_defaults(func=_command("offline"))
    o = off.add_parser("status", help="the live version and the run in progress")
    o.add_argument("--workflow", required=True, help="surface name or workflow YAML file")
    o.set_defaults(func=_command("offline"))

    s = sub.add_parser("eval", help="measure recall@k end to end through the serving path")
    s.add_argument("--edges", type=Path, required=True)
    s.add_argument("--holdout", type=float, default=0.1)
    s.add_argument("--k", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-members", type=int, default=1000)
    s.add_argument("--sessions", type=int, default=1,
                   help="ask each member this many times, with no action in between, and "
                   "report how much of session 1's top-k is still shown (impressions)")  # fmt: skip
    s.add_argument("--diversity", nargs="?", const="", default=None, metavar="JSON",
                   help="also serve the members through a copy of pymk with diversity switched "
                   "(on with these params, e.g. '{\"lambda\": 0.7, \"window\": 10, "
                   "\"pool\": 100}', or off where pymk has it) and compare recall and "
                   "intra-list similarity")  # fmt: skip
    s.add_argument("--json", action="store_true", help="print one JSON object")
    _add_redis_cluster(s)
    s.set_defaults(func=_command("evaluate"))

    s = sub.add_parser("bench", help="latency and throughput against the in-process baseline")
    s.add_argument("--edges", type=Path, help="edge list (default: the Facebook graph)")
    s.add_argument("--requests", type=int, default=400)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--out", type=Path, help="also write the JSON result to this file (with "
                   "--scale: the directory for scale.json and scale.png, default "
                   "benchmarks/results)")  # fmt: skip
    s.add_argument(
        "--scale",
        action="store_true",
        help="generate social graphs of --sizes members and measure each end to end",
    )
    s.add_argument(
        "--sizes",
        default="10000,100000,1000000",
        help="with --scale: comma-separated member counts",
    )
    s.add_argument("--seed", type=int, default=0, help="with --scale: graph and training seed")
    s.add_argument(
        "--size-budget",
        type=float,
        help="with --scale: seconds one size may take before it is stopped and "
        "reported as over budget (default: 900 + 15 per thousand members)",
    )
    _add_redis_cluster(
        s,
        "; with --scale, every size on its own cluster, and the results "
        "named scale-cluster<N>.json and .png",
    )
    s.set_defaults(func=_command("bench", "edgeflow_bench"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"edgeflow {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgeflow ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
