"""What the operator puts into every workflow's children: images, addresses, resources.

The Helm chart renders this as JSON into a ConfigMap mounted at EDGEFLOW_OPERATOR_CONFIG, so
the platform's choices (images, resources, autoscaling, security) live in the chart's values
and each EdgeWorkflow only says what the surface needs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

CONFIG_ENV = "EDGEFLOW_OPERATOR_CONFIG"
DEFAULT_MAX_REPLICAS = 50
# A label key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters.
_LABEL_KEY: Final = (
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


def _resources(cpu: str, memory: str, cpu_limit: str, memory_limit: str) -> dict[str, Any]:
    return {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"cpu": cpu_limit, "memory": memory_limit},
    }


class Autoscaling(_Model):
    """A HorizontalPodAutoscaler on CPU for a component's Deployment."""

    enabled: bool = False
    min_replicas: int = Field(1, ge=1, le=1000)
    max_replicas: int = Field(5, ge=1, le=1000)
    target_cpu_utilization_percentage: int = Field(
        70, ge=1, le=100, alias="targetCPUUtilizationPercentage"
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"maxReplicas ({self.max_replicas}) is below minReplicas ({self.min_replicas})"
            )
        return self


class Component(_Model):
    """A long-running per-workflow Deployment (the gateway or the nearline worker)."""

    replicas: int = Field(1, ge=0, le=1000)
    port: int = Field(..., ge=1, le=65535)
    resources: dict[str, Any]
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    grpc_probes: bool = Field(
        True,
        description="Probe the gRPC health service on the port (with tlsSecret: /healthz on "
        "the metrics port).",
    )


HOSTNAME_KEY: Final = "kubernetes.io/hostname"
ZONE_KEY: Final = "topology.kubernetes.io/zone"


class Availability(_Model):
    """How the gateways and nearline workers survive a node going away (the chart's
    `availability.*`, as its own services get it)."""

    pod_disruption_budget: bool = Field(
        True,
        description="A PodDisruptionBudget (maxUnavailable 1) for each gateway and nearline "
        "Deployment that may run two or more replicas (its replicas or its HPA's maximum).",
    )
    topology_keys: list[str] = Field(
        default_factory=lambda: [HOSTNAME_KEY, ZONE_KEY],
        max_length=8,
        description="Node labels each Deployment's pods are spread over (maxSkew 1, "
        "whenUnsatisfiable ScheduleAnyway); empty: no spread constraints.",
    )

    @model_validator(mode="after")
    def _keys(self) -> Availability:
        for key in self.topology_keys:
            if not re.fullmatch(_LABEL_KEY, key):
                raise ValueError(f"topologyKeys: {key!r} is not a node label key")
        if len(set(self.topology_keys)) != len(self.topology_keys):
            raise ValueError(f"topologyKeys: {self.topology_keys} names a key twice")
        return self


class Offline(_Model):
    """The offline CronJob: one Indexed Job of `shards` completions per run."""

    resources: dict[str, Any] = Field(default_factory=lambda: _resources("500m", "1Gi", "2", "4Gi"))
    parallelism: int = Field(4, ge=1, le=1024, description="Most shards running at once.")
    backoff_limit_per_index: int = Field(2, ge=0, le=100)
    active_deadline_seconds: int = Field(6 * 3600, ge=60)
    successful_jobs_history_limit: int = Field(1, ge=0, le=10)
    failed_jobs_history_limit: int = Field(3, ge=0, le=10)


class SecretKeyRef(_Model):
    """A key of a Secret in the workflow's namespace, read into a child's env var through
    valueFrom.secretKeyRef (the value itself never passes through the operator)."""

    name: str = Field(
        "",
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$",
        max_length=253,
        description="The Secret; empty: none (the variable, if any, is a plain env value).",
    )
    key: str = Field(..., pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)


# Variables a child may read from a Secret instead of `env`: the field of OperatorConfig
# naming the Secret, by variable.
SECRET_ENV: Final = {"REDIS_URL": "redis_url_secret", "QDRANT_API_KEY": "qdrant_api_key_secret"}


