"""Explain: the served edges' features and every dropped item with its reason and node, from
the in-process suite (the `suite` fixture in conftest.py), the DAG picture and the CLI."""

from __future__ import annotations

import asyncio
import io
import math
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from inprocess import Suite, members_with_degree

from edgeflow import tensor
from edgeflow.cli import dag_picture
from edgeflow.cli.main import main
from edgeflow.gateway.engine import Clients, Engine, Outcome, Scored
from edgeflow.gateway.explain import explanation
from edgeflow.gateway.frame import Frame
from edgeflow.gateway.service import GatewayService
from edgeflow.local.ports import free_port
from edgeflow.shell.server import channel
from edgeflow.v1 import (
    features_pb2,
    features_pb2_grpc,
    gateway_pb2,
    tensor_pb2,
)

SVG = "{http://www.w3.org/2000/svg}"
NODES = ["fof", "ebr", "precomputed", "popular", "features", "rank", "blend"]
REASONS = {"self", "connected", "blocked", "dismissed", "duplicate"}


def connected(suite: Suite, member: int) -> set[int]:
    g = suite.graph
    return set(g.ids[g.neighbors(g.index_of(member))].tolist())


async def publish(suite: Suite, kind: int, member: int, target: int) -> None:
    event = gateway_pb2.MemberEvent(type=kind, member=member, target=target, time=time.time())
    reply = await suite.stub.Publish(gateway_pb2.PublishRequest(events=[event]), timeout=10)
    assert reply.published == 1


async def test_explain_gives_the_served_edges_feature_rows(suite: Suite) -> None:
    member = members_with_degree(suite.graph, 8)[0]
    resp = await suite.recommend(member, k=10, explain=True)
    assert resp.HasField("explanation") and resp.HasField("funnel")  # explain implies debug
    feats = resp.explanation.features
    served = [e.target for e in resp.edges]
    assert feats.rows == len(served) == 10
    # The very rows the features service gives for these (member, candidate) pairs.
    _, _, port = suite.servers["features"]
    async with channel(f"127.0.0.1:{port}") as ch:
        direct = await features_pb2_grpc.FeatureServiceStub(ch).GetFeatures(
            features_pb2.GetFeaturesRequest(member=member, entities=served), timeout=10
        )
    assert list(feats.columns) == list(direct.features.columns)
    assert "embedding_cosine" in feats.columns
    np.testing.assert_allclose(tensor.unpack(feats), tensor.unpack(direct.features), rtol=1e-6)

    plain = await suite.recommend(member, k=10, debug=True)
    assert not plain.HasField("explanation")
    inputs = {n.node: list(n.inputs) for n in plain.funnel.nodes}  # the DAG, always
    assert inputs == {"fof": [], "ebr": [], "precomputed": [], "popular": [],
                      "features": ["fof", "ebr", "precomputed", "popular"],
                      "rank": ["features"],
                      "blend": ["rank", "precomputed", "popular"]}  # fmt: skip


async def test_dropped_items_carry_reasons_and_nodes(suite: Suite) -> None:
    member = members_with_degree(suite.graph, 8)[1]
    before = await suite.recommend(member, k=20, explain=True)
    blocked, dismissed = before.edges[0].target, before.edges[1].target
    await publish(suite, gateway_pb2.MemberEvent.BLOCK, member, blocked)
    await publish(suite, gateway_pb2.MemberEvent.DISMISS, member, dismissed)

    resp = await suite.recommend(member, k=20, explain=True)
    served = {e.target for e in resp.edges}
    assert blocked not in served and dismissed not in served
    items = {(d.target, d.reason, d.node) for d in resp.explanation.dropped}
    assert (blocked, "blocked", "blend") in items
    assert (dismissed, "dismissed", "blend") in items
    assert {d.node for d in resp.explanation.dropped} == {"blend"}
    assert {d.reason for d in resp.explanation.dropped} <= REASONS
    for d in resp.explanation.dropped:
        if d.reason == "connected":
            assert d.target in connected(suite, member)
        elif d.reason != "duplicate":
            assert d.target not in served
    # One item per dropped count the funnel reports (top_k aside: those are not dropped).
    counts = {r: c for r, c in resp.funnel.dropped.items() if r != "top_k"}
    listed = {r: sum(1 for d in resp.explanation.dropped if d.reason == r) for r in counts}
    assert listed == counts


