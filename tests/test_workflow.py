"""Workflow validation: every rejection names the node and the field."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeflow.config import REPO_ROOT
from edgeflow.workflow.ops import OPS, Kind
from edgeflow.workflow.validate import (
    WorkflowError,
    check_models,
    load_directory,
    load_workflow,
    parse_document,
)

PYMK = REPO_ROOT / "workflows" / "pymk.yaml"


@pytest.fixture
def doc() -> dict[str, Any]:
    return yaml.safe_load(PYMK.read_text())


def node(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in doc["spec"]["nodes"] if n["name"] == name)


def problems(doc: Any) -> list[str]:
    with pytest.raises(WorkflowError) as err:
        parse_document(doc, "wf.yaml")
    return err.value.problems


def test_checked_in_workflows_are_valid() -> None:
    workflows, errors = load_directory(REPO_ROOT / "workflows")
    assert errors == []
    wf = workflows["pymk"]
    names = [n.node.name for n in wf.nodes]
    assert names.index("features") > max(names.index(s) for s in ("fof", "ebr", "precomputed"))
    assert wf.node("blend").kind is Kind.RANKED
    assert wf.node("rank").fallback == "passthrough"


def test_bare_spec_is_accepted(doc: dict[str, Any]) -> None:
    wf = parse_document(doc["spec"], "spec.yaml")
    assert wf.surface == "pymk"


def test_unknown_op_names_node_and_field(doc: dict[str, Any]) -> None:
    node(doc, "ebr")["op"] = "candidates.telepathy"
    [p] = problems(doc)
    assert p.startswith("node 'ebr' field op: unknown op 'candidates.telepathy'")


def test_missing_input_names_node_and_field(doc: dict[str, Any]) -> None:
    node(doc, "features")["inputs"] = ["fof", "ghost"]
    assert problems(doc) == ["node 'features' field inputs: unknown node 'ghost'"]


def test_cycle_is_rejected(doc: dict[str, Any]) -> None:
    node(doc, "features")["inputs"] = ["fof", "blend"]
    [p] = problems(doc)
    assert "cycle" in p and "'features'" in p and "'blend'" in p


def test_bad_params_are_rejected(doc: dict[str, Any]) -> None:
    node(doc, "fof")["params"] = {"limit": 0, "weight": "cosmic", "colour": "red"}
    found = problems(doc)
    assert "node 'fof' field params.limit: Input should be greater than or equal to 1" in found
    assert any(p.startswith("node 'fof' field params.weight:") for p in found)
    assert "node 'fof' field params.colour: unknown field" in found


def test_bad_model_reference_is_rejected(doc: dict[str, Any]) -> None:
    node(doc, "rank")["params"] = {"model": "Bad Name!", "version": "seven"}
    found = problems(doc)
    assert any(p.startswith("node 'rank' field params.model:") for p in found)
    assert any(p.startswith("node 'rank' field params.version:") for p in found)


def test_missing_required_param(doc: dict[str, Any]) -> None:
    node(doc, "rank")["params"] = {}
    assert problems(doc) == ["node 'rank' field params.model: required field is missing"]


def test_wrong_input_kind(doc: dict[str, Any]) -> None:
    node(doc, "rank")["inputs"] = ["fof"]
    [p] = problems(doc)
    assert p.startswith("node 'rank' field inputs: 'fof' produces candidates, but scoring.onnx")


def test_output_must_be_ranked(doc: dict[str, Any]) -> None:
    doc["spec"]["output"] = "rank"
    assert problems(doc) == [
        "spec.output: node 'rank' produces scored; the output must be a merge.blend node (ranked)"
    ]


def test_fallback_that_would_skip_visibility_filters_is_rejected(doc: dict[str, Any]) -> None:
    node(doc, "blend")["fallback"] = "passthrough"
    [p] = problems(doc)
    assert p.startswith("node 'blend' field fallback: 'passthrough' is not allowed")


def test_field_errors_and_references_do_not_cascade(doc: dict[str, Any]) -> None:
    node(doc, "rank")["timeoutMs"] = -1
    node(doc, "rank")["retries"] = 3
    found = problems(doc)
    assert sorted(found) == [
        "node 'rank' field retries: unknown field",
        "node 'rank' field timeoutMs: Input should be greater than or equal to 1",
    ]


def test_duplicate_names_and_self_input(doc: dict[str, Any]) -> None:
    dup = copy.deepcopy(node(doc, "ebr"))
    doc["spec"]["nodes"].append(dup)
    node(doc, "fof")["inputs"] = ["fof"]
    found = problems(doc)
    assert "node 'ebr': duplicate node name" in found
    assert any(p.startswith("node 'fof' field inputs:") for p in found)


def test_blend_params_must_reference_real_nodes(doc: dict[str, Any]) -> None:
    node(doc, "blend")["params"]["weights"] = {"nowhere": 1.0}
    node(doc, "blend")["params"]["quotas"] = {"rank": 3}
    found = problems(doc)
    assert "node 'blend' field params.weights.nowhere: not an input of this node" in found
    assert "node 'blend' field params.quotas.rank: not a candidates node" in found


def test_envelope_errors(doc: dict[str, Any]) -> None:
    doc["apiVersion"] = "edgeflow.dev/v9"
    doc["metadata"]["name"] = "Not_A_Name"
    found = problems(doc)
    assert found[0] == "apiVersion: expected 'edgeflow.dev/v1alpha1', got 'edgeflow.dev/v9'"


def test_unknown_spec_field_and_budget(doc: dict[str, Any]) -> None:
    doc["spec"]["budgetMs"] = 0
    doc["spec"]["surfce"] = "typo"
    found = problems(doc)
    assert "spec field surfce: unknown field" in found
    assert "spec field budgetMs: Input should be greater than or equal to 1" in found


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec:\n  surface: pymk\n  nodes: [\n")
    with pytest.raises(WorkflowError) as err:
        load_workflow(bad)
    assert "line" in err.value.problems[0] and "not valid YAML" in err.value.problems[0]


def test_every_op_has_params_model_and_fallbacks() -> None:
    for name, spec in OPS.items():
        assert spec.name == name
        assert spec.fallbacks, name
        spec.params.model_json_schema()


def test_cli_validate_reports_and_exits_nonzero(tmp_path: Path, doc: dict[str, Any]) -> None:
    node(doc, "ebr")["op"] = "candidates.nope"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-m", "edgeflow.cli.main", "validate", str(PYMK), str(bad)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "valid workflow 'pymk'" in proc.stdout
    assert "node 'ebr' field op: unknown op 'candidates.nope'" in proc.stderr


def test_model_references_checked_against_a_registry(doc: dict[str, Any]) -> None:
    wf = parse_document(doc, "wf.yaml")
    assert check_models(wf, {"pymk-ranker": ["v1", "v2"]}) == []
    assert check_models(wf, {"other": ["v1"]}) == [
        "node 'rank' field params.model: no model 'pymk-ranker' in the registry (it has ['other'])"
    ]
    node(doc, "rank")["params"]["version"] = "v7"
    pinned = parse_document(doc, "wf.yaml")
    assert check_models(pinned, {"pymk-ranker": ["v1"]}) == [
        "node 'rank' field params.version: model 'pymk-ranker' has no version 'v7' (it has ['v1'])"
    ]


def test_cli_validate_with_model_dir(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "edgeflow.cli.main", "validate", str(PYMK),
           "--model-dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "no model 'pymk-ranker' in the registry" in proc.stderr
