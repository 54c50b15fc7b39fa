"""`edgeflow recommend`'s table: the legend, the model column, and why an empty answer is
empty, from responses built by hand (the served ones are in test_nearline.py and test_cli.py)."""

from __future__ import annotations

from rich.console import Console

from edgeflow.cli.recommend import NO_MODEL, empty_reasons, model_cell, mutual_cell, render
from edgeflow.v1 import gateway_pb2, tensor_pb2


def _text(resp: gateway_pb2.RecommendResponse, member: int = 5, funnel: bool = False) -> str:
    console = Console(record=True, width=200, color_system=None)
    render(resp, member, console, funnel=funnel)
    return console.export_text()


def _trace(node: str, op: str, items_out: int, **kw: object) -> gateway_pb2.NodeTrace:
    return gateway_pb2.NodeTrace(node=node, op=op, status="ok", items_out=items_out, **kw)


def test_model_cell_tells_an_absent_score_from_a_zero() -> None:
    assert model_cell(tensor_pb2.Edge(target=1, score=0.5, model_score=0.0)) == "0.0000"
    assert model_cell(tensor_pb2.Edge(target=1, score=0.5, model_score=0.25)) == "0.2500"
    assert model_cell(tensor_pb2.Edge(target=1, score=0.5)) == NO_MODEL


def test_table_has_a_legend_and_no_made_up_model_scores() -> None:
    resp = gateway_pb2.RecommendResponse(surface="follows")
    resp.edges.add(target=7, score=1.0).provenance.add(
        source="precomputed", score=1.0, mode="offline", age_seconds=30
    )
    resp.edges.add(target=8, score=0.9, model_score=0.62)
    out = _text(resp)
    rows = [line for line in out.splitlines() if "│" in line and ("7 │" in line or "8 │" in line)]
    assert len(rows) == 2
    assert f"1.0000 │      {NO_MODEL} │" in rows[0]
    assert "│ precomputed: 1, offline, 30s old" in rows[0]
    assert "0.6200" in rows[1] and "0.0000" not in out
    legend = [line.split()[0] for line in out.splitlines()[-8:] if line.strip()]
    assert {"score", "model", "mutual", "provenance"} <= set(legend)
    assert "what the rows are ranked by" in out
    assert f"{NO_MODEL} when no model scored it in this request" in out


def test_the_mutual_column_shows_the_count_and_the_named_connections() -> None:
    proof = tensor_pb2.SocialProof
    assert mutual_cell(tensor_pb2.Edge(target=1, social_proof=proof(mutual_count=12,
                                                                    mutual_ids=[4, 9, 31]))) == (
        "12: 4, 9, 31"
    )  # fmt: skip
    assert mutual_cell(tensor_pb2.Edge(target=1, social_proof=proof())) == "0"
    assert mutual_cell(tensor_pb2.Edge(target=1)) == NO_MODEL  # no graph: nothing to say
    resp = gateway_pb2.RecommendResponse(surface="pymk")
    resp.edges.add(target=7, score=1.0, social_proof=proof(mutual_count=2, mutual_ids=[3, 8]))
    out = _text(resp)
    row = next(line for line in out.splitlines() if "│" in line and " 7 │" in line)
    assert "│ 2: 3, 8 " in row
    assert "the connections the member and the edge's member share" in out


def test_an_empty_answer_without_a_funnel_says_how_to_see_why() -> None:
    resp = gateway_pb2.RecommendResponse(surface="pymk")
    assert empty_reasons(resp) == [
        "the response carries no funnel to say why: ask again with --debug"
    ]
    resp.degraded.append("fof: timed out after 40 ms (fallback: empty)")
    assert empty_reasons(resp) == ["the degraded nodes above served nothing"]


def test_an_empty_answer_names_fallbacks_empty_sources_and_filters() -> None:
    resp = gateway_pb2.RecommendResponse(surface="pymk")
    resp.funnel.nodes.extend([
        _trace("fof", "candidates.graph", 3),
        _trace("ebr", "candidates.ebr", 0),
        gateway_pb2.NodeTrace(node="rank", op="scoring.onnx", status="fallback",
                              fallback="passthrough", error="UNAVAILABLE: scoring is down"),
        _trace("blend", "merge.blend", 0, inputs=["rank"]),
    ])  # fmt: skip
    resp.funnel.dropped["connected"] = 2
    resp.funnel.dropped["blocked"] = 1
    resp.funnel.dropped["duplicate"] = 4
    assert empty_reasons(resp) == [
        "node 'ebr' (candidates.ebr) found no candidates",
        "node 'rank' (scoring.onnx) failed, so its fallback 'passthrough' applied: "
        "UNAVAILABLE: scoring is down",
        "the candidate sources found 3, and the filters removed them all: connected=2, blocked=1",
    ]
    out = _text(resp)
    assert "no recommendations for member 5 on pymk:" in out
    assert "- node 'ebr' (candidates.ebr) found no candidates" in out
    assert "what the rows are ranked by" not in out  # no legend under an empty table
    assert "funnel" not in out  # the funnel itself only with --debug
    assert "funnel" in _text(resp, funnel=True)


def test_an_empty_list_note_comes_with_the_command_that_writes_the_list() -> None:
    resp = gateway_pb2.RecommendResponse(surface="follows", workflow="follows")
    note = "list 'follows' has never been written (no offline run has published it)"
    resp.funnel.nodes.extend([
        _trace("precomputed", "candidates.precomputed", 0, note=note),
        _trace("blend", "merge.blend", 0, inputs=["precomputed"]),
    ])  # fmt: skip
    assert empty_reasons(resp) == [
        f"node 'precomputed' (candidates.precomputed): {note}",
        "list 'follows' is computed by the offline job: run "
        "`edgeflow offline run --workflow follows`",
    ]
    # A surface this machine's workflow files do not know: the note alone.
    resp.surface = "elsewhere"
    assert empty_reasons(resp) == [f"node 'precomputed' (candidates.precomputed): {note}"]
