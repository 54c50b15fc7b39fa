"""The EdgeWorkflow CRD, generated from the pydantic model that `edgeflow validate` uses.

The workflow spec's JSON schema (pydantic) is rewritten into a Kubernetes structural schema:
references inlined, `X | None` as `nullable`, titles dropped, `dict[str, Any]` as preserved
unknown fields. A node's `params` depend on its `op`, so the schema lists the union of every
op's params as properties and adds one `oneOf` branch per op (from the ops registry) with that
op's required params, the params it must not have, its input count and its fallbacks. Anything
a schema cannot say (cycles, references between nodes, model versions) is left to the
operator, which runs the same validation as `edgeflow validate`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml

from edgeflow.workflow.model import WorkflowSpec
from edgeflow.workflow.ops import OPS
from edgeflow.workflow.validate import DEFAULT_FALLBACK
from edgeflow_operator import GROUP, KIND, PLURAL, VERSION

Schema = dict[str, Any]

# Keys that describe the shape of a field; everything else validates a value.
_STRUCTURAL = frozenset(
    {"type", "description", "nullable", "properties", "items", "additionalProperties",
     "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
     "x-kubernetes-list-map-keys", "format"}
)  # fmt: skip
_VALUE_KEYS = frozenset(
    {"enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
     "maxLength", "pattern", "minItems", "maxItems", "uniqueItems", "minProperties",
     "maxProperties", "multipleOf", "required"}
)  # fmt: skip
_COPIED = ("minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
           "uniqueItems", "minProperties", "maxProperties", "multipleOf")  # fmt: skip
# Formats the API server knows; others are dropped rather than rejected by it.
_K8S_FORMATS = frozenset(
    {"bsonobjectid", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "mac", "uuid",
     "uuid3", "uuid4", "uuid5", "isbn", "isbn10", "isbn13", "creditcard", "ssn", "hexcolor",
     "rgbcolor", "byte", "password", "date", "duration", "datetime", "date-time"}
)  # fmt: skip

STATUS_SCHEMA: Schema = {
    "type": "object",
    "description": "Observed state, written by the operator.",
    "properties": {
        "observedGeneration": {
            "type": "integer",
            "format": "int64",
            "description": "The metadata.generation the operator last reconciled.",
        },
        "surface": {"type": "string", "description": "The surface the workflow serves."},
        "configHash": {
            "type": "string",
            "description": "Hash of the compiled workflow; in every child's pod template, so "
            "a change rolls them.",
        },
        "children": {
            "type": "array",
            "description": "The objects the operator created for this workflow.",
            "items": {
                "type": "object",
                "properties": {
                    "kind": {"type": "string", "description": "Kind of the child."},
                    "name": {"type": "string", "description": "Name of the child."},
                },
                "required": ["kind", "name"],
            },
        },
        "conditions": {
            "type": "array",
            "description": "Valid: the graph passed validation. Deployed: its children exist "
            "and match the spec. Ready: every child Deployment has its desired replicas "
            "available.",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
            "items": {
                "type": "object",
                "required": ["type", "status", "lastTransitionTime"],
                "properties": {
                    "type": {"type": "string", "description": "Valid, Deployed or Ready."},
                    "status": {
                        "type": "string",
                        "enum": ["True", "False", "Unknown"],
                        "description": "Whether the condition holds.",
                    },
                    "reason": {
                        "type": "string",
                        "description": "One CamelCase word for why the status is what it is.",
                    },
                    "message": {"type": "string", "description": "Details for a person."},
                    "observedGeneration": {
                        "type": "integer",
                        "format": "int64",
                        "description": "The metadata.generation this condition was set for.",
                    },
                    "lastTransitionTime": {
                        "type": "string",
                        "format": "date-time",
                        "description": "When the status last changed.",
                    },
                },
            },
        },
    },
}

PRINTER_COLUMNS = [
    {"name": "Surface", "type": "string", "jsonPath": ".spec.surface"},
    *(
        {"name": c, "type": "string", "jsonPath": f'.status.conditions[?(@.type=="{c}")].status'}
        for c in ("Valid", "Ready")
    ),
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Schema:
    """Inline a $ref, keeping the referencing site's own keys (description, default)."""
    out = dict(schema)
    ref = out.pop("$ref", None)
    if ref is None:
        return out
    target = dict(defs[ref.rsplit("/", 1)[-1]])
    target.update(out)
    return target