async def _surface_with_filter_node(suite: Suite) -> str:
    """A copy of pymk that hides blocked members in a filter node of its own, before blend."""
    wf_dir = suite.cfg.workflows_dir
    doc: dict[str, Any] = yaml.safe_load((wf_dir / "pymk.yaml").read_text())
    doc["metadata"]["name"] = doc["spec"]["surface"] = "pymk-hide"
    doc["spec"]["nodes"].insert(
        -1, {"name": "hide", "op": "filter.blocked", "inputs": ["rank"], "timeoutMs": 5000}
    )
    blend = doc["spec"]["nodes"][-1]
    blend["inputs"] = ["hide", "precomputed"]
    blend["params"]["weights"] = {"hide": 1.0, "precomputed": 0.5}
    (wf_dir / "pymk-hide.yaml").write_text(yaml.safe_dump(doc))
    for _ in range(100):  # the gateway reloads its workflows on its own
        listed = await suite.stub.ListSurfaces(gateway_pb2.ListSurfacesRequest(), timeout=10)
        if "pymk-hide" in listed.surfaces:
            return "pymk-hide"
        await asyncio.sleep(0.1)
    pytest.fail("the gateway never served the pymk-hide workflow")


async def test_a_filter_node_names_itself(suite: Suite) -> None:
    surface = await _surface_with_filter_node(suite)
    member = members_with_degree(suite.graph, 8)[2]
    before = await suite.recommend(member, k=10, surface=surface)
    blocked = before.edges[0].target
    await publish(suite, gateway_pb2.MemberEvent.BLOCK, member, blocked)
    resp = await suite.recommend(member, k=10, surface=surface, explain=True)
    assert (blocked, "blocked", "hide") in {
        (d.target, d.reason, d.node) for d in resp.explanation.dropped
    }
    assert {d.node for d in resp.explanation.dropped} <= {"hide", "blend"}


async def test_engine_collects_explain_data_only_when_asked(suite: Suite) -> None:
    cfg = suite.cfg
    chans = [channel(a) for a in (cfg.candidates_addr, cfg.features_addr, cfg.scoring_addr,
                                  cfg.merging_addr)]  # fmt: skip
    engine = Engine(Clients.over(*chans))
    gateway = suite.servers["gateway"][0]
    assert isinstance(gateway, GatewayService)
    wf = gateway.workflows["pymk"]
    member = members_with_degree(suite.graph, 8)[4]
    try:
        plain = await engine.run(wf, member, 10, 10.0)
        await publish(suite, gateway_pb2.MemberEvent.DISMISS, member, plain.frame.edges[0].target)
        plain = await engine.run(wf, member, 10, 10.0)
        assert plain.dropped_items == [] and plain.scored == []
        assert [list(t.inputs) for t in plain.traces][-1] == ["rank", "precomputed", "popular"]
        outcome = await engine.run(wf, member, 10, 10.0, explain=True)
    finally:
        await engine.close()
        for ch in chans:
            await ch.close()
    assert [e.target for e in outcome.frame.edges] == [e.target for e in plain.frame.edges]
    [scored] = outcome.scored
    rank = next(t for t in outcome.traces if t.node == "rank")
    assert scored.node == "rank" and scored.ids.size == rank.items_in == scored.features.rows
    assert {d.node for d in outcome.dropped_items} == {"blend"}
    assert "dismissed" in {d.reason for d in outcome.dropped_items}
    rows = tensor.unpack(explanation(outcome).features)
    assert rows.shape[0] == 10 and not np.isnan(rows).any()


