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


SAFETY = "self, connected, blocked apply to every served list and cannot be switched off"


def test_a_blend_without_the_safety_filters_is_rejected(doc: dict[str, Any]) -> None:
    node(doc, "blend")["params"]["filters"] = ["self", "dismissed"]
    assert problems(doc) == [
        "node 'blend' field params.filters: workflow 'pymk' removes the safety filters "
        f"['connected', 'blocked']; {SAFETY}"
    ]
    node(doc, "blend")["params"]["filters"] = []
    [p] = problems(doc)
    assert "removes the safety filters ['self', 'connected', 'blocked']" in p
    del node(doc, "blend")["params"]["filters"]  # the default: every filter
    assert parse_document(doc, "wf.yaml").node("blend").params.filters == [  # type: ignore[union-attr]
        "self", "connected", "blocked", "dismissed",
    ]  # fmt: skip


def test_an_experiment_or_shadow_cannot_remove_the_safety_filters(doc: dict[str, Any]) -> None:
    blend = copy.deepcopy(node(doc, "blend"))
    loose = {**blend, "name": "loose", "params": {**blend["params"], "filters": ["dismissed"]}}
    doc["spec"]["experiments"] = [{
        "name": "unsafe", "control": "control",
        "variants": [
            {"name": "control", "weight": 50},
            {"name": "params", "weight": 25,
             "overrides": {"params": {"blend": {"filters": ["self", "dismissed"]}}}},
            {"name": "node", "weight": 25,
             "overrides": {"nodes": [loose], "output": "loose"}},
        ],
    }]  # fmt: skip
    doc["spec"]["shadows"] = [{"name": "bare", "share": 0.1,
                               "overrides": {"params": {"blend": {"filters": []}}}}]  # fmt: skip
    found = problems(doc)
    assert found == [
        "experiment 'unsafe' variant 'params': node 'blend' field params.filters: workflow "
        f"'pymk' removes the safety filters ['connected', 'blocked']; {SAFETY}",
        "experiment 'unsafe' variant 'node': node 'loose' field params.filters: workflow "
        f"'pymk' removes the safety filters ['self', 'connected', 'blocked']; {SAFETY}",
        "shadow 'bare': node 'blend' field params.filters: workflow 'pymk' removes the "
        f"safety filters ['self', 'connected', 'blocked']; {SAFETY}",
    ]


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


# ---- untrusted documents: depth, size, non-finite numbers, long names ----------------------
NESTED = {
    "20000-flow-sequences": "spec: " + "[" * 20_000 + "]" * 20_000 + "\n",
    "5000-flow-mappings": "spec: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n",
    "block-mappings": "".join(" " * i + f"k{i}:\n" for i in range(200)),
    "alias-bomb": "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
        for p, c in zip("abcdefg", "bcdefgh", strict=True)
    ),
}


@pytest.mark.parametrize("text", NESTED.values(), ids=NESTED.keys())
def test_deeply_nested_or_exploding_yaml_is_refused_naming_the_file(
    tmp_path: Path, text: str
) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(WorkflowError) as err:
        load_workflow(path)
    [problem] = err.value.problems
    assert str(err.value).startswith(f"{path}: invalid workflow")
    assert "not valid YAML" in problem
    assert any(w in problem for w in ("deeper than", "nesting depth", "YAML nodes")), problem
    assert len(str(err.value)) < 500


def test_an_oversized_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    from edgeflow.workflow.limits import MAX_FILE_BYTES

    path = tmp_path / "huge.yaml"
    path.write_text("spec: {description: '" + "x" * MAX_FILE_BYTES + "'}\n")
    with pytest.raises(WorkflowError) as err:
        load_workflow(path)
    assert err.value.problems == [f"file: larger than {MAX_FILE_BYTES} bytes (the limit)"]


def test_a_deep_document_from_the_api_server_is_refused() -> None:
    """The operator validates what the API server hands it (JSON, no YAML parser)."""
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(5_000):
        inner["a"] = {}
        inner = inner["a"]
    doc = {"apiVersion": "edgeflow.dev/v1alpha1", "kind": "EdgeWorkflow",
           "metadata": {"name": "x"}, "spec": {"surface": "x", "nodes": [deep]}}  # fmt: skip
    with pytest.raises(WorkflowError) as err:
        parse_document(doc, "EdgeWorkflow ns/x")
    assert err.value.problems == ["document: nested deeper than 32 levels (the limit)"]


def test_a_bad_file_costs_only_itself_in_a_directory(tmp_path: Path) -> None:
    (tmp_path / "pymk.yaml").write_text(PYMK.read_text())
    (tmp_path / "deep.yaml").write_text(NESTED["20000-flow-sequences"])
    (tmp_path / "bigint.yaml").write_text("spec: {budgetMs: " + "9" * 10_000 + "}\n")
    workflows, errors = load_directory(tmp_path)
    assert list(workflows) == ["pymk"]
    assert sorted(e.source for e in errors) == [
        str(tmp_path / "bigint.yaml"), str(tmp_path / "deep.yaml")
    ]  # fmt: skip


