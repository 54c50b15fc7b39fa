"""`edgeflow explain`: one request's funnel for a person, and a picture of its DAG.

It asks the running suite's gateway for one Recommend with explain (and debug) on, then prints
who was asked for and which variants served them, what each node did, the top items with
their scores, sources and features, and why the filtered items were dropped. The workflow DAG
with counts and timings on its nodes is written as SVG next to the terminal output.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edgeflow import config, tensor
from edgeflow.cli import CliError, dag_picture
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc, tensor_pb2

# More feature columns than this go in their own table, one column per item.
INLINE_FEATURES = 6
EXAMPLES = 5
_STATUS_STYLE = {"ok": "green", "fallback": "yellow", "skipped": "dim"}


def fetch(addr: str, surface: str, member: int, k: int) -> gateway_pb2.RecommendResponse:
    req = gateway_pb2.RecommendRequest(
        surface=surface, member=member, k=k, debug=True, explain=True
    )
    with grpc.insecure_channel(addr) as ch:
        try:
            return gateway_pb2_grpc.RecommenderStub(ch).Recommend(req, timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            details = " ".join((exc.details() or "").split())
            if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details:
                details += " (is the suite up? `edgeflow up` starts it)"
            raise CliError(f"gateway at {addr}: {code.name}: {details}") from None


def header(resp: gateway_pb2.RecommendResponse, member: int) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    variants = ", ".join(f"{a.experiment}={a.variant}" for a in resp.assignments)
    grid.add_row("member", str(member))
    grid.add_row("surface", resp.surface)
    grid.add_row("workflow", resp.workflow)
    grid.add_row("request id", resp.request_id)
    grid.add_row("variants", variants or "none (in no experiment)")
    grid.add_row("total", f"{resp.funnel.total_ms:.1f} ms, {len(resp.edges)} edges served")
    if resp.partial:
        grid.add_row("[yellow]partial[/]", Text("\n".join(resp.degraded) or "yes"))
    return grid


def funnel_table(resp: gateway_pb2.RecommendResponse) -> Table:
    table = Table(title="funnel", title_justify="left")
    for col in ("node", "op", "status", "in", "out", "start ms", "ms"):
        table.add_column(col, justify="right" if col in ("in", "out", "start ms", "ms") else "left")
    table.add_column("fallback / error")
    for n in resp.funnel.nodes:
        style = _STATUS_STYLE.get(n.status, "red")
        why = f"{n.fallback}: {n.error}" if n.fallback else n.error
        status = f"[{style}]{n.status}[/]"
        table.add_row(n.node, n.op, status, str(n.items_in), str(n.items_out),
                      f"{n.start_ms:.1f}", f"{n.duration_ms:.1f}", Text(why))  # fmt: skip
    return table


def _num(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.4g}"


def _sources(edge: tensor_pb2.Edge) -> str:
    """Each source with its own score; the mode and age where the list was not online."""
    out = []
    for p in edge.provenance:
        text = f"{p.source} {p.score:.3g}"
        if p.mode != "online":
            text += f" ({p.mode}" + (f", {p.age_seconds:.0f}s old)" if p.age_seconds >= 1 else ")")
        out.append(text)
    return ", ".join(out)


def features(resp: gateway_pb2.RecommendResponse) -> tuple[list[str], np.ndarray]:
    """Feature columns and one row per served edge (NaN rows where an edge had none)."""
    t = resp.explanation.features
    if t.rows != len(resp.edges):
        return [], np.zeros((len(resp.edges), 0), np.float32)
    return list(t.columns), tensor.unpack(t)


def top_tables(resp: gateway_pb2.RecommendResponse, top: int) -> list[Table]:
    columns, rows = features(resp)
    inline = len(columns) <= INLINE_FEATURES
    edges = resp.edges[:top]
    table = Table(title=f"top {len(edges)} of {len(resp.edges)}", title_justify="left")
    for col in ("#", "member", "score", "model"):
        table.add_column(col, justify="right")
    table.add_column("sources (own score)")
    for col in columns if inline else ():
        table.add_column(col, justify="right")
    for i, e in enumerate(edges):
        feats = [_num(float(v)) for v in rows[i]] if inline else []
        table.add_row(str(i + 1), str(e.target), f"{e.score:.4f}", f"{e.model_score:.4f}",
                      Text(_sources(e)), *feats)  # fmt: skip
    if inline or not edges:
        return [table]
    sub = Table(title=f"features of the top {len(edges)}", title_justify="left")
    sub.add_column("feature")
    for i, e in enumerate(edges):
        sub.add_column(f"#{i + 1}\n{e.target}", justify="right")
    for j, col in enumerate(columns):
        sub.add_row(col, *(_num(float(rows[i, j])) for i in range(len(edges))))
    return [table, sub]


def dropped_table(resp: gateway_pb2.RecommendResponse) -> Table | None:
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for d in resp.explanation.dropped:
        groups[(d.node, d.reason)].append(d.target)
    if not groups:
        return None
    total = len(resp.explanation.dropped)
    table = Table(title=f"dropped ({total} items)", title_justify="left")
    table.add_column("node")
    table.add_column("reason")
    table.add_column("count", justify="right")
    table.add_column("examples")
    for (node, reason), ids in groups.items():
        more = ", ..." if len(ids) > EXAMPLES else ""
        examples = ", ".join(map(str, ids[:EXAMPLES])) + more
        table.add_row(Text(node), Text(reason), str(len(ids)), examples)
    return table


def render(resp: gateway_pb2.RecommendResponse, member: int, top: int, console: Console) -> None:
    console.print(header(resp, member))
    console.print(funnel_table(resp))
    for table in top_tables(resp, top):
        console.print(table)
    if not resp.HasField("explanation"):
        console.print("[yellow]the gateway returned no explanation: no features or drops[/]")
    elif (drops := dropped_table(resp)) is not None:
        console.print(drops)
    else:
        console.print("no item was dropped by a filter or a quota")


def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise CliError(f"--top must be at least 1, got {args.top}")
    addr = args.gateway or config.load().gateway_addr
    resp = fetch(addr, args.surface, args.member, args.k or args.top)
    out: Path = args.out or Path(f"explain-{args.surface}-{args.member}.svg")
    try:
        out.write_text(dag_picture.render(resp, args.member))
    except OSError as exc:
        raise CliError(f"cannot write the DAG picture to {out}: {exc.strerror or exc}") from None
    console = Console()
    render(resp, args.member, args.top, console)
    console.print(f"DAG picture: {out}")
    return 0
