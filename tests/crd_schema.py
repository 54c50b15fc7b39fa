"""Validate custom resources against a CRD's openAPIV3Schema with jsonschema, as the API server
does: defaults first, then the schema, with unknown fields rejected (kubectl's default strict
field validation), `nullable`, and `x-kubernetes-list-type` (set: unique items, map: unique
keys)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
from jsonschema import Draft4Validator
from jsonschema.exceptions import ValidationError


def to_jsonschema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3.0 structural schema as a Draft 4 JSON schema."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties",):
            out[key] = {k: to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            out[key] = to_jsonschema(value)
        elif key in ("oneOf", "anyOf", "allOf"):
            out[key] = [to_jsonschema(v) for v in value]
        elif key in ("description", "default", "nullable", "format"):
            continue
        else:
            out[key] = copy.deepcopy(value)
    if schema.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if (
        "properties" in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in schema
        and schema.get("type") == "object"
    ):
        out["additionalProperties"] = False
    return out


def _list_type(
    validator: Any, value: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if not isinstance(instance, list):
        return
    if value == "set" and len({repr(i) for i in instance}) != len(instance):
        yield ValidationError("duplicate entries in a list-type=set")
    if value == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[tuple[Any, ...]] = set()
        for item in instance:
            key = tuple(item.get(k) for k in keys) if isinstance(item, Mapping) else (item,)
            if key in seen:
                yield ValidationError(
                    f"duplicate entries for key {dict(zip(keys, key, strict=True))}"
                )
            seen.add(key)


K8sValidator = jsonschema.validators.extend(Draft4Validator, {"x-kubernetes-list-type": _list_type})


def apply_defaults(schema: Mapping[str, Any], obj: Any) -> Any:
    """Fill in `default`s where the parent object exists, as the API server does."""
    if isinstance(obj, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = apply_defaults(sub, obj[name])
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), Mapping):
        for name in obj:
            obj[name] = apply_defaults(schema["additionalProperties"], obj[name])
    elif isinstance(obj, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in obj]
    return obj


class CrdValidator:
    """The served version's schema of one CRD."""

    def __init__(self, crd: Mapping[str, Any], version: str | None = None) -> None:
        versions = crd["spec"]["versions"]
        ver = next(v for v in versions if version in (None, v["name"]))
        self.kind = crd["spec"]["names"]["kind"]
        self.schema = ver["schema"]["openAPIV3Schema"]
        self._validator = K8sValidator(to_jsonschema(self.schema))

    def errors(self, obj: Mapping[str, Any]) -> list[str]:
        """'path: message' for every error, after defaulting (empty: valid)."""
        doc = apply_defaults(self.schema, copy.deepcopy(dict(obj)))
        found = sorted(self._validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                for e in found]  # fmt: skip

    def defaulted(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = apply_defaults(self.schema, copy.deepcopy(dict(obj)))
        return result
