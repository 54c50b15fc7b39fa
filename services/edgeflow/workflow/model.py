"""The EdgeWorkflow model: the YAML a user writes, the `spec` of the custom resource.

Field names are camelCase as in every Kubernetes API; unknown fields are errors, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

API_VERSION: Final = "edgeflow.dev/v1alpha1"
KIND: Final = "EdgeWorkflow"
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"

Fallback = Literal["empty", "passthrough", "fail"]
EventType = Literal["connect", "disconnect", "block", "dismiss", "follow", "profile_change"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


class Node(_Model):
    """One step of the graph."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Unique node name (DNS label).")
    op: str = Field(..., description="Operation, e.g. candidates.graph or scoring.onnx.")
    inputs: list[str] = Field(default_factory=list, description="Names of upstream nodes.")
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


class NearlineMode(_Model):
    """Recomputed by the nearline worker shortly after member events."""

    events: list[EventType] = Field(
        default_factory=lambda: list[EventType](["connect"]),
        min_length=1,
        description="Triggering events.",
    )


class Modes(_Model):
    online: OnlineMode = Field(default_factory=OnlineMode)
    offline: OfflineMode | None = None
    nearline: NearlineMode | None = None


class WorkflowSpec(_Model):
    """A surface's workflow graph."""

    surface: str = Field(..., pattern=NAME_PATTERN, description="Surface served, e.g. pymk.")
    description: str = Field("", max_length=1000)
    budget_ms: int = Field(
        100, ge=1, le=60_000, description="Default end-to-end deadline of a request."
    )
    modes: Modes = Field(default_factory=Modes)
    nodes: list[Node] = Field(..., min_length=1, max_length=64)
    output: str = Field(..., description="Name of the node whose ranked list is served.")


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
