"""Experiment variants and shadows as whole graphs: overrides applied to the workflow's own
graph and validated like any workflow, once, when the workflow loads.

A member in several experiments gets every experiment's overrides, so experiments of one
surface must override disjoint nodes; every combination is compiled up front.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from edgeflow.workflow.model import Experiment, Overrides, Variant, WorkflowSpec

# Compiled combinations of variants per surface; more means too many experiments at once.
MAX_COMBINATIONS = 256

Assignments = tuple[tuple[str, str], ...]
SpecDoc = dict[str, Any]
Checker = Callable[[SpecDoc, str], Any]  # (spec document, where) -> Workflow, or raises


def base_document(spec: WorkflowSpec) -> SpecDoc:
    """The spec as a document without its experiments and shadows: what overrides apply to."""
    return spec.model_dump(by_alias=True, exclude={"experiments", "shadows"}, exclude_none=True)


def reference_problems(where: str, overrides: Overrides, doc: SpecDoc) -> list[str]:
    """Overrides must name nodes of the graph (or, for params, nodes they add)."""
    nodes = {n["name"]: n for n in doc["nodes"]}
    added = {n.name for n in overrides.nodes}
    problems = []
    for name in overrides.models:
        node = nodes.get(name)
        if node is None:
            problems.append(f"{where} field overrides.models.{name}: no node {name!r} in the graph")
        elif not node["op"].startswith("scoring."):
            problems.append(
                f"{where} field overrides.models.{name}: node {name!r} is {node['op']}, "
                "not a scoring node"
            )
    for name in overrides.params:
        if name not in nodes and name not in added:
            problems.append(f"{where} field overrides.params.{name}: no node {name!r} in the graph")
    names = set(nodes) | added
    if overrides.output is not None and overrides.output not in names:
        problems.append(f"{where} field overrides.output: no node {overrides.output!r}")
    return problems


def apply(doc: SpecDoc, overrides: Overrides) -> SpecDoc:
    """A new spec document with the overrides applied (the input is left unchanged)."""
    nodes = {n["name"]: dict(n) for n in doc["nodes"]}
    for node in overrides.nodes:
        nodes[node.name] = node.model_dump(by_alias=True, exclude_none=True)
    for name, params in overrides.params.items():
        if name in nodes:
            nodes[name]["params"] = {**nodes[name].get("params", {}), **params}
    for name, version in overrides.models.items():
        if name in nodes:
            nodes[name]["params"] = {**nodes[name].get("params", {}), "version": version}
    out = {**doc, "nodes": list(nodes.values())}
    if overrides.output is not None:
        out["output"] = overrides.output
    return out


def touched(overrides: Overrides) -> set[str]:
    return {*overrides.models, *overrides.params, *(n.name for n in overrides.nodes)}


def _conflicts(experiments: list[Experiment]) -> list[str]:
    problems = []
    owners: dict[str, str] = {}
    for exp in experiments:
        nodes = set().union(*(touched(v.overrides) for v in exp.variants))
        outputs = any(v.overrides.output is not None for v in exp.variants)
        for name in sorted(nodes | ({"<output>"} if outputs else set())):
            other = owners.setdefault(name, exp.name)
            if other != exp.name:
                what = "the output" if name == "<output>" else f"node {name!r}"
                problems.append(
                    f"experiment {exp.name!r}: experiment {other!r} also overrides {what}; "
                    "experiments of one surface must override different nodes"
                )
    return problems


def compile_variants(
    spec: WorkflowSpec, check: Checker
) -> tuple[dict[Assignments, Any], list[Any], list[str]]:
    """Every combination of variants and every shadow as a checked Workflow.

    Returns (workflow per assignment combination, shadow workflows, problems). An
    assignment combination lists (experiment, variant) for each experiment in spec order.
    """
    doc = base_document(spec)
    problems: list[str] = []
    names = [e.name for e in spec.experiments]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"experiment {dup!r}: duplicate experiment name")
    shadow_names = [s.name for s in spec.shadows]
    for dup in sorted({n for n in shadow_names if shadow_names.count(n) > 1}):
        problems.append(f"shadow {dup!r}: duplicate shadow name")
    for exp in spec.experiments:
        for v in exp.variants:
            where = f"experiment {exp.name!r} variant {v.name!r}"
            problems.extend(reference_problems(where, v.overrides, doc))
    for sh in spec.shadows:
        problems.extend(reference_problems(f"shadow {sh.name!r}", sh.overrides, doc))
    problems.extend(_conflicts(spec.experiments))
    # A member outside an experiment's targeting gets the workflow's own nodes for it.
    per_exp: list[list[tuple[Experiment, Variant | None]]] = [
        [*([(e, None)] if _targeted(e) else []), *((e, v) for v in e.variants)]
        for e in spec.experiments
    ]
    combos = 1
    for options in per_exp:
        combos *= len(options)
    if combos > MAX_COMBINATIONS:
        problems.append(
            f"spec.experiments: {combos} combinations of variants; at most {MAX_COMBINATIONS}"
        )
    if problems:
        return {}, [], problems

    variants: dict[Assignments, Any] = {}
    for combo in itertools.product(*per_exp):
        chosen = [(e, v) for e, v in combo if v is not None]
        assignments = tuple((e.name, v.name) for e, v in chosen)
        if not assignments:
            continue  # the workflow itself
        variant_doc = doc
        for _, v in chosen:
            variant_doc = apply(variant_doc, v.overrides)
        where = " + ".join(f"experiment {e.name!r} variant {v.name!r}" for e, v in chosen)
        try:
            variants[assignments] = check(variant_doc, where)
        except ValueError as exc:
            problems.extend(f"{where}: {p}" for p in getattr(exc, "problems", [str(exc)]))
    shadows = []
    for sh in spec.shadows:
        where = f"shadow {sh.name!r}"
        try:
            shadows.append(check(apply(doc, sh.overrides), where))
        except ValueError as exc:
            problems.extend(f"{where}: {p}" for p in getattr(exc, "problems", [str(exc)]))
    return variants, shadows, problems


def _targeted(exp: Experiment) -> bool:
    """Whether some members can fall outside the experiment."""
    return exp.targeting.share < 1.0 or bool(exp.targeting.allow_list)
