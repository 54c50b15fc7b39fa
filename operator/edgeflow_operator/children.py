"""The objects one EdgeWorkflow becomes: pure functions from (resource, workflow, config).

- a ConfigMap with the compiled workflow (`workflow.yaml`), which the gateway, the nearline
  worker and the offline job read from a mounted directory (EDGEFLOW_WORKFLOWS);
- online mode: a gateway Deployment and Service per workflow, so a surface is isolated from
  the others, scales on its own (HPA) and rolls out on its own;
- offline mode: a CronJob whose Job is Indexed, one completion per shard;
- nearline mode: a worker Deployment (a Redis Streams consumer group, so it scales out);
- an HPA for the gateway or the worker when autoscaling is asked for;
- availability, as the chart gives its own services (`availability`): the gateway's and the
  worker's pods spread over nodes and zones (soft), and a PodDisruptionBudget (maxUnavailable
  1) for each of the two that may run two or more replicas, so a drain never takes them all.

With the chart's TLS on (`tlsSecret`), every pod mounts that Secret at /etc/edgeflow/tls
(EDGEFLOW_TLS_DIR) and the probes GET /healthz on the metrics port instead of gRPC.
With `redisUrlSecret` / `qdrantApiKeySecret` (the chart's redis.existingSecret and
qdrant.existingSecret), every pod reads REDIS_URL / QDRANT_API_KEY from that Secret in its
own namespace (valueFrom.secretKeyRef): the operator names the Secret and never sees the value.

Every pod template carries a hash of the compiled workflow, so a spec change rolls the
Deployments even before the kubelet refreshes the mounted ConfigMap.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml

from edgeflow.workflow.compiled import Workflow
from edgeflow.workflow.model import API_VERSION, KIND
from edgeflow_operator.config import (
    DEFAULT_MAX_REPLICAS,
    Autoscaling,
    Component,
    OperatorConfig,
)

Manifest = dict[str, Any]

WORKFLOW_FILE: Final = "workflow.yaml"
WORKFLOWS_DIR: Final = "/etc/edgeflow/workflows"
HASH_ANNOTATION: Final = "edgeflow.dev/config-hash"
WORKFLOW_LABEL: Final = "edgeflow.dev/workflow"
MANAGED_BY: Final = "edgeflow-operator"
# Per-workflow replica overrides: "3" (fixed) or "2-10" (an HPA between the two).
REPLICAS_ANNOTATIONS: Final = {
    "gateway": "edgeflow.dev/gateway-replicas",
    "nearline": "edgeflow.dev/nearline-replicas",
}

# Every kind the operator may create, for pruning children a spec change made unneeded.
CHILD_KINDS: Final = (
    "ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
    "CronJob",
)  # fmt: skip


@dataclass(frozen=True)
class Owner:
    """The parts of the EdgeWorkflow resource its children need."""

    name: str
    namespace: str
    uid: str
    annotations: Mapping[str, str]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Owner:
        meta = body.get("metadata", {})
        return cls(
            name=str(meta["name"]),
            namespace=str(meta.get("namespace") or "default"),
            uid=str(meta.get("uid", "")),
            annotations=dict(meta.get("annotations") or {}),
        )

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


class AnnotationError(ValueError):
    """An edgeflow.dev/* annotation the operator cannot use."""


@dataclass(frozen=True)
class Scaling:
    replicas: int
    autoscaling: Autoscaling | None


def scaling(
    owner: Owner, component: str, cfg: Component, cap: int = DEFAULT_MAX_REPLICAS
) -> Scaling:
    """Replicas and autoscaling of a component: the chart's defaults or the annotation, which
    may ask for at most `cap` replicas (the chart's operator.maxReplicas)."""
    key = REPLICAS_ANNOTATIONS[component]
    raw = owner.annotations.get(key)
    if raw is None:
        return Scaling(cfg.replicas, cfg.autoscaling if cfg.autoscaling.enabled else None)
    m = re.fullmatch(r"\s*(\d{1,4})\s*(?:-\s*(\d{1,4})\s*)?", raw)
    if m is None:
        raise AnnotationError(
            f"annotation {key}: {raw!r} is not a replica count ('3') or a range ('2-10')"
        )
    low, high = int(m.group(1)), m.group(2)
    most = max(low, int(high or 0))
    if most > cap:
        raise AnnotationError(
            f"annotation {key}: {raw!r} asks for {most} replicas; at most {cap} "
            "(the chart's operator.maxReplicas)"
        )
    if high is None:
        return Scaling(low, None)
    try:
        hpa = Autoscaling(
            enabled=True,
            min_replicas=low,
            max_replicas=int(high),
            target_cpu_utilization_percentage=cfg.autoscaling.target_cpu_utilization_percentage,
        )
    except ValueError as exc:
        problem = str(exc).splitlines()[-1].strip().removeprefix("Value error, ")
        raise AnnotationError(f"annotation {key}: {raw!r}: {problem}") from None
    return Scaling(low, hpa)


def child_name(owner: str, suffix: str, limit: int = 63) -> str:
    """`<workflow>-<suffix>`, a valid DNS-1035 label (Services need a leading letter)."""
    base = owner if owner[:1].isalpha() else f"ewf-{owner}"
    name = f"{base}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(owner.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 2
    return f"{base[:keep].rstrip('-')}-{digest}-{suffix}"


def compiled_document(wf: Workflow, owner: Owner) -> dict[str, Any]:
    """The validated graph with every default filled in, nodes in topological order."""
    spec = wf.spec.model_dump(by_alias=True, mode="json", exclude={"nodes"}, exclude_none=True)
    spec["nodes"] = [
        {
            "name": cn.node.name,
            "op": cn.node.op,
            "inputs": list(cn.node.inputs),
            "params": cn.params.model_dump(by_alias=True, mode="json"),
            "timeoutMs": cn.node.timeout_ms,
            "fallback": cn.fallback,
        }
        for cn in wf.nodes
    ]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": owner.name, "namespace": owner.namespace},
        "spec": spec,
    }


def compiled_yaml(wf: Workflow, owner: Owner) -> str:
    return yaml.safe_dump(compiled_document(wf, owner), sort_keys=False)


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _labels(owner: Owner, wf: Workflow, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "edgeflow",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "edgeflow",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        WORKFLOW_LABEL: owner.name,
        "edgeflow.dev/surface": wf.surface,
    }


def _selector(owner: Owner, component: str) -> dict[str, str]:
    # Immutable in a Deployment: only what never changes for this child.
    return {WORKFLOW_LABEL: owner.name, "app.kubernetes.io/component": component}


def _meta(owner: Owner, wf: Workflow, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": _labels(owner, wf, component),
        "ownerReferences": [owner.reference()],
    }


def _container(
    cfg: OperatorConfig,
    name: str,
    args: list[str],
    port: int | None,
    resources: dict[str, Any],
    http_port: int = 0,
) -> dict[str, Any]:
    env = {
        **cfg.env,
        "EDGEFLOW_WORKFLOWS": WORKFLOWS_DIR,
        "EDGEFLOW_RELOAD_INTERVAL_S": f"{cfg.reload_interval_s:g}",
        "EDGEFLOW_HOME": "/tmp/edgeflow",
    }
    if port is not None:
        env["PORT"] = str(port)
        env["BIND_HOST"] = "0.0.0.0"  # the pod's own network (the default is loopback)
    if http_port:  # /metrics, and /healthz for the probes with TLS
        env["METRICS_PORT"] = str(http_port)
        env["METRICS_HOST"] = "0.0.0.0"
    entries: dict[str, dict[str, Any]] = {k: {"name": k, "value": v} for k, v in env.items()}
    for var, ref in cfg.secret_env().items():  # the Secret's key, never its value
        entries[var] = {
            "name": var,
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
        }
    container: dict[str, Any] = {
        "name": name,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["edgeflow"],
        "args": args,
        "env": [entries[k] for k in sorted(entries)],
        "resources": resources,
        "securityContext": cfg.security_context,
        "volumeMounts": [
            {"name": "workflow", "mountPath": WORKFLOWS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if port is not None:
        container["ports"] = [{"name": "grpc", "containerPort": port, "protocol": "TCP"}]
    if http_port:
        port_name = "metrics" if cfg.metrics_port else "health"  # health: TLS on, metrics off
        metrics = {"name": port_name, "containerPort": http_port, "protocol": "TCP"}
        container.setdefault("ports", []).append(metrics)
    return container


def _scrape_annotations(metrics_port: int) -> dict[str, str]:
    """Where annotation-based Prometheus discovery finds the pod's /metrics."""
    if not metrics_port:
        return {}
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(metrics_port),
        "prometheus.io/path": "/metrics",
    }


def _pod_spec(cfg: OperatorConfig, config_map: str, container: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": cfg.pod_security_context,
        "terminationGracePeriodSeconds": 15,
        "containers": [container],
        "volumes": [
            {"name": "workflow", "configMap": {"name": config_map}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
        ],
    }
    if cfg.service_account_name:
        spec["serviceAccountName"] = cfg.service_account_name
    if cfg.image_pull_secrets:
        spec["imagePullSecrets"] = cfg.image_pull_secrets
    if cfg.node_selector:
        spec["nodeSelector"] = cfg.node_selector
    if cfg.tolerations:
        spec["tolerations"] = cfg.tolerations
    return spec


def _set_env(container: dict[str, Any], **values: str) -> None:
    """Set plain env values, keeping the other entries (valueFrom ones too), sorted by name."""
    entries = {e["name"]: e for e in container["env"]}
    entries.update({k: {"name": k, "value": v} for k, v in values.items()})
    container["env"] = [entries[k] for k in sorted(entries)]


AUTH_DIR = "/etc/edgeflow/auth"


def _with_api_keys(container: dict[str, Any], pod: dict[str, Any], secret: str) -> None:
    """The gateway checks callers' keys against the Secret's keys.json, mounted read-only
    (only that item: the admin key itself stays out of the pod). The kubelet refreshes the
    file when the Secret changes, and the gateway reads it again."""
    _set_env(container, EDGEFLOW_AUTH="on", EDGEFLOW_AUTH_KEYS=f"{AUTH_DIR}/keys.json")
    container["volumeMounts"].append({"name": "auth", "mountPath": AUTH_DIR, "readOnly": True})
    pod["volumes"].append({"name": "auth", "secret": {
        "secretName": secret, "items": [{"key": "keys.json", "path": "keys.json"}],
    }})  # fmt: skip


TLS_DIR = "/etc/edgeflow/tls"
TLS_FILES = ("ca.crt", "tls.crt", "tls.key")


def _with_tls(container: dict[str, Any], pod: dict[str, Any], cfg: OperatorConfig) -> None:
    """gRPC over TLS (EDGEFLOW_TLS_DIR): the Secret's ca.crt, tls.crt and tls.key, mounted
    read-only as a whole directory (no subPath), so the kubelet swaps in a renewed
    certificate and the servers reload it."""
    _set_env(container, EDGEFLOW_TLS_DIR=TLS_DIR)
    container["volumeMounts"].append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    secret: dict[str, Any] = {
        "secretName": cfg.tls_secret,
        "items": [{"key": f, "path": f} for f in TLS_FILES],
    }
    if cfg.pod_security_context.get("fsGroup") is not None:
        secret["defaultMode"] = 0o440  # the key readable by the pod's group only
    pod["volumes"].append({"name": "tls", "secret": secret})


def _probes(port: int, cfg: OperatorConfig) -> dict[str, Any]:
    """The gRPC health service on the port; with TLS, which the kubelet's gRPC probes do not
    speak, GET /healthz on the HTTP port (200 while SERVING, 503 otherwise)."""
    check: dict[str, Any] = (
        {"httpGet": {"path": "/healthz", "port": cfg.http_port}}
        if cfg.tls_secret
        else {"grpc": {"port": port}}
    )
    return {
        "startupProbe": {**check, "periodSeconds": 2, "failureThreshold": 60},
        "readinessProbe": {**check, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**check, "periodSeconds": 10, "failureThreshold": 3},
    }


def _spread(owner: Owner, component: str, cfg: OperatorConfig) -> list[dict[str, Any]] | None:
    """Soft spread of the Deployment's own pods over each topology key, like the chart's
    services. None (not absent) without keys: the merge patch then removes constraints an
    earlier config set."""
    keys = cfg.availability.topology_keys
    if not keys:
        return None
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",  # a one-node or one-zone cluster still runs
            "labelSelector": {"matchLabels": _selector(owner, component)},
        }
        for key in keys
    ]


def _deployment(
    owner: Owner,
    wf: Workflow,
    cfg: OperatorConfig,
    component: str,
    comp: Component,
    scale: Scaling,
    config_map: str,
    digest: str,
) -> Manifest:
    container = _container(
        cfg, component, ["serve", component], comp.port, comp.resources, cfg.http_port
    )
    if comp.grpc_probes:
        container.update(_probes(comp.port, cfg))
    pod = _pod_spec(cfg, config_map, container)
    if component == "gateway" and cfg.auth_secret:
        _with_api_keys(container, pod, cfg.auth_secret)
    if cfg.tls_secret:
        _with_tls(container, pod, cfg)
    pod["topologySpreadConstraints"] = _spread(owner, component, cfg)
    spec: dict[str, Any] = {
        "revisionHistoryLimit": 3,
        "selector": {"matchLabels": _selector(owner, component)},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        "template": {
            "metadata": {
                "labels": {**cfg.pod_labels, **_labels(owner, wf, component)},
                "annotations": {
                    **cfg.pod_annotations,
                    **_scrape_annotations(cfg.metrics_port),
                    HASH_ANNOTATION: digest,
                },
            },
            "spec": pod,
        },
    }
    if scale.autoscaling is None:
        spec["replicas"] = scale.replicas  # with an HPA, the HPA owns the replica count
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, wf, child_name(owner.name, component), component),
        "spec": spec,
    }


def _hpa(owner: Owner, wf: Workflow, component: str, hpa: Autoscaling) -> Manifest:
    target = child_name(owner.name, component)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(owner, wf, target, component),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": hpa.min_replicas,
            "maxReplicas": hpa.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": hpa.target_cpu_utilization_percentage,
                        },
                    },
                }
            ],
        },
    }


def _most_replicas(scale: Scaling) -> int:
    """The most replicas the Deployment may run: its HPA's maximum, else its count."""
    return scale.autoscaling.max_replicas if scale.autoscaling is not None else scale.replicas


def _pdb(owner: Owner, wf: Workflow, component: str) -> Manifest:
    """At most one of the Deployment's pods evicted at a time (drains, node upgrades)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, wf, child_name(owner.name, component), component),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(owner, component)}},
    }


def _scaled(
    owner: Owner,
    wf: Workflow,
    cfg: OperatorConfig,
    component: str,
    config_map: str,
    digest: str,
) -> list[Manifest]:
    """A gateway's or worker's Deployment, then its Service, HPA and PodDisruptionBudget."""
    comp = cfg.gateway if component == "gateway" else cfg.nearline
    scale = scaling(owner, component, comp, cfg.max_replicas)
    made = [_deployment(owner, wf, cfg, component, comp, scale, config_map, digest)]
    if component == "gateway":
        made.append(_service(owner, wf, comp.port, cfg.metrics_port))
    if scale.autoscaling is not None:
        made.append(_hpa(owner, wf, component, scale.autoscaling))
    # One replica has nothing to keep up through a drain: a budget would only block it.
    if cfg.availability.pod_disruption_budget and _most_replicas(scale) >= 2:
        made.append(_pdb(owner, wf, component))
    return made


def _service(owner: Owner, wf: Workflow, port: int, metrics_port: int) -> Manifest:
    ports: list[dict[str, Any]] = [
        {"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP",
         "appProtocol": "grpc"},
    ]  # fmt: skip
    if metrics_port:  # what a ServiceMonitor selects
        ports.append(
            {"name": "metrics", "port": metrics_port, "targetPort": "metrics", "protocol": "TCP"}
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, wf, child_name(owner.name, "gateway"), "gateway"),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(owner, "gateway"),
            "ports": ports,
        },
    }


def _cron_job(
    owner: Owner, wf: Workflow, cfg: OperatorConfig, config_map: str, digest: str
) -> Manifest:
    offline = wf.spec.modes.offline
    assert offline is not None
    shards = offline.shards
    args = ["offline", "run", "--workflow", f"{WORKFLOWS_DIR}/{WORKFLOW_FILE}",
            "--shard", "$(JOB_COMPLETION_INDEX)", "--shards", str(shards)]  # fmt: skip
    container = _container(cfg, "offline", args, None, cfg.offline.resources)
    labels = _labels(owner, wf, "offline")
    pod_spec = _pod_spec(cfg, config_map, container)
    pod_spec["restartPolicy"] = "Never"
    if cfg.tls_secret:  # a client of the backends: it presents the certificate too
        _with_tls(container, pod_spec, cfg)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": _meta(owner, wf, child_name(owner.name, "offline", limit=52), "offline"),
        "spec": {
            "schedule": offline.schedule,
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 600,
            "successfulJobsHistoryLimit": cfg.offline.successful_jobs_history_limit,
            "failedJobsHistoryLimit": cfg.offline.failed_jobs_history_limit,
            "jobTemplate": {
                "metadata": {"labels": labels},
                "spec": {
                    "completionMode": "Indexed",
                    "completions": shards,
                    "parallelism": min(shards, cfg.offline.parallelism),
                    "backoffLimitPerIndex": cfg.offline.backoff_limit_per_index,
                    "activeDeadlineSeconds": cfg.offline.active_deadline_seconds,
                    "ttlSecondsAfterFinished": 86400,
                    "template": {
                        "metadata": {
                            "labels": {**cfg.pod_labels, **labels},
                            "annotations": {**cfg.pod_annotations, HASH_ANNOTATION: digest},
                        },
                        "spec": pod_spec,
                    },
                },
            },
        },
    }


def desired_children(owner: Owner, wf: Workflow, cfg: OperatorConfig) -> tuple[list[Manifest], str]:
    """Every child the workflow needs now, and the hash of its compiled graph.

    Raises AnnotationError for an unusable edgeflow.dev/* annotation.
    """
    text = compiled_yaml(wf, owner)
    digest = config_hash(text)
    cm_name = child_name(owner.name, "workflow")
    children: list[Manifest] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                **_meta(owner, wf, cm_name, "workflow"),
                "annotations": {HASH_ANNOTATION: digest},
            },
            "data": {WORKFLOW_FILE: text},
        }
    ]
    modes = wf.spec.modes
    if modes.online.enabled:
        children.extend(_scaled(owner, wf, cfg, "gateway", cm_name, digest))
    if modes.nearline is not None:
        children.extend(_scaled(owner, wf, cfg, "nearline", cm_name, digest))
    if modes.offline is not None:
        children.append(_cron_job(owner, wf, cfg, cm_name, digest))
    return children, digest


def possible_children(owner_name: str) -> list[tuple[str, str]]:
    """(kind, name) of every child any spec of this workflow could have, for pruning."""
    return [
        ("ConfigMap", child_name(owner_name, "workflow")),
        ("Deployment", child_name(owner_name, "gateway")),
        ("Service", child_name(owner_name, "gateway")),
        ("HorizontalPodAutoscaler", child_name(owner_name, "gateway")),
        ("PodDisruptionBudget", child_name(owner_name, "gateway")),
        ("Deployment", child_name(owner_name, "nearline")),
        ("HorizontalPodAutoscaler", child_name(owner_name, "nearline")),
        ("PodDisruptionBudget", child_name(owner_name, "nearline")),
        ("CronJob", child_name(owner_name, "offline", limit=52)),
    ]


def deployment_ready(obj: Mapping[str, Any]) -> tuple[bool, str]:
    """Like `kubectl rollout status`: the new revision is rolled out and available."""
    name = obj.get("metadata", {}).get("name", "?")
    spec, status = obj.get("spec", {}), obj.get("status") or {}
    want = int(spec.get("replicas", 1))
    generation = int(obj.get("metadata", {}).get("generation", 0))
    if int(status.get("observedGeneration", 0)) < generation:
        return False, f"Deployment {name}: rollout not observed yet"
    updated = int(status.get("updatedReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    if updated < want:
        return False, f"Deployment {name}: {updated}/{want} replicas updated"
    if available < want:
        return False, f"Deployment {name}: {available}/{want} replicas available"
    return True, f"Deployment {name}: {available}/{want} available"