def structural(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Schema:
    """One pydantic JSON-schema node as a Kubernetes structural-schema node."""
    s = _resolve(schema, defs)
    out: Schema = {}
    variants = s.pop("anyOf", None)
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) == 1:
            out.update(structural(non_null[0], defs))
            out["nullable"] = True
        elif all(_resolve(v, defs).get("type") in ("integer", "number") for v in non_null):
            out["type"] = "number"
        else:
            # A union the API server cannot type: keep the value, the operator validates it.
            out["x-kubernetes-preserve-unknown-fields"] = True
        if len(non_null) < len(variants):
            out["nullable"] = True
    kind = s.get("type")
    if kind is not None:
        out["type"] = kind
    if "description" in s:
        out["description"] = " ".join(str(s["description"]).split())
    if "const" in s:
        out["enum"] = [s["const"]]
    if "enum" in s:
        out["enum"] = list(s["enum"])
    for key in _COPIED:
        if key in s:
            out[key] = s[key]
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in s:  # JSON Schema 2020 numbers -> OpenAPI 3.0 booleans
            out[bound] = s[key]
            out[key] = True
    if s.get("format") in _K8S_FORMATS:
        out["format"] = s["format"]
    if kind == "object":
        props = s.get("properties")
        extra = s.get("additionalProperties")
        if props:
            out["properties"] = {k: structural(v, defs) for k, v in props.items()}
            if s.get("required"):
                out["required"] = list(s["required"])
        elif isinstance(extra, Mapping):
            out["additionalProperties"] = structural(extra, defs)
        elif extra is not False:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array" and "items" in s:
        out["items"] = structural(s["items"], defs)
    elif kind is None and variants is None and "enum" not in s and "const" not in s:
        out["x-kubernetes-preserve-unknown-fields"] = True  # Any
    if "default" in s and s["default"] is not None:
        out["default"] = copy.deepcopy(s["default"])
    return out


def _split(schema: Schema) -> tuple[Schema, Schema]:
    """A field schema as (shape with description, value validations)."""
    shape = {k: v for k, v in schema.items() if k in _STRUCTURAL}
    values = {k: v for k, v in schema.items() if k in _VALUE_KEYS}
    if "items" in schema:
        shape["items"], item_values = _split(schema["items"])
        if item_values:
            values["items"] = item_values
    if "properties" in schema:
        shape["properties"] = {}
        nested: Schema = {}
        for name, sub in schema["properties"].items():
            shape["properties"][name], sub_values = _split(sub)
            if sub_values:
                nested[name] = sub_values
        if nested:
            values["properties"] = nested
    if isinstance(schema.get("additionalProperties"), dict):
        shape["additionalProperties"], extra_values = _split(schema["additionalProperties"])
        if extra_values:  # value checks on map values stay with the shape: no junctor needs them
            shape["additionalProperties"].update(extra_values)
    return shape, values


