"""`edgeflow recommend`: call Recommend and print a ranked table with provenance."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from edgeflow import config
from edgeflow.cli import CliError
from edgeflow.shell import auth
from edgeflow.shell.server import configured_channel
from edgeflow.v1 import gateway_pb2, gateway_pb2_grpc, tensor_pb2

NO_MODEL = "\u2013"  # an en dash: no value (a minus sign would read as a number)
_UNBOUNDED = 100_000  # columns: as wide as the widest line needs

LEGEND = (
    ("score", "what the rows are ranked by: the output node's blend scales each of its input "
     "lists to 0..1 within the list, weights it, and adds up the lists that hold the edge"),
    ("model", f"the ranker's own output for the edge, before the blend; {NO_MODEL} when no "
     "model scored it in this request (the surface is served from its precomputed list, or "
     "scoring fell back)"),
    ("mutual", "the connections the member and the edge's member share: how many, then up "
     f"to three of them; {NO_MODEL} when the merge had no member graph"),
    ("provenance", "each source that found the edge, with its own score (fof: common "
     "neighbours, ebr: cosine, precomputed: the list's score), its mode and its age"),
)  # fmt: skip


def fetch(
    addr: str, surface: str, member: int, k: int, debug: bool
) -> gateway_pb2.RecommendResponse:
    with configured_channel(addr) as ch:
        stub = gateway_pb2_grpc.RecommenderStub(ch)
        req = gateway_pb2.RecommendRequest(surface=surface, member=member, k=k, debug=debug)
        try:
            return stub.Recommend(req, timeout=5, metadata=auth.cli_metadata())
        except grpc.RpcError as exc:
            code = exc.code()
            raise CliError(f"{code.name}: {exc.details()}") from None


def model_cell(edge: tensor_pb2.Edge) -> str:
    """The model score, or NO_MODEL when no model scored the edge (never a made-up 0)."""
    return f"{edge.model_score:.4f}" if edge.HasField("model_score") else NO_MODEL


def mutual_cell(edge: tensor_pb2.Edge) -> str:
    """The social proof: '12: 4, 9, 31' (count, then the named ones), NO_MODEL when none."""
    if not edge.HasField("social_proof"):
        return NO_MODEL
    proof = edge.social_proof
    named = ", ".join(str(m) for m in proof.mutual_ids)
    return f"{proof.mutual_count}: {named}" if named else str(proof.mutual_count)


def fit_pipe(console: Console, parts: Sequence[RenderableType]) -> None:
    """A pipe or a file has no width: rich would assume 80 columns and squeeze the tables.
    Give them what they need instead, so that every line is whole."""
    if not console.is_terminal:
        unbounded = console.options.update_width(_UNBOUNDED)
        needed = (Measurement.get(console, unbounded, p).maximum for p in parts)
        console.width = max(console.width, *needed)


def print_legend(console: Console) -> None:
    """What the table's columns are (under the table)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for name, text in LEGEND:
        grid.add_row(name, Text(text))
    console.print(Padding(grid, (0, 0, 0, 2)), style="dim")


def render(
    resp: gateway_pb2.RecommendResponse,
    member: int,
    console: Console,
    funnel: bool = True,
    legend: bool = True,
) -> None:
    """The ranked table, the degraded nodes, why an empty answer is empty (from the funnel,
    when the response has one), the legend, and the funnel itself when `funnel`."""
    title = f"{resp.surface} for member {member}" + ("  [partial]" if resp.partial else "")
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("member", justify="right")
    table.add_column("score", justify="right")
    table.add_column("model", justify="right")
    table.add_column("mutual")
    table.add_column("provenance (source: score, mode)")
    for rank, edge in enumerate(resp.edges, start=1):
        prov = "; ".join(
            f"{p.source}: {p.score:.3g}, {p.mode}"
            + (f", {p.age_seconds:.0f}s old" if p.age_seconds >= 1 else "")
            for p in edge.provenance
        )
        table.add_row(str(rank), str(edge.target), f"{edge.score:.4f}", model_cell(edge),
                      mutual_cell(edge), prov)  # fmt: skip
    width = console.width
    fit_pipe(console, [table])
    console.print(table)
    console.width = width  # the notes and legend below wrap as before
    for line in resp.degraded:
        console.print(f"  degraded: {line}", style="yellow")
    if not resp.edges:
        console.print(f"  no recommendations for member {member} on {resp.surface}:",
                      style="yellow")  # fmt: skip
        for reason in empty_reasons(resp):
            console.print(Padding(Text(f"- {reason}"), (0, 0, 0, 2)), style="yellow")
    elif legend:
        print_legend(console)
    if funnel and resp.HasField("funnel"):
        _print_funnel(resp, console)


