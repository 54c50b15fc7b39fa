"""Validation of workflow graphs, with errors that name the node and the field.

`edgeflow validate`, the gateway and the operator all call `load_workflow`/`check`, so a
graph is accepted or rejected the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgeflow.workflow import limits
from edgeflow.workflow import variants as variants_mod
from edgeflow.workflow.assign import Bucketing
from edgeflow.workflow.compiled import CompiledNode, Workflow
from edgeflow.workflow.model import API_VERSION, KIND, EdgeWorkflow, Node, WorkflowSpec
from edgeflow.workflow.ops import OPS, Kind, OpSpec, Params

DEFAULT_FALLBACK = {"candidates": "empty", "features": "passthrough", "scoring": "passthrough"}
# A message lists at most this many problems, each at most this long: a document full of
# errors (or of huge names) gives a readable message, not megabytes.
MAX_PROBLEMS = 20
MAX_PROBLEM_CHARS = 300


class WorkflowError(ValueError):
    """An invalid workflow; `problems` lists every error as 'where: what'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        shown = [limits.clip_text(p, MAX_PROBLEM_CHARS) for p in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
        self.problems = shown
        super().__init__(f"{source}: invalid workflow:\n" + "\n".join(f"  - {p}" for p in shown))


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required field is missing"
    return str(err["msg"]).removeprefix("Value error, ")


def _problems(exc: ValidationError, where: str, doc: Mapping[str, Any] | None = None) -> list[str]:
    out = []
    for err in exc.errors():
        loc = err["loc"]
        named = _named_item(doc, loc)
        if named is not None:  # "experiment 'x' field variants" reads better than an index
            where_item, loc = named
            field = _field(loc)
            out.append(f"{where_item} field {field}: {_message(err)}" if field else
                       f"{where_item}: {_message(err)}")  # fmt: skip
            continue
        field = _field(loc)
        out.append(
            f"{where} field {field}: {_message(err)}" if field else f"{where}: {_message(err)}"
        )
    return out


def _field(loc: tuple[Any, ...]) -> str:
    """A location as a dotted path; a key the user wrote is quoted at most in part."""
    return ".".join(
        str(x) if len(str(x)) <= limits.QUOTE_CHARS else limits.clip(str(x)) for x in loc
    )


_ITEM_LISTS = {"experiments": "experiment", "shadows": "shadow"}


def _named_item(
    doc: Mapping[str, Any] | None, loc: tuple[Any, ...]
) -> tuple[str, tuple[Any, ...]] | None:
    """For an error inside spec.experiments[i] or spec.shadows[i], the item's name and the
    rest of the location."""
    if doc is None or len(loc) < 2 or loc[0] not in _ITEM_LISTS or not isinstance(loc[1], int):
        return None
    items = doc.get(loc[0])
    if not isinstance(items, list) or loc[1] >= len(items):
        return None
    if not isinstance(items[loc[1]], Mapping):
        return None
    name = items[loc[1]].get("name")
    label = (
        f"{_ITEM_LISTS[loc[0]]} {limits.clip(name)}"
        if name
        else f"{_ITEM_LISTS[loc[0]]} #{loc[1] + 1}"
    )
    return label, loc[2:]


def check(spec_doc: Mapping[str, Any], name: str = "", source: str = "<workflow>") -> Workflow:
    """Validate a spec mapping; raises WorkflowError listing every problem found."""
    problems: list[str] = []
    workflow_name = name
    raw_nodes = spec_doc.get("nodes")
    nodes: list[Node] = []
    if isinstance(raw_nodes, list):
        for idx, raw in enumerate(raw_nodes):
            label = raw.get("name") if isinstance(raw, Mapping) else None
            where = f"node {limits.clip(label)}" if label else f"node #{idx + 1}"
            try:
                nodes.append(Node.model_validate(raw))
            except ValidationError as exc:
                problems.extend(_problems(exc, where))
    try:
        spec = WorkflowSpec.model_validate(
            {**spec_doc, "nodes": nodes} if problems and nodes else spec_doc
        )
    except ValidationError as exc:
        spec_problems = [
            p
            for p in _problems(exc, "spec", spec_doc)
            if not (problems and p.startswith("spec field nodes"))
        ]
        raise WorkflowError(source, problems + spec_problems) from None
    names: dict[str, Node] = {}
    # Names of nodes that failed validation still count, so references to them do not cascade.
    raw_names = {
        str(r.get("name")) for r in raw_nodes or [] if isinstance(r, Mapping) and r.get("name")
    }
    for node in spec.nodes:
        if node.name in names:
            problems.append(f"node {node.name!r}: duplicate node name")
        names[node.name] = node

    compiled: dict[str, tuple[Node, OpSpec, Params, str]] = {}
    for node in spec.nodes:
        where = f"node {node.name!r}"
        op = OPS.get(node.op)
        if op is None:
            problems.append(
                f"{where} field op: unknown op {limits.clip(node.op)}; known: {sorted(OPS)}"
            )
            continue
        try:
            params = op.params.model_validate(node.params)
        except ValidationError as exc:
            for err in exc.errors():
                field = _field(("params", *err["loc"]))
                problems.append(f"{where} field {field}: {_message(err)}")
            continue
        family = node.op.split(".", 1)[0]
        fallback = node.fallback or DEFAULT_FALLBACK.get(family, "fail")
        if fallback not in op.fallbacks:
            problems.append(
                f"{where} field fallback: {fallback!r} is not allowed for {node.op}; "
                f"use one of {sorted(op.fallbacks)}"
            )
        n_in = len(node.inputs)
        if not op.min_inputs <= n_in <= op.max_inputs:
            want = (
                "no inputs" if op.max_inputs == 0
                else f"{op.min_inputs}..{op.max_inputs} inputs"
            )  # fmt: skip
            problems.append(f"{where} field inputs: {node.op} takes {want}, got {n_in}")
        for dep in node.inputs:
            if dep not in names and dep not in raw_names:
                problems.append(f"{where} field inputs: unknown node {limits.clip(dep)}")
            elif dep == node.name:
                problems.append(f"{where} field inputs: a node cannot be its own input")
        if len(set(node.inputs)) != n_in:
            problems.append(f"{where} field inputs: an input is listed twice")
        compiled[node.name] = (node, op, params, fallback)

    order = _topological(spec.nodes, problems)
    kinds: dict[str, Kind] = {}
    result: list[CompiledNode] = []
    for name in order:
        if name not in compiled:
            continue
        node, op, params, fallback = compiled[name]
        in_kinds = [kinds[d] for d in node.inputs if d in kinds]
        for dep, kind in zip(node.inputs, in_kinds, strict=False):
            if kind not in op.inputs:
                problems.append(
                    f"node {name!r} field inputs: {dep!r} produces {kind.value}, but {node.op} "
                    f"takes {' or '.join(sorted(k.value for k in op.inputs))}"
                )
        kind = op.output or (in_kinds[0] if in_kinds else Kind.CANDIDATES)
        kinds[name] = kind
        result.append(CompiledNode(node, op, params, fallback, kind))
        problems.extend(_semantic(node, params, names, workflow_name or spec.surface))

    if spec.output not in names and spec.output not in raw_names:
        problems.append(f"spec.output: unknown node {limits.clip(spec.output)}")
    elif spec.output in kinds and kinds[spec.output] is not Kind.RANKED:
        problems.append(
            f"spec.output: node {spec.output!r} produces {kinds[spec.output].value}; the "
            "output must be a merge.blend node (ranked)"
        )
    if problems:
        raise WorkflowError(source, problems)
    wf = Workflow(name=workflow_name or spec.surface, spec=spec, nodes=tuple(result))
    if not spec.experiments and not spec.shadows:
        return wf
    compiled_variants, shadows, problems = variants_mod.compile_variants(
        spec, lambda doc, where: check(doc, name=wf.name, source=source)
    )
    if problems:
        raise WorkflowError(source, problems)
    return Workflow(
        name=wf.name,
        spec=spec,
        nodes=wf.nodes,
        variants=compiled_variants,
        shadows=tuple(zip(spec.shadows, shadows, strict=True)),
        bucketing=tuple(Bucketing.of(e) for e in spec.experiments),
    )


def _semantic(node: Node, params: Params, names: Mapping[str, Node], workflow: str) -> list[str]:
    """Checks that need the whole graph: references from params to other nodes, and the
    safety filters that no workflow or experiment may switch off."""
    from edgeflow.workflow.ops import SAFETY_FILTERS, BlendParams

    problems = []
    if isinstance(params, BlendParams):
        missing = [f for f in SAFETY_FILTERS if f not in params.filters]
        if missing:
            problems.append(
                f"node {node.name!r} field params.filters: workflow {limits.clip(workflow)} "
                f"removes the safety filters {missing}; {', '.join(SAFETY_FILTERS)} apply to "
                "every served list and cannot be switched off"
            )
        for key in params.weights:
            if key not in node.inputs:
                problems.append(
                    f"node {node.name!r} field {_field(('params', 'weights', key))}: not an "
                    "input of this node"
                )
        for key in params.quotas:
            src = names.get(key)
            if src is None or not src.op.startswith("candidates."):
                problems.append(
                    f"node {node.name!r} field {_field(('params', 'quotas', key))}: not a "
                    "candidates node"
                )
    return problems


def check_models(wf: Workflow, available: Mapping[str, list[str]]) -> list[str]:
    """Problems with the scoring nodes' model references against a registry's contents."""

    problems: dict[str, str] = {}  # problem -> the first graph that has it
    for label, graph in wf.all_graphs():
        for problem in _model_problems(graph, available):
            problems.setdefault(problem, label)
    return [f"{label}: {p}" if label else p for p, label in problems.items()]


def _model_problems(wf: Workflow, available: Mapping[str, list[str]]) -> list[str]:
    return [problem for _, problem in model_problems_at(wf, available)]


def model_problems_at(wf: Workflow, available: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    """(node, problem) for each scoring node whose model or version is not available."""
    from edgeflow.workflow.ops import OnnxParams

    problems = []
    for cn in wf.nodes:
        params = cn.params
        if not isinstance(params, OnnxParams):
            continue
        where = f"node {cn.node.name!r} field params"
        versions = available.get(params.model)
        if versions is None:
            problem = (
                f"{where}.model: no model {params.model!r} in the registry "
                f"(it has {sorted(available) or 'no models'})"
            )
        elif params.version not in ("latest", "stable") and params.version not in versions:
            problem = (
                f"{where}.version: model {params.model!r} has no version {params.version!r} "
                f"(it has {versions})"
            )
        else:
            continue
        problems.append((cn.node.name, problem))
    return problems


def uses_models(wf: Workflow) -> bool:
    """Whether any graph of the workflow (its own, a variant's, a shadow's) has a
    scoring.onnx node, i.e. needs models from the registry."""
    from edgeflow.workflow.ops import OnnxParams

    return any(isinstance(cn.params, OnnxParams) for _, g in wf.all_graphs() for cn in g.nodes)


@dataclass(frozen=True)
class ModelProblems:
    """`check_models`' problems, each blamed on the graph that has it: the workflow's own
    nodes, the nodes an experiment variant overrides, or the nodes a shadow overrides.

    Experiments of a surface override different nodes, so a problem in a node a variant
    overrides is that variant's, whatever other variants the member also has."""

    workflow: tuple[str, ...] = ()
    variants: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    shadows: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def messages(self) -> list[str]:
        """Every problem as 'where: what', in the words of `edgeflow validate --model-dir`."""
        out = list(self.workflow)
        for (exp, variant), problems in self.variants.items():
            out += [f"experiment {exp!r} variant {variant!r}: {p}" for p in problems]
        for shadow, problems in self.shadows.items():
            out += [f"shadow {shadow!r}: {p}" for p in problems]
        return out


def locate_model_problems(wf: Workflow, available: Mapping[str, list[str]]) -> ModelProblems:
    """The model references of every graph of `wf` that `available` (model -> versions)
    lacks, blamed on the workflow itself, a variant or a shadow (see ModelProblems)."""
    variants: dict[tuple[str, str], dict[str, None]] = {}
    overrides = {(e.name, v.name): v.overrides for e in wf.spec.experiments for v in e.variants}
    for assignments, graph in wf.variants.items():
        found = model_problems_at(graph, available)
        for key in assignments:
            mine = variants_mod.touched(overrides[key])
            for node, problem in found:
                if node in mine:
                    variants.setdefault(key, {})[problem] = None
    shadows: dict[str, dict[str, None]] = {}
    for shadow, graph in wf.shadows:
        mine = variants_mod.touched(shadow.overrides)
        for node, problem in model_problems_at(graph, available):
            if node in mine:
                shadows.setdefault(shadow.name, {})[problem] = None
    order = list(overrides)  # spec order, whatever order the combinations came in
    return ModelProblems(
        workflow=tuple(_model_problems(wf, available)),
        variants={k: tuple(variants[k]) for k in sorted(variants, key=order.index)},
        shadows={s.name: tuple(shadows[s.name]) for s, _ in wf.shadows if s.name in shadows},
    )


def _topological(nodes: list[Node], problems: list[str]) -> list[str]:
    """Kahn's algorithm; nodes left over sit on a cycle and are reported."""
    known = {n.name for n in nodes}
    indeg = {n.name: sum(1 for d in set(n.inputs) if d in known and d != n.name) for n in nodes}
    users: dict[str, list[str]] = {n.name: [] for n in nodes}
    for n in nodes:
        for d in set(n.inputs):
            if d in known and d != n.name:
                users[d].append(n.name)
    ready = [n.name for n in nodes if indeg[n.name] == 0]
    order: list[str] = []
    while ready:
        cur = ready.pop(0)
        order.append(cur)
        for u in users[cur]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    stuck = [n.name for n in nodes if n.name not in order]
    if stuck:
        problems.append(f"nodes {stuck}: the graph has a cycle through these nodes (field inputs)")
    return order


def check_size(doc: Any, source: str) -> None:
    """Refuse a parsed document nested deeper or holding more values than a workflow may,
    before anything walks it recursively (the operator copies what the API server sent)."""
    try:
        limits.check_nesting(doc)
    except limits.LimitError as exc:
        raise WorkflowError(source, [f"document: {exc}"]) from None


def parse_document(doc: Any, source: str) -> Workflow:
    """Accept a whole EdgeWorkflow resource or a bare spec, parsed from YAML or JSON."""
    check_size(doc, source)
    try:
        return _parse_document(doc, source)
    except RecursionError:  # the limits make this unreachable; never a crash if they do not
        raise WorkflowError(source, ["document: nested too deeply to validate"]) from None


def _parse_document(doc: Any, source: str) -> Workflow:
    if not isinstance(doc, Mapping):
        raise WorkflowError(source, ["the document must be a mapping (an EdgeWorkflow or a spec)"])
    if "spec" in doc or "kind" in doc or "apiVersion" in doc:
        problems = []
        if doc.get("apiVersion") != API_VERSION:
            got = limits.clip(doc.get("apiVersion"))
            problems.append(f"apiVersion: expected {API_VERSION!r}, got {got}")
        if doc.get("kind") != KIND:
            problems.append(f"kind: expected {KIND!r}, got {limits.clip(doc.get('kind'))}")
        meta = doc.get("metadata")
        if not isinstance(meta, Mapping) or not meta.get("name"):
            problems.append("metadata.name: required")
        if not isinstance(doc.get("spec"), Mapping):
            problems.append("spec: required mapping")
        if problems:
            raise WorkflowError(source, problems)
        try:
            EdgeWorkflow.model_validate(doc)
        except ValidationError as exc:
            problems = [
                p for p in _problems(exc, "resource") if not p.startswith("resource field spec")
            ]
        try:
            wf = check(doc["spec"], name=str(doc["metadata"]["name"]), source=source)
        except WorkflowError as exc:
            raise WorkflowError(source, problems + exc.problems) from None
        if problems:
            raise WorkflowError(source, problems)
        return wf
    return check(doc, source=source)


def load_workflow(path: Path) -> Workflow:
    """Read, parse and validate one workflow file; every problem (unreadable, too large,
    nested too deeply, not YAML, not a valid workflow) is a WorkflowError naming the file."""
    try:
        text = limits.read_text(path)
    except OSError as exc:
        raise WorkflowError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise WorkflowError(str(path), [f"byte {exc.start}: not UTF-8 text"]) from None
    except limits.LimitError as exc:
        raise WorkflowError(str(path), [f"file: {exc}"]) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Workflow:
    """Parse and validate the text of one workflow file (`source` names it in errors)."""
    path = source
    try:
        docs = [d for d in limits.load_yaml(text) if d is not None]
    except limits.LimitError as exc:
        raise WorkflowError(path, [f"file: {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "document"
        parts = (getattr(exc, "context", None), getattr(exc, "problem", None))
        what = ", ".join(p for p in parts if p) or str(exc)
        raise WorkflowError(path, [f"{where}: not valid YAML ({what})"]) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise WorkflowError(path, [f"document: not valid YAML ({exc})"]) from None
    if len(docs) != 1:
        raise WorkflowError(path, [f"expected one YAML document, found {len(docs)}"])
    return parse_document(docs[0], path)


def load_directory(directory: Path) -> tuple[dict[str, Workflow], list[WorkflowError]]:
    """Every *.yaml workflow in a directory, by surface; invalid ones are returned as errors."""
    files, errors = load_files(directory)
    return {wf.surface: wf for wf in files.values()}, errors


def workflow_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def load_files(directory: Path) -> tuple[dict[str, Workflow], list[WorkflowError]]:
    """Every *.yaml workflow in a directory, by file path; invalid files (and a surface
    defined again by a later file) are returned as errors naming the file. Never raises for
    a file's content."""
    workflows: dict[str, Workflow] = {}
    surfaces: set[str] = set()
    errors: list[WorkflowError] = []
    for path in workflow_files(directory):
        try:
            wf = load_workflow(path)
        except WorkflowError as exc:
            errors.append(exc)
            continue
        except Exception as exc:  # a bug here must cost one file, never the others
            errors.append(WorkflowError(str(path), [f"could not be validated: {exc!r}"]))
            continue
        if wf.surface in surfaces:
            errors.append(WorkflowError(str(path), [f"surface {wf.surface!r} is defined twice"]))
            continue
        surfaces.add(wf.surface)
        workflows[str(path)] = wf
    return workflows, errors