def test_explanation_fills_nan_rows_for_edges_never_scored() -> None:
    frame = Frame.empty()
    frame.edges = [tensor_pb2.Edge(target=t) for t in (1, 2, 3, 4)]
    cols = ["a", "b"]
    outcome = Outcome(frame=frame, partial=False)
    outcome.scored = [
        Scored("rank", np.array([3, 1]), tensor.pack(np.array([[3, 30], [1, 10]]), cols)),
        Scored("other", np.array([2]), tensor.pack(np.array([[9.0]]), ["c"])),  # other columns
        Scored("again", np.array([2, 1]), tensor.pack(np.array([[2, 20], [5, 50]]), cols)),
    ]
    outcome.dropped_items = [tensor_pb2.DroppedItem(target=9, reason="blocked", node="blend")]
    out = explanation(outcome)
    rows = tensor.unpack(out.features)
    assert list(out.features.columns) == cols
    assert rows[:3].tolist() == [[1, 10], [2, 20], [3, 30]]  # the first node's row wins for 1
    assert all(math.isnan(v) for v in rows[3])
    assert [(d.target, d.reason, d.node) for d in out.dropped] == [(9, "blocked", "blend")]
    none = explanation(Outcome(frame=frame, partial=False))
    assert (none.features.rows, none.features.cols) == (4, 0) and not none.dropped


def _trace(node: str, inputs: list[str], status: str = "ok") -> gateway_pb2.NodeTrace:
    return gateway_pb2.NodeTrace(node=node, op="op", status=status, inputs=inputs,
                                 items_in=5, items_out=3, duration_ms=1.5)  # fmt: skip


def parse_svg(text: str) -> tuple[ET.Element, list[ET.Element], list[ET.Element]]:
    root = ET.fromstring(text)
    groups = root.iter(f"{SVG}g")
    nodes, edges = [], []
    for g in groups:
        (nodes if g.get("class") == "node" else edges if g.get("class") == "edge" else []).append(g)
    return root, nodes, edges


def test_dag_picture_layers_by_depth_and_colours_by_status() -> None:
    traces = [_trace("a", []), _trace("b", [], "fallback"), _trace("c", ["a", "b"]),
              _trace("d", ["c", "a"], "skipped"), _trace("e <&>", ["d"], "error")]  # fmt: skip
    text = dag_picture.svg(traces, "pymk for member 7", "variants: none")
    root, nodes, edges = parse_svg(text)
    assert root.tag == f"{SVG}svg"
    assert [g.get("data-node") for g in nodes] == ["a", "b", "c", "d", "e <&>"]
    assert sorted((g.get("data-from"), g.get("data-to")) for g in edges) == [
        ("a", "c"), ("a", "d"), ("b", "c"), ("c", "d"), ("d", "e <&>"),
    ]  # fmt: skip
    rects = {g.get("data-node"): g.find(f"{SVG}rect") for g in nodes}
    y = {name: float(r.get("y", "nan")) for name, r in rects.items() if r is not None}
    assert y["a"] == y["b"] < y["c"] < y["d"] < y["e <&>"]
    fills = {name: r.get("fill") for name, r in rects.items() if r is not None}
    assert fills["a"] == dag_picture.COLOURS["ok"][0]
    assert fills["b"] == dag_picture.COLOURS["fallback"][0]
    assert fills["d"] == dag_picture.COLOURS["skipped"][0]
    assert len(set(fills.values())) == 4
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "pymk for member 7" in texts and "5 \u2192 3 items \u00b7 1.5 ms" in texts


def test_dag_picture_boxes_fit_long_names() -> None:
    long_node = "candidates_from_friends_of_friends_weighted_by_adamic_adar"
    long_op = "candidates.precomputed_lists_written_by_the_offline_job"
    traces = [_trace(long_node, []), _trace("rank", [long_node])]
    traces[0].op = long_op
    title = "pymk-with-a-rather-long-surface-name for member 123456789  \u00b7  12.3 ms"
    text = dag_picture.svg(traces, title, "workflow pymk  \u00b7  variants: " + "x=y, " * 30)
    root, nodes, _ = parse_svg(text)
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]
    assert long_node in texts and long_op in texts  # whole, never clipped
    assert not any("\u2026" in t for t in texts)
    widths = set()
    for g in nodes:
        rect = g.find(f"{SVG}rect")
        assert rect is not None
        x, width = float(rect.get("x", "nan")), float(rect.get("width", "nan"))
        widths.add(width)
        assert x > 0 and x + width < float(root.get("width", "nan"))
    [width] = widths  # every box as wide as the widest name needs
    assert width >= len(long_op) * 0.6 * 11 and width >= len(long_node) * 0.6 * 14
    assert float(root.get("width", "nan")) >= len(title) * 0.6 * 16  # the title fits too
    assert root.get("class") == dag_picture.ROOT_CLASS and dag_picture.is_picture(text)
    assert not dag_picture.is_picture("<svg><g/></svg>") and not dag_picture.is_picture("hello")


