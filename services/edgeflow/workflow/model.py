"""The EdgeWorkflow model: the YAML a user writes, the `spec` of the custom resource.

Field names are camelCase as in every Kubernetes API; unknown fields are errors, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from edgeflow.workflow import endpoints

API_VERSION: Final = "edgeflow.dev/v1alpha1"
KIND: Final = "EdgeWorkflow"
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"

Fallback = Literal["empty", "passthrough", "fail"]
EventType = Literal["connect", "disconnect", "block", "dismiss", "follow", "profile_change"]


class _Model(BaseModel):
    # NaN and infinities are refused wherever a number is taken: a NaN weight would pass
    # every range check and then fail each request.
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, allow_inf_nan=False
    )


class Node(_Model):
    """One step of the graph."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Unique node name (DNS label).")
    op: str = Field(
        ..., max_length=64, description="Operation, e.g. candidates.graph or scoring.onnx."
    )
    inputs: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list, description="Names of upstream nodes."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Op parameters.")
    timeout_ms: int = Field(
        50, ge=1, le=60_000, description="Deadline of the node; capped by the request budget."
    )
    fallback: Fallback | None = Field(
        None,
        description=(
            "What to serve when the node fails or times out: empty (no items), passthrough "
            "(its input unchanged) or fail (fail the request). Defaults per op."
        ),
    )


class OnlineMode(_Model):
    """Served by the gateway at request time."""

    enabled: bool = Field(True, description="Serve Recommend for the surface.")


class OfflineMode(_Model):
    """Precomputed in bulk by the offline job."""

    schedule: str = Field("0 3 * * *", description="Cron schedule of the bulk run.")
    shards: int = Field(1, ge=1, le=1024, description="Number of shards (Indexed Job size).")
    list: str = Field(
        "", max_length=63, pattern=r"^([a-z0-9][a-z0-9_.-]*)?$",
        description="Name of the precomputed list it writes; empty means the surface.",
    )  # fmt: skip
    k: int = Field(200, ge=1, le=1000, description="Edges kept per member in the list.")


class NearlineMode(_Model):
    """Recomputed by the nearline worker shortly after member events."""

    events: list[EventType] = Field(
        default_factory=lambda: list[EventType](["connect"]),
        min_length=1,
        description="Triggering events.",
    )


class RemoteMode(_Model):
    """Scoring by a model server over the Open Inference Protocol v2 (scoring.remote nodes)."""

    endpoint: str = Field(
        ...,
        description=(
            "Endpoint of the scoring.remote nodes that name none: host:port, ${VAR} or "
            "${VAR:-host:port} (read from the gateway's environment)."
        ),
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return endpoints.check(value)


class Modes(_Model):
    """Where and when the workflow runs; any combination of modes may be on."""

    online: OnlineMode = Field(
        default_factory=OnlineMode, description="Request-time serving by the gateway."
    )
    offline: OfflineMode | None = Field(
        None, description="Bulk precompute by the offline job; absent means none."
    )
    nearline: NearlineMode | None = Field(
        None, description="Recompute after member events; absent means no nearline worker."
    )
    remote: RemoteMode | None = Field(
        None, description="Defaults of remote scoring; absent means each node names its endpoint."
    )


class Overrides(_Model):
    """How a variant's graph differs from the workflow's own graph."""

    models: dict[str, str] = Field(
        default_factory=dict,
        description='Model version per scoring node, e.g. {rank: "2"}.',
    )
    params: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Params merged into a node's own, per node name.",
    )
    nodes: list[Node] = Field(
        default_factory=list,
        max_length=64,
        description="Nodes that replace the node of the same name, or are added to the graph.",
    )
    output: str | None = Field(None, description="Another output node for the variant.")


class Variant(_Model):
    name: str = Field(..., pattern=NAME_PATTERN, description="Variant name, e.g. control.")
    weight: float = Field(
        ..., ge=0, le=100, description="Percent of the experiment's members it serves."
    )
    overrides: Overrides = Field(
        default_factory=Overrides, description="Changes to the graph; none for a control."
    )


class Targeting(_Model):
    """Which members of the surface enter the experiment."""

    share: float = Field(
        1.0, ge=0, le=1, description="Fraction of the surface's members in the experiment."
    )
    allow_list: list[int] = Field(
        default_factory=list,
        max_length=10_000,
        description="When set, only these members can enter (the share applies among them).",
    )


class Experiment(_Model):
    """An A/B test: members are bucketed by a salted hash, so assignment is sticky."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Experiment name.")
    description: str = Field("", max_length=1000, description="What it tests, for people.")
    salt: str = Field(
        "", max_length=128, description="Hash salt; defaults to the name. A new salt reshuffles."
    )
    control: str = Field("", description="The control variant; defaults to the first variant.")
    targeting: Targeting = Field(default_factory=Targeting, description="Who is eligible.")
    variants: list[Variant] = Field(
        ..., min_length=1, max_length=16, description="Variants; weights sum to 100."
    )

    @model_validator(mode="after")
    def _variants(self) -> Experiment:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variants: duplicate variant names {dupes}")
        total = sum(v.weight for v in self.variants)
        if abs(total - 100.0) > 1e-6:
            raise ValueError(f"variants: weights must sum to 100, got {total:g}")
        if self.control and self.control not in names:
            raise ValueError(f"control: {self.control!r} is not a variant; variants: {names}")
        return self

    @property
    def control_variant(self) -> str:
        return self.control or self.variants[0].name


class Shadow(_Model):
    """A variant of the graph run on a share of requests, compared with and never served."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Shadow name.")
    share: float = Field(
        ..., gt=0, le=1, description="Fraction of requests that also run the shadow."
    )
    overrides: Overrides = Field(..., description="How the shadow's graph differs.")


class WorkflowSpec(_Model):
    """A surface's workflow graph."""

    surface: str = Field(..., pattern=NAME_PATTERN, description="Surface served, e.g. pymk.")
    description: str = Field("", max_length=1000, description="What the surface is, for people.")
    budget_ms: int = Field(
        100, ge=1, le=60_000, description="Default end-to-end deadline of a request."
    )
    modes: Modes = Field(default_factory=Modes, description="The inference modes it runs in.")
    nodes: list[Node] = Field(
        ..., min_length=1, max_length=64, description="The graph's nodes, each naming its inputs."
    )
    output: str = Field(
        ..., max_length=63, description="Name of the node whose ranked list is served."
    )
    experiments: list[Experiment] = Field(
        default_factory=list,
        max_length=8,
        description="A/B experiments; a member can be in several, each bucketed on its own.",
    )
    shadows: list[Shadow] = Field(
        default_factory=list, max_length=4, description="Variants run in shadow, never served."
    )

    @model_validator(mode="after")
    def _remote_endpoints(self) -> WorkflowSpec:
        # A scoring.remote node that names no endpoint uses the remote mode's, so one value
        # (often ${SCORING_ADDR...}) serves every remote node of the workflow.
        remote = self.modes.remote
        for node in self.nodes:
            if remote is not None and node.op == "scoring.remote" and "endpoint" not in node.params:
                node.params = {**node.params, "endpoint": remote.endpoint}
        return self


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(..., pattern=NAME_PATTERN)
    namespace: str | None = None


class EdgeWorkflow(_Model):
    """The whole custom resource; `edgeflow validate` also accepts a bare spec."""

    api_version: Literal["edgeflow.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["EdgeWorkflow"] = KIND
    metadata: Metadata
    spec: WorkflowSpec
    status: dict[str, Any] | None = None