def _print_funnel(resp: gateway_pb2.RecommendResponse, console: Console) -> None:
    funnel = Table(title=f"funnel ({resp.funnel.total_ms:.1f} ms)", title_justify="left")
    for col in ("node", "op", "in", "out", "start ms", "ms", "status"):
        funnel.add_column(col)
    for n in resp.funnel.nodes:
        status = n.status + (f" ({n.fallback}: {n.error})" if n.fallback else "")
        status += f" ({n.note})" if n.note else ""
        funnel.add_row(n.node, n.op, str(n.items_in), str(n.items_out), f"{n.start_ms:.1f}",
                       f"{n.duration_ms:.1f}", status)  # fmt: skip
    console.print(funnel)
    if resp.funnel.dropped:
        console.print("  dropped: " + ", ".join(f"{k}={v}" for k, v in resp.funnel.dropped.items()))


def empty_reasons(resp: gateway_pb2.RecommendResponse) -> list[str]:
    """Why a response has no edges, read from its funnel (a debug response) and `degraded`:
    what each candidate source said, the nodes that fell back, what the filters removed."""
    nodes = list(resp.funnel.nodes)
    if not nodes:
        if resp.degraded:
            return ["the degraded nodes above served nothing"]
        return ["the response carries no funnel to say why: ask again with --debug"]
    reasons: list[str] = []
    for n in nodes:
        if n.status == "fallback":
            reasons.append(f"node {n.node!r} ({n.op}) failed, so its fallback "
                           f"{n.fallback!r} applied: {n.error}")  # fmt: skip
        elif n.note:
            reasons.append(f"node {n.node!r} ({n.op}): {n.note}")
            if n.op == "candidates.precomputed" and n.items_out == 0:
                reasons.append(_list_hint(resp, n.node))
        elif n.op.startswith("candidates.") and n.items_out == 0:
            reasons.append(f"node {n.node!r} ({n.op}) found no candidates")
    found = sum(n.items_out for n in nodes if n.op.startswith("candidates.") and not n.inputs)
    drops = {r: c for r, c in resp.funnel.dropped.items() if r != "duplicate"}
    if found and drops:
        reasons.append(
            f"the candidate sources found {found}, and the filters removed them all: "
            + ", ".join(f"{r}={c}" for r, c in sorted(drops.items(), key=lambda d: (-d[1], d[0])))
        )
    return [r for r in reasons if r] or [
        "every node ran and none reports a cause (see the funnel with --debug)"
    ]


def _list_hint(resp: gateway_pb2.RecommendResponse, node: str) -> str:
    """How to compute the list a precomputed node reads, from this machine's workflow files
    (what a local gateway serves); "" when they do not say."""
    from edgeflow.workflow.modes import list_name, served_workflows
    from edgeflow.workflow.ops import PrecomputedParams
    from edgeflow.workflow.validate import load_directory

    try:
        workflows, _ = load_directory(config.load().workflows_dir)
    except OSError:
        return ""
    served = served_workflows(workflows).get(resp.surface)
    if served is None:
        return ""
    params = next((cn.params for cn in served.nodes if cn.node.name == node), None)
    if not isinstance(params, PrecomputedParams):
        return ""
    writers = [w for w in workflows.values()
               if w.spec.modes.offline is not None and list_name(w) == params.list]  # fmt: skip
    if not writers:
        return f"no workflow with an offline mode writes list {params.list!r}"
    runs = " and ".join(f"`edgeflow offline run --workflow {w.surface}`" for w in writers)
    return f"list {params.list!r} is computed by the offline job: run {runs}"


def run(args: argparse.Namespace) -> int:
    addr = args.addr or config.load().gateway_addr
    if args.json:
        resp = fetch(addr, args.surface, args.member, args.k, args.debug)
        # Every field, zeros too: member 0 is a member, not a missing target.
        doc = MessageToDict(
            resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(doc, indent=2))
        return 0
    resp = fetch(addr, args.surface, args.member, args.k, args.debug)
    if not resp.edges and not args.debug:
        # An empty answer is explained from the funnel, if the key may see it.
        try:
            resp = fetch(addr, args.surface, args.member, args.k, debug=True)
        except CliError as exc:
            if "PERMISSION_DENIED" not in str(exc):
                raise
    render(resp, args.member, Console(), funnel=args.debug)
    return 0
