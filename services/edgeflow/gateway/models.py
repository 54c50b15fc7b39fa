"""The served workflows' model references, checked against the models the scoring service
has loaded.

An experiment variant that names a model version the scoring service does not have would
make every request of its members `partial`: its scoring node falls back. The gateway has no
model directory (in a cluster the scoring service owns the registry), so it asks the scoring
service which versions are loaded (`ListModels`, on the port it already calls `Score` on)
when it starts and every reload interval, once the scoring service reports SERVING (before,
it is still loading them), and checks every graph of every workflow with the check of
`edgeflow validate --model-dir`.

It does not refuse the workflow: that would take the whole surface down for one variant.
Instead, members of a variant whose models are missing are served their experiment's
control (and their responses and exposures say so) until the models are loaded, provided
the control has those models, and the problem is reported: one log line when it appears or
changes (and one when it clears), the metrics `edgeflow_gateway_model_problems`,
`edgeflow_gateway_variant_rerouted` and `edgeflow_gateway_rerouted_requests_total`, and
`ListSurfaces` (`edgeflow status`). Problems in the workflow's own graph or a shadow's are
reported the same way; there is nothing better to serve instead, so their scoring nodes
still fall back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeflow.shell import metrics
from edgeflow.v1 import gateway_pb2, scoring_pb2, scoring_pb2_grpc
from edgeflow.workflow import variants as variants_mod
from edgeflow.workflow.compiled import Workflow
from edgeflow.workflow.validate import locate_model_problems, model_problems_at, uses_models
from edgeflow.workflow.variants import Assignments

log = logging.getLogger("edgeflow.gateway")

# ListModels lists metadata only; it answers in well under a millisecond.
LIST_TIMEOUT_S = 2.0
# Its health service name: SERVING once its registry is loaded (ListModels answers before).
SCORING_SERVICE = "edgeflow.v1.ScoringService"

Available = dict[str, list[str]]  # model -> loaded versions ("v1", "v2", ...)
Key = tuple[str, str]  # (experiment, variant)
Move = tuple[str, str, str]  # (experiment, assigned variant, served variant or "")
Route = tuple[Workflow, Assignments, tuple[Move, ...]]


@dataclass(frozen=True)
class SurfaceCheck:
    """What is wrong with one workflow's model references, and who is served what instead."""

    problems: tuple[str, ...] = ()
    # (experiment, variant) -> the variant that serves its members instead: the control, or
    # "" (the workflow's own graph) when the control is broken too.
    reroutes: Mapping[Key, str] = field(default_factory=dict)
    # Assigned combination of variants -> (the graph that serves it instead, the served
    # combination, the moves), for each combination that has a rerouted variant.
    routes: Mapping[Assignments, Route] = field(default_factory=dict)


def check_surface(wf: Workflow, available: Mapping[str, list[str]]) -> SurfaceCheck:
    """Check every graph of `wf` against the loaded models. A member assigned a variant
    whose models are missing is served its experiment's control instead (or, when that is
    broken too, the workflow's own graph), provided the graph instead has those nodes'
    models; otherwise (say the workflow's own graph lacks the same model) it is served as
    assigned, and only the problem is reported."""
    located = locate_model_problems(wf, available)
    broken = located.variants
    messages = tuple(located.messages())
    if not broken:
        return SurfaceCheck(messages)
    overrides = {(e.name, v.name): v.overrides for e in wf.spec.experiments for v in e.variants}
    controls = {e.name: e.control_variant for e in wf.spec.experiments}
    routes: dict[Assignments, Route] = {}
    reroutes: dict[Key, str] = {}
    for assignments in wf.variants:
        served: list[Key] = []
        moves: list[Move] = []
        for exp, variant in assignments:
            if (exp, variant) not in broken:
                served.append((exp, variant))
                continue
            control = controls[exp]
            instead = control if (exp, control) not in broken else ""
            moves.append((exp, variant, instead))
            if instead:
                served.append((exp, instead))
        if not moves:
            continue
        routed = tuple(served)
        graph = wf.variants.get(routed) if routed else wf
        if graph is None:  # that combination is not compiled: serve as assigned
            continue
        nodes = set().union(*(variants_mod.touched(overrides[(e, v)]) for e, v, _ in moves))
        if any(node in nodes for node, _ in model_problems_at(graph, available)):
            continue  # no better there
        routes[assignments] = (graph, routed, tuple(moves))
        for exp, variant, instead in moves:
            reroutes[(exp, variant)] = instead
    order = list(overrides)
    reroutes = {k: reroutes[k] for k in sorted(reroutes, key=order.index)}
    return SurfaceCheck(messages, reroutes, routes)


def describe_reroutes(reroutes: Mapping[Key, str]) -> str:
    """'members of experiment 'e' variant 'v2' are served variant 'v1' (its control)'."""
    parts = []
    for (exp, variant), instead in reroutes.items():
        target = f"variant {instead!r} (its control)" if instead else "the workflow's own graph"
        parts.append(f"members of experiment {exp!r} variant {variant!r} are served {target}")
    return "; ".join(parts)


