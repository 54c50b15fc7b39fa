"""The ops a workflow node may use: what each consumes, produces and accepts as params.

Like Merlin's operator schemas, every op declares its input and output kinds, so wiring
errors are caught when a graph is validated, not when a request runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from edgeflow.features.schema import MODEL_COLUMNS
from edgeflow.workflow import endpoints


class Kind(StrEnum):
    CANDIDATES = "candidates"
    FEATURES = "features"
    SCORED = "scored"
    RANKED = "ranked"


class Params(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, allow_inf_nan=False
    )


# Blend weights travel as float32 to the merging service; bounded, so none overflows there.
MAX_WEIGHT = 1_000_000.0
Weight = Annotated[float, Field(ge=0, le=MAX_WEIGHT, allow_inf_nan=False)]
Quota = Annotated[int, Field(ge=0, le=1_000_000)]


class GraphParams(Params):
    """Friends of friends ranked by (weighted) common neighbours."""

    limit: int = Field(400, ge=1, le=5000, description="Most candidates to return.")
    weight: Literal["common", "adamic_adar"] = Field(
        "adamic_adar", description="Rank by plain common-neighbour count or Adamic-Adar weight."
    )
    min_common: int = Field(1, ge=1, le=1000, description="Fewest common neighbours to keep.")


class EbrParams(Params):
    """Embedding-based retrieval: nearest members by embedding cosine in Qdrant."""

    limit: int = Field(100, ge=1, le=5000, description="Most candidates to return.")


class PrecomputedParams(Params):
    """A list precomputed by the offline job or the nearline worker."""

    list: str = Field(
        ..., min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_.-]*$",
        description="Name of the precomputed list set (usually the surface).",
    )  # fmt: skip
    limit: int = Field(200, ge=1, le=5000, description="Most candidates to return.")


class PopularParams(Params):
    """Best-connected members, for cold start."""

    limit: int = Field(50, ge=1, le=5000, description="Most candidates to return.")
    within: Literal["all", "neighbourhood"] = Field(
        "all",
        description="all: the best-connected members; neighbourhood: first those best "
        "connected into the member's neighbourhood (its connections, or with none its "
        "nearest members by embedding), then the best-connected.",
    )
    max_degree: int | None = Field(
        None, ge=0, le=1_000_000_000,
        description="Serve only members with at most this many connections; unset: all.",
    )  # fmt: skip


class FetchParams(Params):
    """Entity features from Feast plus request-time pair features."""

    columns: list[str] = Field(
        default_factory=list, description="Feature columns to fetch; empty means all."
    )

    def model_post_init(self, _: object) -> None:
        unknown = sorted(set(self.columns) - set(MODEL_COLUMNS))
        if unknown:
            raise ValueError(f"unknown feature columns {unknown}; known: {list(MODEL_COLUMNS)}")


class OnnxParams(Params):
    """Score with a model from the registry."""

    model: str = Field(
        ..., min_length=1, max_length=63, pattern=r"^[a-z0-9][a-z0-9_.-]*$",
        description="Model name in the registry.",
    )  # fmt: skip
    version: str = Field(
        "latest",
        pattern=r"^(latest|stable|canary|v[0-9]+)$",
        description="Model version, or latest (with rollout aliases: stable, and the "
        "canary for its share of members), stable or canary.",
    )


class RemoteParams(Params):
    """Score with a model served over the Open Inference Protocol v2 (gRPC ModelInfer): the
    scoring service's own endpoint, Triton, KServe or MLServer. The node's timeoutMs is the
    deadline of the call, retries included."""

    endpoint: str = Field(
        "",
        validate_default=True,
        description=(
            "host:port of the model server; ${VAR} or ${VAR:-host:port} reads the gateway's "
            "environment when it calls. Defaults to spec.modes.remote.endpoint."
        ),
    )
    model: str = Field(
        ...,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Model name on that server.",
    )
    version: str = Field(
        "",
        pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$",
        description="Model version (the scoring service takes N or vN); empty: the server picks.",
    )
    input: str = Field(
        "features",
        min_length=1,
        max_length=128,
        description="Name of the model's one FP32 input tensor, [rows, columns].",
    )
    output: str = Field(
        "score", min_length=1, max_length=128, description="Output tensor holding the scores."
    )
    output_index: int | None = Field(
        None,
        ge=0,
        le=1023,
        description=(
            "Column of a [rows, n] output that holds the score (1: predict_proba's positive "
            "class); unset: the output must be one score per row."
        ),
    )
    columns: list[str] = Field(
        default_factory=list,
        description="Feature columns the model takes, in its order; empty: as fetched.",
    )
    retries: int = Field(
        1,
        ge=0,
        le=5,
        description="Further attempts after UNAVAILABLE or RESOURCE_EXHAUSTED, within timeoutMs.",
    )
    backoff_ms: int = Field(
        10, ge=1, le=10_000, description="Wait before the first retry; doubled for each next one."
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not value:
            raise ValueError(f"required: {endpoints.FORMS}, here or in spec.modes.remote.endpoint")
        return endpoints.check(value)

    def model_post_init(self, _: object) -> None:
        unknown = sorted(set(self.columns) - set(MODEL_COLUMNS))
        if unknown:
            raise ValueError(f"unknown feature columns {unknown}; known: {list(MODEL_COLUMNS)}")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"columns lists a column twice: {self.columns}")


FilterName = Literal["self", "connected", "blocked", "dismissed", "followed"]
ALL_FILTERS: tuple[FilterName, ...] = ("self", "connected", "blocked", "dismissed", "followed")
# A blend that names no filters: all but `followed` (whom the member follows stays a
# candidate for a connection; a surface of members to follow lists it).
DEFAULT_FILTERS: tuple[FilterName, ...] = ("self", "connected", "blocked", "dismissed")
# Every served list goes through these (and the deactivated filter); a blend must keep them.
SAFETY_FILTERS: tuple[FilterName, ...] = ("self", "connected", "blocked")


class ImpressionsParams(Params):
    """Members shown to the member again and again without an action (connect, dismiss,
    block, follow) are demoted, then suppressed; counted from the gateway's exposures."""

    demote_after: int = Field(
        3, ge=1, le=1000, description="Exposures after which a member's blended score is demoted."
    )
    suppress_after: int = Field(
        6, ge=1, le=1000, description="Exposures after which a member is not shown (suppressed)."
    )
    for_days: float = Field(
        14.0, gt=0, le=365,
        description="Days a pair's count lasts after its last exposure (so a suppressed member "
        "returns this long after it was last shown).",
    )  # fmt: skip
    demote_factor: float = Field(
        0.5, ge=0, le=1, description="Multiplies a demoted member's blended score."
    )

    @model_validator(mode="after")
    def _order(self) -> ImpressionsParams:
        if self.suppress_after <= self.demote_after:
            raise ValueError(
                f"suppressAfter ({self.suppress_after}) must be greater than demoteAfter "
                f"({self.demote_after})"
            )
        return self