def _merge(shape: Schema, values: Schema) -> None:
    """Put value validations back into a shape (the inverse of _split)."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(shape.get(key), dict):
            if key == "properties":
                for name, sub in value.items():
                    _merge(shape[key][name], sub)
            else:
                _merge(shape[key], value)
        else:
            shape[key] = value


def _params_schema() -> tuple[Schema, dict[str, Schema]]:
    """The union of every op's params, plus each op's own constraints on them."""
    per_op: dict[str, Schema] = {}
    for name, op in OPS.items():
        js = op.params.model_json_schema(by_alias=True)
        per_op[name] = structural(js, js.get("$defs", {}))
    fields: dict[str, list[tuple[str, Schema]]] = {}
    for name, schema in per_op.items():
        for field, sub in schema.get("properties", {}).items():
            fields.setdefault(field, []).append((name, sub))
    union: Schema = {}
    op_values: dict[str, Schema] = {name: {} for name in OPS}
    for field, uses in fields.items():
        split = [(op, *_split(sub)) for op, sub in uses]
        texts = {op: str(shape.pop("description", "")) for op, shape, _ in split}
        shape = split[0][1]
        if any(other != shape for _, other, _ in split[1:]):
            # Ops disagree on the field's type: the API server keeps it, the operator checks it.
            shape = {"x-kubernetes-preserve-unknown-fields": True}
            split = [(op, {}, {}) for op, _, _ in split]
        if len(set(texts.values())) == 1:
            text = f"{next(iter(texts.values()))} For {', '.join(texts)}."
        else:
            text = " ".join(f"{op}: {t}" for op, t in texts.items())
        defaults = {op: sub["default"] for op, sub in uses if "default" in sub}
        if defaults:
            text += " Default: " + "; ".join(f"{d!r} ({op})" for op, d in defaults.items()) + "."
        shape["description"] = text.strip()
        values = [v for _, _, v in split]
        if all(v == values[0] for v in values[1:]):
            _merge(shape, values[0])
        else:
            for op_name, _, v in split:
                if v:
                    op_values[op_name][field] = v
        union[field] = shape
    branches: dict[str, Schema] = {}
    for name, schema in per_op.items():
        own = set(schema.get("properties", {}))
        branch: Schema = {}
        if op_values[name]:
            branch["properties"] = op_values[name]
        if schema.get("required"):
            branch["required"] = list(schema["required"])
        foreign = sorted(set(fields) - own)
        if foreign:
            branch["not"] = {"anyOf": [{"required": [f]} for f in foreign]}
        branches[name] = branch
    return union, branches


def _node_schema(node: Schema) -> Schema:
    """Specialise a node: op as an enum, params typed per op, inputs and fallbacks per op."""
    props = node["properties"]
    props["op"]["enum"] = sorted(OPS)
    union, branches = _params_schema()
    params = dict(props["params"])
    params.pop("x-kubernetes-preserve-unknown-fields", None)
    params["properties"] = union
    props["params"] = params
    props["inputs"]["x-kubernetes-list-type"] = "set"
    one_of = []
    for name, op in OPS.items():
        node_props: Schema = {"op": {"enum": [name]}}
        required: list[str] = []
        if branches[name]:
            node_props["params"] = branches[name]
            if branches[name].get("required"):
                required.append("params")
        node_props["inputs"] = {"minItems": op.min_inputs, "maxItems": op.max_inputs}
        if op.min_inputs:
            required.append("inputs")
        node_props["fallback"] = {"enum": sorted(op.fallbacks)}
        if DEFAULT_FALLBACK.get(name.split(".", 1)[0], "fail") not in op.fallbacks:
            required.append("fallback")  # the op's default fallback is not one it allows
        branch: Schema = {"properties": node_props}
        if required:
            branch["required"] = required
        one_of.append(branch)
    node["oneOf"] = one_of
    return node


def spec_schema() -> Schema:
    js = WorkflowSpec.model_json_schema(by_alias=True)
    spec = structural(js, js.get("$defs", {}))
    nodes = spec["properties"]["nodes"]
    nodes["x-kubernetes-list-type"] = "map"
    nodes["x-kubernetes-list-map-keys"] = ["name"]
    nodes["items"] = _node_schema(nodes["items"])
    return spec


def build_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition, as a manifest."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "edgeflow"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ewf"],
                "categories": ["edgeflow"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A surface's recommendation workflow: a graph of "
                            "candidate, feature, scoring and merge nodes, and the modes it runs "
                            "in. The operator validates it and runs its gateway, offline job "
                            "and nearline worker.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": STATUS_SCHEMA,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as the YAML file checked in under charts/edgeflow/crds/."""
    header = (
        "# Generated by scripts/gen_crd.py from the workflow model in services/edgeflow/workflow;\n"
        "# regenerate it instead of editing (tests/unit/test_crd.py checks that they match).\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
