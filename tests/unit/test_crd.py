"""The EdgeWorkflow CRD: generated from the workflow model, structural, and as strict as a
schema can be, with `edgeflow validate` catching the rest."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_schema import CrdValidator
from edgeflow_operator.crd import build_crd, render_crd

from edgeflow.config import REPO_ROOT
from edgeflow.workflow.model import WorkflowSpec
from edgeflow.workflow.ops import OPS
from edgeflow.workflow.validate import WorkflowError, parse_document

CRD_FILE = REPO_ROOT / "charts" / "edgeflow" / "crds" / "edgeworkflows.edgeflow.dev.yaml"
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def validator(crd: dict[str, Any]) -> CrdValidator:
    return CrdValidator(crd)


def _load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return doc


def test_checked_in_crd_is_the_generated_one() -> None:
    assert CRD_FILE.read_text(encoding="utf-8") == render_crd(), (
        "the CRD is stale against the workflow model: run python scripts/gen_crd.py"
    )


def test_crd_names_status_subresource_and_printer_columns(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "edgeworkflows.edgeflow.dev"
    assert spec["group"] == "edgeflow.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "EdgeWorkflow" and spec["names"]["shortNames"] == ["ewf"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Surface": ".spec.surface",
        "Valid": '.status.conditions[?(@.type=="Valid")].status',
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "Age": ".metadata.creationTimestamp",
    }
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "conditions"
    ]
    assert set(conditions["items"]["properties"]) == {
        "type", "status", "reason", "message", "observedGeneration", "lastTransitionTime"
    }  # fmt: skip


def _walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(path, node, inside a junctor) for every schema node."""
    yield path, schema, False
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _walk(schema[key], f"{path}[{key}]")
    for key in ("oneOf", "anyOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            for p, node, _ in _walk(sub, f"{path}.{key}[{i}]"):
                yield p, node, True
    if isinstance(schema.get("not"), dict):
        for p, node, _ in _walk(schema["not"], f"{path}.not"):
            yield p, node, True


def _fields_outside(schema: dict[str, Any], junctor: dict[str, Any], path: str) -> list[str]:
    """Fields a junctor names that the structural part of the schema does not declare."""
    missing = []
    for name, sub in junctor.get("properties", {}).items():
        if name not in schema.get("properties", {}):
            missing.append(f"{path}.{name}")
        else:
            missing += _fields_outside(schema["properties"][name], sub, f"{path}.{name}")
    if "items" in junctor:
        missing += _fields_outside(schema.get("items", {}), junctor["items"], f"{path}[]")
    return missing


def test_schema_is_structural(crd: dict[str, Any]) -> None:
    """The rules the API server enforces on a CRD's schema (it rejects the CRD otherwise)."""
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    problems = []
    for path, node, in_junctor in _walk(root):
        if in_junctor:
            banned = {"type", "description", "default", "nullable", "additionalProperties"}
            banned |= {k for k in node if k.startswith("x-kubernetes-")}
            problems += [f"{path}: {k} inside a junctor" for k in sorted(banned & set(node))]
        elif "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            problems.append(f"{path}: no type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        for key in ("oneOf", "anyOf", "allOf"):
            for i, sub in enumerate(node.get(key, [])):
                if not in_junctor:
                    problems += _fields_outside(node, sub, f"{path}.{key}[{i}]")
        if "$ref" in node or "const" in node:
            problems.append(f"{path}: {'$ref' if '$ref' in node else 'const'} is not allowed")
    assert problems == []


def test_every_field_is_described_for_kubectl_explain(crd: dict[str, Any]) -> None:
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    undescribed = [p for p, node, junctor in _walk(spec) if not junctor
                   and "[" not in p.rsplit(".", 1)[-1] and not node.get("description")]  # fmt: skip
    assert undescribed == []


def test_every_op_and_param_is_in_the_schema(crd: dict[str, Any]) -> None:
    node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["nodes"]["items"]
    assert node["properties"]["op"]["enum"] == sorted(OPS)
    params = set(node["properties"]["params"]["properties"])
    for name, op in OPS.items():
        fields = set(op.params.model_json_schema(by_alias=True).get("properties", {}))
        assert fields <= params, name
    assert len(node["oneOf"]) == len(OPS)


def test_crd_defaults_mean_what_the_model_defaults_mean(validator: CrdValidator) -> None:
    """The API server fills in the CRD's defaults; the result must validate to the same spec."""
    nodes = [{"name": "p", "op": "candidates.popular"},
             {"name": "b", "op": "merge.blend", "inputs": ["p"]}]  # fmt: skip
    minimal = {"apiVersion": "edgeflow.dev/v1alpha1", "kind": "EdgeWorkflow",
               "metadata": {"name": "m"},
               "spec": {"surface": "m", "output": "b", "modes": {"offline": {}},
                        "nodes": nodes}}  # fmt: skip
    defaulted = validator.defaulted(minimal)
    assert defaulted["spec"]["budgetMs"] == 100
    assert defaulted["spec"]["nodes"][0]["timeoutMs"] == 50
    assert defaulted["spec"]["modes"]["offline"]["shards"] == 1
    assert validator.errors(minimal) == []
    assert WorkflowSpec.model_validate(defaulted["spec"]) == WorkflowSpec.model_validate(
        minimal["spec"]
    )


@pytest.mark.parametrize("path", EXAMPLES + WORKFLOWS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_examples_pass_the_crd_schema_and_validate(path: Path, validator: CrdValidator) -> None:
    doc = _load(path)
    assert validator.errors(doc) == []
    parse_document(doc, str(path))


def _base() -> dict[str, Any]:
    return _load(REPO_ROOT / "examples" / "pymk.yaml")


def _node(doc: dict[str, Any], name: str) -> dict[str, Any]:
    node: dict[str, Any] = next(n for n in doc["spec"]["nodes"] if n["name"] == name)
    return node


# (id, how to break the example, where the schema says it is wrong)
BROKEN = [
    ("unknown-op", lambda d: _node(d, "ebr").update(op="candidates.nope"), "nodes.1.op"),
    ("timeout-zero", lambda d: _node(d, "fof").update(timeoutMs=0), "nodes.0.timeoutMs"),
    ("budget-too-big", lambda d: d["spec"].update(budgetMs=600_000), "spec.budgetMs"),
    ("no-output", lambda d: d["spec"].pop("output"), "'output' is a required property"),
    ("no-nodes", lambda d: d["spec"].update(nodes=[]), "spec.nodes"),
    ("bad-node-name", lambda d: _node(d, "fof").update(name="Fof_1"), "nodes.0.name"),
    ("typo-in-spec", lambda d: d["spec"].update(budgetMS=10), "'budgetMS' was unexpected"),
    ("typo-in-node", lambda d: _node(d, "fof").update(timeout=10), "'timeout' was unexpected"),
    ("param-of-other-op", lambda d: _node(d, "ebr")["params"].update(weight="common"),
     "nodes.1"),
    ("unknown-param", lambda d: _node(d, "ebr")["params"].update(size=3), "'size' was unexpected"),
    ("missing-required-param", lambda d: _node(d, "precomputed")["params"].pop("list"),
     "nodes.2"),
    ("bad-param-enum", lambda d: _node(d, "fof")["params"].update(weight="jaccard"),
     "nodes.0.params.weight"),
    ("limit-out-of-range", lambda d: _node(d, "ebr")["params"].update(limit=0),
     "nodes.1.params.limit"),
    ("bad-model-version", lambda d: _node(d, "rank")["params"].update(version="2"), "nodes.5"),
    ("fallback-not-allowed", lambda d: _node(d, "blend").update(fallback="empty"), "nodes.6"),
    ("inputs-on-a-source", lambda d: _node(d, "fof").update(inputs=["ebr"]), "nodes.0"),
    ("fetch-without-inputs", lambda d: _node(d, "features").pop("inputs"), "nodes.4"),
    ("input-listed-twice", lambda d: _node(d, "features").update(inputs=["fof", "fof"]),
     "nodes.4.inputs"),
    ("duplicate-node-name", lambda d: _node(d, "ebr").update(name="fof"), "spec.nodes"),
    ("zero-shards", lambda d: d["spec"]["modes"]["offline"].update(shards=0), "shards"),
    ("no-events", lambda d: d["spec"]["modes"]["nearline"].update(events=[]), "events"),
    ("unknown-event", lambda d: d["spec"]["modes"]["nearline"].update(events=["like"]),
     "events.0"),
    ("no-spec", lambda d: d.pop("spec"), "'spec' is a required property"),
    ("weight-infinite", lambda d: _node(d, "blend")["params"].update(
        weights={"rank": float("inf")}), "nodes.6.params.weights.rank"),
    ("weight-negative", lambda d: _node(d, "blend")["params"].update(weights={"rank": -1.0}),
     "nodes.6.params.weights.rank"),
    ("timeout-infinite", lambda d: _node(d, "fof").update(timeoutMs=float("inf")),
     "nodes.0.timeoutMs"),
    ("share-infinite", lambda d: d["spec"].update(shadows=[{"name": "s", "share": float("inf"),
     "overrides": {}}]), "spec.shadows.0.share"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "breaks", "where"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_manifests_are_rejected_by_the_schema_and_by_validate(
    name: str, breaks: Any, where: str, validator: CrdValidator
) -> None:
    doc = copy.deepcopy(_base())
    breaks(doc)
    errors = validator.errors(doc)
    assert errors, f"{name}: the CRD schema accepted it"
    assert any(where in e for e in errors), errors
    with pytest.raises(WorkflowError):
        parse_document(doc, name)


@pytest.mark.parametrize(
    ("name", "breaks", "problem"),
    [
        ("cycle", lambda d: _node(d, "features")["inputs"].append("rank"), "cycle"),
        ("unknown-input", lambda d: _node(d, "rank").update(inputs=["ghost"]),
         "node 'rank' field inputs: unknown node 'ghost'"),
        ("output-not-ranked", lambda d: d["spec"].update(output="rank"), "spec.output"),
        ("wrong-input-kind", lambda d: _node(d, "rank").update(inputs=["fof"]),
         "node 'rank' field inputs: 'fof' produces candidates"),
    ],
)  # fmt: skip
def test_graph_errors_a_schema_cannot_see_are_left_to_validate(
    name: str, breaks: Any, problem: str, validator: CrdValidator
) -> None:
    doc = copy.deepcopy(_base())
    breaks(doc)
    assert validator.errors(doc) == [], f"{name}: expected the schema to accept it"
    with pytest.raises(WorkflowError) as exc:
        parse_document(doc, name)
    assert any(problem in p for p in exc.value.problems), exc.value.problems


def test_generator_script_checks_drift(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "gen_crd.py"), "--check"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert build_crd()["spec"]["names"]["plural"] == "edgeworkflows"


def test_nan_cannot_reach_the_api_server_and_validate_refuses_it(validator: CrdValidator) -> None:
    """A schema cannot tell NaN from a number, but JSON has no NaN: kubectl cannot send it
    (its YAML-to-JSON conversion fails, as json.dumps does here). `edgeflow validate` (and so
    the gateway, reading the same YAML) refuses it by name."""
    import json

    doc = copy.deepcopy(_base())
    _node(doc, "blend")["params"]["weights"] = {"rank": float("nan")}
    with pytest.raises(ValueError, match="not JSON compliant"):
        json.dumps(doc, allow_nan=False)
    with pytest.raises(WorkflowError) as exc:
        parse_document(doc, "nan")
    assert exc.value.problems == [
        "node 'blend' field params.weights.rank: Input should be a finite number"
    ]