class ModelWatch:
    """The last answer of the scoring service's `ListModels` and each served workflow's
    check against it (`checks`, by surface)."""

    def __init__(self, scoring: grpc.aio.Channel, addr: str) -> None:
        self._stub = scoring_pb2_grpc.ScoringServiceStub(scoring)
        self._health = health_pb2_grpc.HealthStub(scoring)
        self._addr = addr
        self.available: Available | None = None
        self.error = "not checked yet: the scoring service has not answered ListModels"
        self.checks: dict[str, SurfaceCheck] = {}
        self._checked: dict[str, tuple[Workflow, Available]] = {}

    def use(self, scoring: grpc.aio.Channel) -> None:
        """Ask over a new channel from now on (a renewed certificate)."""
        self._stub = scoring_pb2_grpc.ScoringServiceStub(scoring)
        self._health = health_pb2_grpc.HealthStub(scoring)

    async def refresh(self, timeout_s: float = LIST_TIMEOUT_S) -> None:
        """Ask the scoring service which model versions it has loaded. When it cannot be
        asked, or is still loading them (not SERVING), the last answer stands (and why is
        logged once)."""
        try:
            health = await self._health.Check(
                health_pb2.HealthCheckRequest(service=SCORING_SERVICE), timeout=timeout_s
            )
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                self._failed(f"scoring service at {self._addr} is not serving yet "
                             "(it is loading its models)")  # fmt: skip
                return
            resp = await self._stub.ListModels(scoring_pb2.ListModelsRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            details = " ".join((exc.details() or "").split())
            self._failed(f"scoring service at {self._addr}: {exc.code().name}: {details}")
            return
        if self.error and self.available is not None:
            log.info("model references checked again against the scoring service at %s",
                     self._addr)  # fmt: skip
        self.error = ""
        available: Available = {}
        for m in resp.models:  # a version, and the rollout alias it holds ("canary")
            available.setdefault(m.name, []).extend([m.version, *m.aliases])
        self.available = available

    def _failed(self, error: str) -> None:
        if error != self.error:
            log.warning(
                "cannot check the workflows' model references: %s (%s)",
                error,
                "keeping the last check" if self.available is not None else "will retry",
            )
        self.error = error

    def update(self, workflows: Mapping[str, Workflow]) -> None:
        """Check each workflow that changed, or every one when the loaded models changed;
        log, and set the metrics of, what changed."""
        for surface, wf in workflows.items():
            available = self.available if uses_models(wf) else {}
            if available is None:
                continue  # nothing to check against yet
            last = self._checked.get(surface)
            if last is not None and last[0] is wf and last[1] == available:
                continue
            new = check_surface(wf, available)
            self._report(surface, wf, self.checks.get(surface), new)
            self.checks[surface] = new
            self._checked[surface] = (wf, available)
        for surface in [s for s in self.checks if s not in workflows]:
            self._report(surface, None, self.checks.pop(surface), None)
            self._checked.pop(surface, None)

    def _report(
        self, surface: str, wf: Workflow | None, old: SurfaceCheck | None, new: SurfaceCheck | None
    ) -> None:
        old_problems = old.problems if old is not None else ()
        old_reroutes = old.reroutes if old is not None else {}
        new_reroutes = new.reroutes if new is not None else {}
        if new is None:
            metrics.MODEL_PROBLEMS.remove(surface)
        else:
            metrics.MODEL_PROBLEMS.labels(surface).set(len(new.problems))
        for key in old_reroutes:
            if key not in new_reroutes:
                metrics.VARIANT_REROUTED.remove(surface, *key)
        for key in new_reroutes:
            metrics.VARIANT_REROUTED.labels(surface, *key).set(1)
        if new is None or (new.problems == old_problems and new_reroutes == old_reroutes):
            return
        assert wf is not None
        if new.problems:
            then = describe_reroutes(new.reroutes)
            log.error(
                "surface %r (workflow %r): the scoring service at %s has not loaded "
                "%d model reference(s): %s%s",
                surface, wf.name, self._addr, len(new.problems), "; ".join(new.problems),
                f". Until it does, {then}" if then else "",
            )  # fmt: skip
        elif old_problems:
            log.info(
                "surface %r (workflow %r): every model reference is loaded now%s",
                surface, wf.name,
                "; every variant is served as assigned again" if old_reroutes else "",
            )  # fmt: skip

    def status(self, surface: str, wf: Workflow) -> gateway_pb2.SurfaceStatus:
        """The surface's line in ListSurfaces."""
        out = gateway_pb2.SurfaceStatus(surface=surface, workflow=wf.name)
        check = self.checks.get(surface)
        out.models_checked = check is not None
        if uses_models(wf):
            out.check_error = self.error
        if check is not None:
            out.problems.extend(check.problems)
            for (exp, variant), instead in check.reroutes.items():
                out.reroutes.add(experiment=exp, variant=variant, served=instead)
        return out