def test_cli_validate_refuses_a_deep_file_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "deep.yaml"
    bad.write_text(NESTED["5000-flow-mappings"])
    cmd = [sys.executable, "-m", "edgeflow.cli.main", "validate", str(bad), str(PYMK)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"{bad}: invalid workflow") and "Traceback" not in proc.stderr
    assert "valid workflow 'pymk'" in proc.stdout


def _ab() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO_ROOT / "examples" / "pymk-ab.yaml").read_text())
    return loaded


NON_FINITE = [
    ("blend-weight", lambda d: node(d, "blend")["params"].setdefault("weights", {}), "rank",
     "node 'blend' field params.weights.rank"),
    ("source-limit", lambda d: node(d, "fof")["params"], "limit", "node 'fof' field params.limit"),
    ("timeout", lambda d: node(d, "rank"), "timeoutMs", "node 'rank' field timeoutMs"),
    ("budget", lambda d: d["spec"], "budgetMs", "spec field budgetMs"),
    ("variant-weight", lambda d: d["spec"]["experiments"][0]["variants"][0], "weight",
     "experiment 'ranker-v2' field variants.0.weight"),
    ("targeting-share", lambda d: d["spec"]["experiments"][1]["targeting"], "share",
     "experiment 'popular-source' field targeting.share"),
    ("shadow-share", lambda d: d["spec"]["shadows"][0], "share", "shadow 'ebr-wide' field share"),
]  # fmt: skip


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize(
    ("where", "field", "problem"), [c[1:] for c in NON_FINITE], ids=[c[0] for c in NON_FINITE]
)
def test_non_finite_numbers_are_refused_wherever_a_number_is_taken(
    tmp_path: Path, where: Any, field: str, problem: str, value: str
) -> None:
    doc = _ab()
    where(doc)[field] = "NUMBER"
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(doc).replace("NUMBER", value))  # as a user would write it
    with pytest.raises(WorkflowError) as err:
        load_workflow(path)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_blend_weights_are_bounded(doc: dict[str, Any]) -> None:
    node(doc, "blend")["params"]["weights"]["rank"] = -1.0
    node(doc, "blend")["params"]["weights"]["precomputed"] = 1e39  # infinite as float32
    found = problems(doc)
    assert (
        "node 'blend' field params.weights.rank: Input should be greater than or equal to 0"
        in found
    )
    assert any(
        p.startswith("node 'blend' field params.weights.precomputed: Input should be less")
        for p in found
    )


def test_messages_quote_only_a_short_prefix_of_what_was_written(doc: dict[str, Any]) -> None:
    huge = "x" * 1_000_000
    node(doc, "ebr")["op"] = huge
    node(doc, "features")["inputs"] = ["fof", huge]
    node(doc, "blend")["params"]["weights"][huge] = 1.0
    node(doc, "fof")["params"][huge] = 1
    doc["spec"]["output"] = huge
    doc["spec"]["nodes"].append({"name": huge, "op": "candidates.popular"})
    doc["kind"] = huge
    with pytest.raises(WorkflowError) as err:
        parse_document(doc, "wf.yaml")
    assert len(str(err.value)) < 3000
    assert "(1000000 characters)" in str(err.value)


def test_a_document_with_very_many_problems_lists_the_first_ones(doc: dict[str, Any]) -> None:
    doc["spec"]["nodes"] += [{"name": f"n{i}", "op": "nope"} for i in range(50)]
    found = problems(doc)
    assert len(found) == 21 and found[-1].startswith("... and ")


def test_rollout_aliases_as_model_versions(doc: dict[str, Any]) -> None:
    """`stable` always names a version of a published model; `canary` only while one is set
    (the registry lists it among the versions then)."""
    node(doc, "rank")["params"]["version"] = "stable"
    assert check_models(parse_document(doc, "wf.yaml"), {"pymk-ranker": ["v1"]}) == []
    node(doc, "rank")["params"]["version"] = "canary"
    canary = parse_document(doc, "wf.yaml")
    assert check_models(canary, {"pymk-ranker": ["v1", "v2", "canary"]}) == []
    assert check_models(canary, {"pymk-ranker": ["v1"]}) == [
        "node 'rank' field params.version: model 'pymk-ranker' has no version 'canary' "
        "(it has ['v1'])"
    ]
    node(doc, "rank")["params"]["version"] = "beta"
    with pytest.raises(WorkflowError, match=r"params.version"):
        parse_document(doc, "wf.yaml")
