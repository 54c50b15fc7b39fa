"""`edgeflow recommend`: call Recommend and print a ranked table with provenance."""

from __future__ import annotations

import argparse
import json

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from edgeflow import config
from edgeflow.cli import CliError
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc


def fetch(
    addr: str, surface: str, member: int, k: int, debug: bool
) -> gateway_pb2.RecommendResponse:
    with grpc.insecure_channel(addr) as ch:
        stub = gateway_pb2_grpc.RecommenderStub(ch)
        req = gateway_pb2.RecommendRequest(surface=surface, member=member, k=k, debug=debug)
        try:
            return stub.Recommend(req, timeout=5)
        except grpc.RpcError as exc:
            code = exc.code()
            raise CliError(f"{code.name}: {exc.details()}") from None


def render(resp: gateway_pb2.RecommendResponse, member: int, console: Console) -> None:
    title = f"{resp.surface} for member {member}" + ("  [partial]" if resp.partial else "")
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("member", justify="right")
    table.add_column("score", justify="right")
    table.add_column("model", justify="right")
    table.add_column("provenance (source: score, mode)")
    for rank, edge in enumerate(resp.edges, start=1):
        prov = "; ".join(
            f"{p.source}: {p.score:.3g}, {p.mode}"
            + (f", {p.age_seconds:.0f}s old" if p.age_seconds >= 1 else "")
            for p in edge.provenance
        )
        table.add_row(str(rank), str(edge.target), f"{edge.score:.4f}", f"{edge.model_score:.4f}",
                      prov)  # fmt: skip
    console.print(table)
    for line in resp.degraded:
        console.print(f"  degraded: {line}", style="yellow")
    if resp.HasField("funnel"):
        funnel = Table(title=f"funnel ({resp.funnel.total_ms:.1f} ms)", title_justify="left")
        for col in ("node", "op", "in", "out", "start ms", "ms", "status"):
            funnel.add_column(col)
        for n in resp.funnel.nodes:
            status = n.status + (f" ({n.fallback}: {n.error})" if n.fallback else "")
            funnel.add_row(n.node, n.op, str(n.items_in), str(n.items_out), f"{n.start_ms:.1f}",
                           f"{n.duration_ms:.1f}", status)  # fmt: skip
        console.print(funnel)
        if resp.funnel.dropped:
            console.print(
                "  dropped: " + ", ".join(f"{k}={v}" for k, v in resp.funnel.dropped.items())
            )


def run(args: argparse.Namespace) -> int:
    addr = args.addr or config.load().gateway_addr
    resp = fetch(addr, args.surface, args.member, args.k, args.debug)
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
    else:
        render(resp, args.member, Console())
    return 0