LONG_NODE = "candidates_from_friends_of_friends_weighted_by_adamic_adar"
LONG_OP = "candidates.precomputed"
LONG_FEATURES = ["embedding_cosine_similarity_of_member_and_candidate", "preferential_attach",
                 "f3", "f4", "f5", "f6", "f7"]  # fmt: skip
LONG_REASON = "dismissed_by_the_member_a_while_ago"


def _long_names_response() -> gateway_pb2.RecommendResponse:
    resp = gateway_pb2.RecommendResponse(surface="pymk", workflow="pymk", request_id="r1")
    resp.funnel.nodes.add(
        node=LONG_NODE, op=LONG_OP, status="fallback", fallback="passthrough",
        error="NOT_FOUND: model 'pymk-ranker' has no loaded version 'v2' in the registry",
    )  # fmt: skip
    for target in (11, 12):
        edge = resp.edges.add(target=target, score=0.5, model_score=0.4)
        edge.provenance.add(source=LONG_NODE, score=0.3, mode="offline", age_seconds=30)
    rows = np.ones((2, len(LONG_FEATURES)), np.float32)
    resp.explanation.features.CopyFrom(tensor.pack(rows, LONG_FEATURES))
    resp.explanation.dropped.add(target=5, reason=LONG_REASON, node=LONG_NODE)
    return resp


def test_explain_tables_never_cut_names_in_a_pipe() -> None:
    """Not a terminal (a pipe, a file): rich would assume 80 columns and cut the names."""
    from rich.console import Console

    from edgeflow.cli.explain import render

    out = io.StringIO()
    console = Console(file=out, width=80)  # what rich picks when stdout is not a tty
    assert not console.is_terminal
    render(_long_names_response(), 3, 10, console)
    text = out.getvalue()
    assert "\u2026" not in text
    for name in (LONG_NODE, LONG_OP, *LONG_FEATURES, LONG_REASON):
        assert re.search(rf"[ │]{re.escape(name)}[ │]", text), name  # whole, on one line
    assert "has no loaded version 'v2' in the registry" in text


def test_explain_header_says_when_a_variant_was_rerouted() -> None:
    from rich.console import Console

    from edgeflow.cli.explain import render

    resp = _long_names_response()
    resp.assignments.add(experiment="ranker-v2", variant="v1")
    resp.rerouted.add(experiment="ranker-v2", variant="v2", served="v1")
    out = io.StringIO()
    render(resp, 3, 10, Console(file=out, width=80))
    assert "variants    ranker-v2=v1" in out.getvalue()
    assert "rerouted    assigned ranker-v2=v2, served ranker-v2=v1: a model it names is not " in (
        out.getvalue()
    )


