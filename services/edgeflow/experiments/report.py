"""`edgeflow experiments report`: per variant, exposures, outcomes, acceptance rate and the
lift over control with a delta-method 95% interval.

Exposures are served edges; the acceptance rate is accepted outcomes (connect, follow) per
exposed edge, the dismiss rate dismiss outcomes per exposed edge, both joined as
`experiments.join` defines. The member is the unit of randomisation, so intervals come from
member-level sums (`experiments.stats`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeflow.experiments import stats
from edgeflow.experiments.join import DEFAULT_WINDOW_S, JoinResult, join
from edgeflow.stores.redis_client import SyncClient
from edgeflow.workflow.validate import load_directory


class ReportError(ValueError):
    """The report cannot be made, e.g. the experiment has no exposures."""


@dataclass(frozen=True)
class VariantReport:
    variant: str
    exposures: int  # served edges
    requests: int
    members: int
    accepted: int
    acceptance_rate: float
    dismissed: int
    dismiss_rate: float
    lift: float | None  # relative to control's acceptance rate; None where undefined
    lift_ci_low: float | None
    lift_ci_high: float | None
    significant: bool
    is_control: bool


@dataclass(frozen=True)
class Report:
    experiment: str
    window_s: float
    since: float | None
    until: float | None
    control: str
    variants: list[VariantReport]
    unattributed_outcomes: int
    malformed_entries: int
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["warnings"]
        return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def choose_control(variants: list[str], control: str | None, default: str) -> tuple[str, list[str]]:
    """The control variant and any warning; an explicit `control` must be a variant."""
    if control is not None:
        if control not in variants:
            raise ReportError(f"control {control!r} is not a variant; variants: {variants}")
        return control, []
    if default in variants:
        return default, []
    first = sorted(variants)[0]
    return first, [f"no variant named {default!r}; using {first!r} as control"]


def spec_control(workflows_dir: Path, experiment: str) -> str | None:
    """The experiment's control variant as a workflow spec in `workflows_dir` names it."""
    if not workflows_dir.is_dir():
        return None
    workflows, _ = load_directory(workflows_dir)
    for wf in workflows.values():
        for exp in wf.spec.experiments:
            if exp.name == experiment:
                return exp.control_variant
    return None


def summarize(
    result: JoinResult,
    window_s: float,
    control: str | None = None,
    default_control: str = "control",
    since: float | None = None,
    until: float | None = None,
) -> Report:
    if not result.arms:
        found = ", ".join(sorted(result.experiments_seen)) or "none"
        raise ReportError(
            f"experiment {result.experiment!r} has no exposures in range; experiments found: "
            f"{found}"
        )
    names = sorted(result.arms)
    control_name, warnings = choose_control(names, control, default_control)
    ratios = {
        v: stats.ratio(np.asarray(arm.accepted), np.asarray(arm.edges))
        for v, arm in result.arms.items()
    }
    rows = []
    for v in names:
        arm = result.arms[v]
        edges = sum(arm.edges)
        accepted, dismissed = sum(arm.accepted), sum(arm.dismissed)
        if v == control_name:
            lift = stats.Lift(0.0, 0.0, 0.0)
        else:
            lift = stats.relative_lift(ratios[v], ratios[control_name])
        rows.append(
            VariantReport(
                variant=v,
                exposures=edges,
                requests=sum(arm.requests),
                members=len(arm.members),
                accepted=accepted,
                acceptance_rate=accepted / edges if edges else 0.0,
                dismissed=dismissed,
                dismiss_rate=dismissed / edges if edges else 0.0,
                lift=_finite(lift.value),
                lift_ci_low=_finite(lift.low),
                lift_ci_high=_finite(lift.high),
                significant=lift.significant,
                is_control=v == control_name,
            )
        )
    return Report(
        experiment=result.experiment,
        window_s=window_s,
        since=since,
        until=until,
        control=control_name,
        variants=rows,
        unattributed_outcomes=result.unattributed,
        malformed_entries=result.malformed,
        warnings=warnings,
    )


def report(
    client: SyncClient,
    experiment: str,
    window_s: float = DEFAULT_WINDOW_S,
    control: str | None = None,
    default_control: str = "control",
    since: float | None = None,
    until: float | None = None,
) -> Report:
    """Join and summarise. `control` names the control explicitly (it must be a variant);
    otherwise `default_control` is used when present, else the first variant by name."""
    result = join(client, experiment, window_s, since, until)
    return summarize(result, window_s, control, default_control, since, until)