# Diversity's cost per Merge grows with pool x pool and window steps: kept small (see
# merging/diversity.py and benchmarks/diversity_cost.py).
MAX_DIVERSITY_POOL = 300
MAX_DIVERSITY_WINDOW = 100


class DiversityParams(Params):
    """Re-rank the served list for diversity (MMR over the members' mutual connections):
    the first `window` positions are picked from the best `pool` items, trading blended
    score against similarity to the items already placed."""

    lam: float = Field(
        0.7, ge=0, le=1, alias="lambda",
        description="MMR's trade-off: 1 keeps the blended order, 0 picks by novelty alone.",
    )  # fmt: skip
    window: int = Field(
        10, ge=1, le=MAX_DIVERSITY_WINDOW, description="Positions re-ranked (the first ones)."
    )
    pool: int = Field(
        100, ge=1, le=MAX_DIVERSITY_POOL,
        description="Best items (after filters, quotas and impressions) they are picked "
        "from; at least window. Above the request's k, items from below it can be served.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _order(self) -> DiversityParams:
        if self.pool < self.window:
            raise ValueError(f"pool ({self.pool}) must be at least window ({self.window})")
        return self


class BlendParams(Params):
    """Blend, dedup, filter, apply quotas and cut to the request's top K."""

    weights: dict[str, Weight] = Field(
        default_factory=dict,
        description=f"Blend weight per input node (default 1), 0..{MAX_WEIGHT:,.0f}.",
    )
    quotas: dict[str, Quota] = Field(
        default_factory=dict, description="Most edges per candidate source node."
    )
    filters: list[FilterName] = Field(
        default_factory=lambda: list(DEFAULT_FILTERS),
        description="Visibility filters to apply (`followed`: whom the member follows).",
    )
    impressions: ImpressionsParams | None = Field(
        None, description="Demote, then suppress, members shown repeatedly without an action; "
        "unset: off.",
    )  # fmt: skip
    diversity: DiversityParams | None = Field(
        None, description="Re-rank the served list for diversity (MMR); unset: off."
    )


class FilterParams(Params):
    """A visibility filter node has no params."""


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: frozenset[Kind]  # kinds accepted as inputs
    min_inputs: int
    max_inputs: int
    output: Kind | None  # None: same kind as its input
    params: type[Params]
    fallbacks: frozenset[str]  # fallback policies that make sense for this op
    description: str


_CANDS = frozenset({Kind.CANDIDATES})
_SOURCE_FALLBACKS = frozenset({"empty", "fail"})
# Visibility decides what a member may see, so it never degrades to "skip the filter".
_STRICT = frozenset({"fail"})

OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("candidates.graph", frozenset(), 0, 0, Kind.CANDIDATES, GraphParams,
               _SOURCE_FALLBACKS, "Friends of friends with common-neighbour counts."),
        OpSpec("candidates.ebr", frozenset(), 0, 0, Kind.CANDIDATES, EbrParams,
               _SOURCE_FALLBACKS, "Nearest members by embedding (Qdrant)."),
        OpSpec("candidates.precomputed", frozenset(), 0, 0, Kind.CANDIDATES, PrecomputedParams,
               _SOURCE_FALLBACKS, "Lists written by the offline job or nearline worker."),
        OpSpec("candidates.popular", frozenset(), 0, 0, Kind.CANDIDATES, PopularParams,
               _SOURCE_FALLBACKS, "Best-connected members (cold start)."),
        OpSpec("features.fetch", _CANDS, 1, 16, Kind.FEATURES, FetchParams,
               frozenset({"passthrough", "fail"}),
               "Feast entity features and request-time pair features."),
        OpSpec("scoring.onnx", frozenset({Kind.FEATURES}), 1, 1, Kind.SCORED, OnnxParams,
               frozenset({"passthrough", "fail"}), "Score with a registry ONNX model."),
        OpSpec("scoring.remote", frozenset({Kind.FEATURES}), 1, 1, Kind.SCORED, RemoteParams,
               frozenset({"passthrough", "fail"}),
               "Score with a model server over the Open Inference Protocol v2."),
        OpSpec("merge.blend", frozenset({Kind.CANDIDATES, Kind.SCORED}), 1, 16, Kind.RANKED,
               BlendParams, _STRICT, "Blend, dedup, filter, quotas and top-K with provenance."),
        *(
            OpSpec(f"filter.{f}", frozenset({Kind.CANDIDATES, Kind.SCORED}), 1, 1, None,
                   FilterParams, _STRICT, f"Drop the {f} members before later nodes.")
            for f in ALL_FILTERS
        ),
    )
}  # fmt: skip