def test_explain_tables_fold_names_in_a_narrow_terminal() -> None:
    """A terminal too narrow for the table: names wrap onto the next line, never cut."""
    from rich.console import Console

    from edgeflow.cli.explain import render

    out = io.StringIO()
    console = Console(file=out, width=60, force_terminal=True, color_system=None)
    render(_long_names_response(), 3, 10, console)
    text = out.getvalue()
    assert "\u2026" not in text and max(len(line) for line in text.splitlines()) <= 60
    lines = text.splitlines()
    # The funnel's body rows, between its header rule and its bottom border.
    start = next(i for i, line in enumerate(lines) if line.startswith("\u2521"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("\u2514"))
    cells = [line.split("\u2502") for line in lines[start + 1 : end]]
    assert "".join(c[1].strip() for c in cells) == LONG_NODE
    assert "".join(c[2].strip() for c in cells) == LONG_OP


async def _cli(*args: str) -> int:
    return await asyncio.to_thread(main, ["explain", *args])


async def test_cli_prints_the_funnel_and_writes_the_picture(
    suite: Suite,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # captured stdout: not a terminal
    member = members_with_degree(suite.graph, 8)[3]
    before = await suite.recommend(member, k=10)
    await publish(suite, gateway_pb2.MemberEvent.BLOCK, member, before.edges[0].target)
    gateway = f"127.0.0.1:{suite.gateway_port}"
    out = tmp_path / "dag.svg"
    assert await _cli("--member", str(member), "--surface", "pymk", "--gateway", gateway,
                      "--top", "5", "--out", str(out)) == 0  # fmt: skip
    printed = capsys.readouterr().out
    for text in ("request id", "variants", "funnel", "top 5 of 5", "features of the top 5",
                 "embedding_cosine", "dropped", "blocked",
                 f"DAG picture: {out} (a new file)"):  # fmt: skip
        assert text in printed, text
    assert "\u2026" not in printed  # nothing cut, though stdout is not a terminal
    for op in ("candidates.graph", "candidates.precomputed", "features.fetch", "merge.blend"):
        assert f" {op} " in printed, op
    for node in NODES:
        assert node in printed
    root, nodes, edges = parse_svg(out.read_text())
    assert [g.get("data-node") for g in nodes] == NODES
    # fof, ebr, precomputed, popular -> features -> rank; rank, precomputed, popular -> blend
    assert len(edges) == 8
    assert f"pymk for member {member}" in " ".join(t.text or "" for t in root.iter(f"{SVG}text"))

    # --out names the file: it is replaced, whatever it was, and the output says so.
    out.write_text("my notes")
    assert await _cli("--member", str(member), "--gateway", gateway, "--out", str(out)) == 0
    assert f"DAG picture: {out} (replaced the file that was there)" in capsys.readouterr().out
    assert dag_picture.is_picture(out.read_text())

    monkeypatch.chdir(tmp_path)  # the default picture path is in the current directory
    default = tmp_path / f"explain-pymk-{member}.svg"
    assert await _cli("--member", str(member), "--gateway", gateway) == 0
    assert f"DAG picture: {default.name} (a new file)" in capsys.readouterr().out
    assert default.is_file()
    # Run again: it replaces its own earlier picture, and says so.
    assert await _cli("--member", str(member), "--gateway", gateway) == 0
    assert f"DAG picture: {default.name} (replaced the file that was there)" in (
        capsys.readouterr().out
    )
    # Something else at the default path is left alone, unless --force.
    default.write_text("not a picture")
    assert await _cli("--member", str(member), "--gateway", gateway) == 2
    err = capsys.readouterr().err
    assert f"{default.name} exists and is not a picture `edgeflow explain` wrote" in err
    assert "--out FILE" in err and "--force" in err
    assert default.read_text() == "not a picture"
    assert await _cli("--member", str(member), "--gateway", gateway, "--force") == 0
    assert "(replaced the file that was there)" in capsys.readouterr().out
    assert dag_picture.is_picture(default.read_text())


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--surface", "nope"], "INVALID_ARGUMENT: surface: unknown surface 'nope'"),
        (["--member", str(10**12)], "NOT_FOUND"),
        (["--top", "0"], "--top must be at least 1"),
        (["--gateway", "DOWN"], "UNAVAILABLE"),
    ],
)
async def test_cli_errors_are_one_line(
    suite: Suite, capsys: pytest.CaptureFixture[str], args: list[str], text: str
) -> None:
    opts = {"--member": "1", "--gateway": f"127.0.0.1:{suite.gateway_port}"}
    for key, value in zip(args[::2], args[1::2], strict=True):
        opts[key] = value if value != "DOWN" else f"127.0.0.1:{free_port()}"
    assert await _cli(*(part for kv in opts.items() for part in kv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeflow explain: ") and text in err and err.count("\n") == 1
