"""`edgeflow explain`: one request's funnel for a person, and a picture of its DAG.

It asks the running suite's gateway for one Recommend with explain (and debug) on, then prints
who was asked for and which variants served them, what each node did, the top items with
their scores, sources and features, and why the filtered items were dropped. The workflow DAG
with counts and timings on its nodes is written as SVG next to the terminal output.

Names (nodes, ops, features, reasons) are never cut: when the output is not a terminal the
tables are as wide as they need, and in a terminal too narrow for them a name wraps onto the
next line of its cell rather than ending in an ellipsis.

The picture goes to `--out`, else `explain-SURFACE-MEMBER.svg` in the current directory. A
file at `--out` is replaced (you named it); at the default path, only an earlier picture of
`edgeflow explain` is replaced, and anything else is left alone unless `--force` is given.
The last line says which file was written and whether it replaced one.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from edgeflow import config, tensor
from edgeflow.cli import CliError, dag_picture
from edgeflow.cli.recommend import fit_pipe, model_cell, mutual_cell
from edgeflow.shell import auth
from edgeflow.shell.server import configured_channel
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc, tensor_pb2

# More feature columns than this go in their own table, one column per item.
INLINE_FEATURES = 6
EXAMPLES = 5
_STATUS_STYLE = {"ok": "green", "fallback": "yellow", "skipped": "dim"}


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left")


def _column(table: Table, header: str, justify: JustifyMethod = "left") -> None:
    """A column whose text wraps between words when the console is too narrow for the
    table, and folds a word too long for it onto the next line: never cut with an
    ellipsis (rich's default) or cropped (what `no_wrap` would do)."""
    table.add_column(header, justify=justify, overflow="fold")


def fetch(addr: str, surface: str, member: int, k: int) -> gateway_pb2.RecommendResponse:
    req = gateway_pb2.RecommendRequest(
        surface=surface, member=member, k=k, debug=True, explain=True
    )
    with configured_channel(addr) as ch:
        try:
            stub = gateway_pb2_grpc.RecommenderStub(ch)
            return stub.Recommend(req, timeout=10, metadata=auth.cli_metadata())
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            details = " ".join((exc.details() or "").split())
            if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details:
                details += " (is the suite up? `edgeflow up` starts it)"
            raise CliError(f"gateway at {addr}: {code.name}: {details}") from None


def header(resp: gateway_pb2.RecommendResponse, member: int) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", overflow="fold")
    grid.add_column(overflow="fold")
    variants = ", ".join(f"{a.experiment}={a.variant}" for a in resp.assignments)
    grid.add_row("member", str(member))
    grid.add_row("surface", resp.surface)
    grid.add_row("workflow", resp.workflow)
    grid.add_row("request id", resp.request_id)
    grid.add_row("variants", variants or "none (in no experiment)")
    for r in resp.rerouted:
        instead = f"{r.experiment}={r.served}" if r.served else "the workflow's own graph"
        grid.add_row(
            "[yellow]rerouted[/]",
            Text(f"assigned {r.experiment}={r.variant}, served {instead}: a model it names "
                 "is not loaded by the scoring service (see `edgeflow status`)"),
        )  # fmt: skip
    grid.add_row("total", f"{resp.funnel.total_ms:.1f} ms, {len(resp.edges)} edges served")
    if resp.partial:
        grid.add_row("[yellow]partial[/]", Text("\n".join(resp.degraded) or "yes"))
    return grid


def funnel_table(resp: gateway_pb2.RecommendResponse) -> Table:
    table = _table("funnel")
    for col in ("node", "op", "status", "in", "out", "start ms", "ms"):
        _column(table, col, "right" if col in ("in", "out", "start ms", "ms") else "left")
    _column(table, "fallback / error")
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
    table = _table(f"top {len(edges)} of {len(resp.edges)}")
    for col in ("#", "member", "score", "model"):
        _column(table, col, "right")
    _column(table, "mutual")
    _column(table, "sources (own score)")
    for col in columns if inline else ():
        _column(table, col, "right")
    for i, e in enumerate(edges):
        feats = [_num(float(v)) for v in rows[i]] if inline else []
        table.add_row(str(i + 1), str(e.target), f"{e.score:.4f}", model_cell(e),
                      mutual_cell(e), Text(_sources(e)), *feats)  # fmt: skip
    if inline or not edges:
        return [table]
    sub = _table(f"features of the top {len(edges)}")
    _column(sub, "feature")
    for i, e in enumerate(edges):
        _column(sub, f"#{i + 1}\n{e.target}", "right")
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
    table = _table(f"dropped ({total} items)")
    _column(table, "node")
    _column(table, "reason")
    _column(table, "count", "right")
    _column(table, "examples")
    for (node, reason), ids in groups.items():
        more = ", ..." if len(ids) > EXAMPLES else ""
        examples = ", ".join(map(str, ids[:EXAMPLES])) + more
        table.add_row(Text(node), Text(reason), str(len(ids)), examples)
    return table


def render(resp: gateway_pb2.RecommendResponse, member: int, top: int, console: Console) -> None:
    parts: list[RenderableType] = [header(resp, member), funnel_table(resp)]
    parts.extend(top_tables(resp, top))
    if not resp.HasField("explanation"):
        parts.append("[yellow]the gateway returned no explanation: no features or drops[/]")
    elif (drops := dropped_table(resp)) is not None:
        parts.append(drops)
    else:
        parts.append("no item was dropped by a filter or a quota")
    fit_pipe(console, parts)
    for part in parts:
        console.print(part)


def picture_path(args: argparse.Namespace) -> tuple[Path, bool]:
    """Where the DAG picture goes, and whether a file is there already (which may be
    replaced: see the module's docstring). Checked before the gateway is asked."""
    if args.out is not None:
        out: Path = args.out
        if out.is_dir():
            raise CliError(f"--out {out} is a directory; name the SVG file to write")
        return out, out.exists()
    out = Path(f"explain-{args.surface}-{args.member}.svg")
    if not out.exists():
        return out, False
    if args.force or (out.is_file() and dag_picture.is_picture(_head(out))):
        return out, True
    raise CliError(
        f"{out} exists and is not a picture `edgeflow explain` wrote; pass --out FILE to "
        "write the picture elsewhere, or --force to replace it"
    )


def _head(path: Path) -> str:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise CliError(f"--top must be at least 1, got {args.top}")
    out, replacing = picture_path(args)
    addr = args.gateway or config.load().gateway_addr
    resp = fetch(addr, args.surface, args.member, args.k or args.top)
    try:
        out.write_text(dag_picture.render(resp, args.member))
    except OSError as exc:
        raise CliError(f"cannot write the DAG picture to {out}: {exc.strerror or exc}") from None
    console = Console()
    render(resp, args.member, args.top, console)
    what = "replaced the file that was there" if replacing else "a new file"
    console.print(f"DAG picture: {out} ({what})", soft_wrap=True, highlight=False)
    return 0