class OperatorConfig(_Model):
    image: str = "edgeflow:dev"
    image_pull_policy: str = Field("IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")
    image_pull_secrets: list[dict[str, str]] = Field(default_factory=list)
    service_account_name: str = ""
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of every child container: REDIS_URL (unless "
        "redisUrlSecret names a Secret), QDRANT_URL, the *_ADDR of the shared services, "
        "OTEL_EXPORTER_OTLP_ENDPOINT, LOG_LEVEL.",
    )
    reload_interval_s: float = Field(2.0, gt=0, alias="reloadIntervalSeconds")
    max_replicas: int = Field(
        DEFAULT_MAX_REPLICAS,
        ge=1,
        le=1000,
        description="Most replicas a workflow's replicas annotation may ask for.",
    )
    auth_secret: str = Field(
        "",
        description="Secret whose keys.json holds the API keys every workflow's gateway "
        "checks (edgeflow.shell.auth); empty: the gateways take calls without keys.",
    )
    gateway: Component = Field(
        default_factory=lambda: Component(
            port=50060, resources=_resources("100m", "256Mi", "1", "512Mi")
        )
    )
    nearline: Component = Field(
        default_factory=lambda: Component(
            port=50065, resources=_resources("100m", "256Mi", "1", "1Gi")
        )
    )
    offline: Offline = Field(default_factory=Offline)
    availability: Availability = Field(default_factory=Availability)
    pod_security_context: dict[str, Any] = Field(
        default_factory=lambda: {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    )
    security_context: dict[str, Any] = Field(
        default_factory=lambda: {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Prometheus /metrics port of the gateway and nearline containers "
        "(METRICS_PORT, a port named metrics, prometheus.io/* pod annotations); 0: none.",
    )
    tls_secret: str = Field(
        "",
        description="Secret with ca.crt, tls.crt and tls.key (a cert-manager Certificate's) "
        "that every child mounts at /etc/edgeflow/tls (EDGEFLOW_TLS_DIR): gRPC over TLS, "
        "mutual towards the backends. The gateway's and worker's probes then GET /healthz on "
        "the metrics port, as the kubelet's gRPC probes speak no TLS. Empty: plaintext.",
    )
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="With tlsSecret and metricsPort 0 (metrics off): the port of the HTTP "
        "server (METRICS_PORT) whose /healthz the probes ask; 0: metricsPort.",
    )
    redis_url_secret: SecretKeyRef = Field(
        default_factory=lambda: SecretKeyRef(key="redis-url"),
        description="The Secret key holding REDIS_URL (the chart's redis.existingSecret), "
        "which every child then reads through valueFrom.secretKeyRef; it must exist in each "
        "namespace the operator serves. Empty name: REDIS_URL comes from env.",
    )
    qdrant_api_key_secret: SecretKeyRef = Field(
        default_factory=lambda: SecretKeyRef(key="api-key"),
        description="The Secret key holding QDRANT_API_KEY (the chart's "
        "qdrant.existingSecret), read by every child like redisUrlSecret. Empty name: none.",
    )
    pod_labels: dict[str, str] = Field(default_factory=dict)
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    ready_interval_s: float = Field(10.0, gt=0, alias="readyIntervalSeconds")

    @model_validator(mode="after")
    def _health_port_for_tls(self) -> OperatorConfig:
        if self.tls_secret and not self.http_port:
            raise ValueError(
                "tlsSecret needs metricsPort or healthPort: with TLS the probes GET /healthz there"
            )
        return self

    @model_validator(mode="after")
    def _secrets_not_in_env(self) -> OperatorConfig:
        for var, name in SECRET_ENV.items():
            ref: SecretKeyRef = getattr(self, name)
            if ref.name and var in self.env:
                raise ValueError(
                    f"{to_camel(name)} names Secret {ref.name!r} for {var}, which env sets "
                    "too: keep the value in the Secret only"
                )
        return self

    def secret_env(self) -> dict[str, SecretKeyRef]:
        """Variables every child reads from a Secret, by name (only the configured ones)."""
        refs = {var: getattr(self, name) for var, name in SECRET_ENV.items()}
        return {var: ref for var, ref in refs.items() if ref.name}

    @property
    def http_port(self) -> int:
        """The port of a gateway's or worker's HTTP server (METRICS_PORT): /metrics when
        metrics are on, /healthz for the probes when TLS is; 0: none."""
        if self.metrics_port:
            return self.metrics_port
        return self.health_port if self.tls_secret else 0


class ConfigError(ValueError):
    pass


def load(path: Path | None = None) -> OperatorConfig:
    """The config file named by EDGEFLOW_OPERATOR_CONFIG (YAML or JSON), else the defaults."""
    if path is None:
        raw = os.environ.get(CONFIG_ENV, "").strip()
        if not raw:
            return OperatorConfig()
        path = Path(raw)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the operator config: {exc.strerror}") from None
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON: {exc}") from None
    try:
        return OperatorConfig.model_validate(doc or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path}: invalid operator config: {problems}") from None
