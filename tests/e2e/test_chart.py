"""The Helm chart, the images and skaffold, on real tools: helm (installed by
scripts/install_k8s_tools.py), kubernetes-validate, kubectl against the API emulator."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from edgeflow_operator.children import Owner, desired_children
from edgeflow_operator.config import OperatorConfig
from edgeflow_operator.kube import KINDS
from kube_emulator import EmulatorThread

from edgeflow.config import REPO_ROOT
from edgeflow.workflow.validate import parse_document

CHART = REPO_ROOT / "charts" / "edgeflow"
TOOLS = REPO_ROOT / ".cache" / "k8s-tools"
HELM = TOOLS / "bin" / "helm"
KUBECTL = Path(sys.executable).parent / "kubectl"
K8S_VERSION = "1.33.0"

VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "external-stores-cluster-wide": [
        "--set", "redis.enabled=false", "--set", "redis.externalUrl=redis://redis.data:6379/0",
        "--set", "qdrant.enabled=false", "--set", "qdrant.externalUrl=http://qdrant.data:6333",
        "--set", "operator.clusterWide=true", "--set", "networkPolicies.enabled=true",
        "--set", "tracing.otlpEndpoint=http://otel-collector.observability:4317",
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
    ],
    "ephemeral-autoscaled-multi-namespace": [
        "--set", "redis.persistence.enabled=false", "--set", "qdrant.persistence.enabled=false",
        "--set", "models.persistence.enabled=false", "--set", "gateway.autoscaling.enabled=true",
        "--set", "operator.watchNamespaces={surfaces,experiments}",
        "--set", "networkPolicies.enabled=true", "--set", "imagePullSecrets[0].name=registry",
    ],
    "tls-existing-secret-metrics-off": [
        "--set", "tls.enabled=true", "--set", "tls.existingSecret=edgeflow-certs",
        "--set", "metrics.enabled=false",
    ],
    "tls-cert-manager-multi-namespace": [
        "--set", "tls.enabled=true", "--set", "tls.certManager.issuerRef.name=internal-ca",
        "--set", "tls.certManager.issuerRef.kind=ClusterIssuer",
        "--set", "tls.certManager.extraDnsNames={recs.example.com}",
        "--set", "operator.watchNamespaces={surfaces}",
    ],
    "tls-self-signed": ["--set", "tls.enabled=true", "--set", "tls.selfSigned=true"],
    "store-secrets": [
        "--set", "redis.enabled=false", "--set", "redis.existingSecret=redis-creds",
        "--set", "redis.existingSecretKey=url", "--set", "redis.externalPorts={7000,7001}",
        "--set", "qdrant.existingSecret=qdrant-key", "--set", "operator.watchNamespaces={surfaces}",
    ],
    "store-secrets-external-qdrant-tls": [
        "--set", "redis.enabled=false", "--set", "redis.existingSecret=redis-creds",
        "--set", "qdrant.enabled=false", "--set", "qdrant.externalUrl=https://qdrant.data:6333",
        "--set", "qdrant.existingSecret=qdrant-key", "--set", "qdrant.existingSecretKey=key.txt",
        "--set", "tls.enabled=true", "--set", "tls.existingSecret=edgeflow-certs",
    ],
    "services-only": [
        "--set", "operator.enabled=false", "--set", "services.merging.replicas=3",
        "--set", "models.existingClaim=shared-models", "--set", "image.tag=v9",
        "--set", "metrics.enabled=false",
    ],
    "availability-off": [
        "--set", "availability.podDisruptionBudget=false", "--set", "availability.topologyKey=",
        "--set", "availability.zoneTopologyKey=",
    ],
}  # fmt: skip


def helm(*args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    if not HELM.exists():
        pytest.fail(
            f"{HELM} is missing: scripts/setup.sh installs it (scripts/install_k8s_tools.py)"
        )
    base = {**os.environ, **(env or {})}
    for name in ("CACHE", "CONFIG", "DATA"):
        base[f"HELM_{name}_HOME"] = str(TOOLS / "helm" / name.lower())
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, env=base,
                          check=False, timeout=120)  # fmt: skip
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout if check else done.stdout + done.stderr


def render(*values: str, namespace: str = "edgeflow") -> list[dict[str, Any]]:
    text = helm("template", "demo", str(CHART), "--namespace", namespace, *values)
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_helm_lint_strict() -> None:
    for values in VALUE_SETS.values():
        out = helm("lint", "--strict", str(CHART), *values)
        assert "1 chart(s) linted, 0 chart(s) failed" in out


# Custom resources of other projects' CRDs: kubernetes-validate knows only built-in kinds.
FOREIGN_KINDS = {"ServiceMonitor", "Certificate", "Issuer"}


def kubernetes_validate(docs: list[dict[str, Any]], out: Path) -> None:
    out.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] not in FOREIGN_KINDS]))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict",
         "-k", K8S_VERSION, str(out)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "ERROR" not in done.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_manifests_pass_kubernetes_validate(name: str, tmp_path: Path) -> None:
    text = helm("template", "demo", str(CHART), "--include-crds", *VALUE_SETS[name])
    kubernetes_validate([d for d in yaml.safe_load_all(text) if d], tmp_path / "manifests.yaml")


def _pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_pod_is_locked_down_and_probed(name: str) -> None:
    docs = render(*VALUE_SETS[name])
    for where, pod in _pods(docs):
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert set(c["resources"]) == {"requests", "limits"}, where
            assert "livenessProbe" in c and (where.endswith("-operator")
                                             or "readinessProbe" in c), where  # fmt: skip
    tls = "tls.enabled=true" in VALUE_SETS[name]
    for svc in ("candidates", "features", "scoring", "merging"):
        (c,) = find(docs, "Deployment", f"demo-edgeflow-{svc}")["spec"]["template"]["spec"][
            "containers"
        ]
        port = c["ports"][0]["containerPort"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if tls:  # the kubelet's gRPC probes speak no TLS
                assert c[probe]["httpGet"] == {"path": "/healthz", "port": 9090}, svc
            else:
                assert c[probe]["grpc"] == {"port": port}, svc
        assert c["args"] == ["serve", svc]


def test_in_cluster_or_external_stores() -> None:
    docs = render()
    for store in ("redis", "qdrant"):
        sts = find(docs, "StatefulSet", f"demo-edgeflow-{store}")
        assert sts["spec"]["volumeClaimTemplates"], store
    redis_args = find(docs, "StatefulSet", "demo-edgeflow-redis")["spec"]["template"]["spec"][
        "containers"][0]["args"]  # fmt: skip
    # Acknowledged writes are on the volume before Redis answers.
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis_args[redis_args.index("--appendfsync") + 1] == "always"
    env = {e["name"]: e["value"] for e in find(docs, "Deployment", "demo-edgeflow-candidates")[
        "spec"]["template"]["spec"]["containers"][0]["env"]}  # fmt: skip
    assert env["REDIS_URL"] == "redis://demo-edgeflow-redis.edgeflow.svc:6379/0"
    assert env["QDRANT_URL"] == "http://demo-edgeflow-qdrant.edgeflow.svc:6333"
    assert env["SCORING_ADDR"] == "demo-edgeflow-scoring.edgeflow.svc:50063"
    # scoring.remote may call the release's own scoring service, and nothing else by default.
    assert env["EDGEFLOW_REMOTE_ENDPOINTS"] == "demo-edgeflow-scoring.edgeflow.svc:50063"
    more = render("--set", "remoteScoring.allowedEndpoints={*.models.svc:8001}")
    env = {e["name"]: e["value"] for e in find(more, "Deployment", "demo-edgeflow-candidates")[
        "spec"]["template"]["spec"]["containers"][0]["env"]}  # fmt: skip
    assert env["EDGEFLOW_REMOTE_ENDPOINTS"] == (
        "demo-edgeflow-scoring.edgeflow.svc:50063,*.models.svc:8001"
    )
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env

    external = render(*VALUE_SETS["external-stores-cluster-wide"])
    assert not [d for d in external if d["kind"] == "StatefulSet"]
    env = {e["name"]: e["value"] for e in find(external, "Deployment", "demo-edgeflow-features")[
        "spec"]["template"]["spec"]["containers"][0]["env"]}  # fmt: skip
    assert env["REDIS_URL"] == "redis://redis.data:6379/0"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    policies = {d["metadata"]["name"] for d in external if d["kind"] == "NetworkPolicy"}
    assert policies == {f"demo-edgeflow-{s}" for s in ("candidates", "features", "scoring",
                                                       "merging")}  # fmt: skip


def _env_of(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    containers = find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in containers[0]["env"]}


def test_qdrant_collections_and_an_external_redis_cluster(tmp_path: Path) -> None:
    env = _env_of(render(), "demo-edgeflow-candidates")
    assert [env[f"QDRANT_{k}"] for k in ("SHARDS", "REPLICAS", "HNSW_EF")] == ["1", "1", "128"]
    tuned = _env_of(render(
        "--set", "qdrant.collection.shards=6", "--set", "qdrant.collection.replicas=2",
        "--set", "qdrant.collection.quantization=int8"), "demo-edgeflow-features")  # fmt: skip
    assert (tuned["QDRANT_SHARDS"], tuned["QDRANT_REPLICAS"]) == ("6", "2")
    assert tuned["QDRANT_QUANTIZATION"] == "int8"
    with pytest.raises(AssertionError, match="quantization"):
        render("--set", "qdrant.collection.quantization=fp4")
    # A Redis Cluster named by two of its masters: every pod gets the URL, and the egress
    # policies open both masters' ports.
    values = tmp_path / "cluster.yaml"
    url = "redis+cluster://r0.data:7000,r1.data:7001"
    values.write_text(yaml.safe_dump({"redis": {"enabled": False, "externalUrl": url},
                                      "networkPolicies": {"enabled": True}}))  # fmt: skip
    docs = render("-f", str(values))
    assert _env_of(docs, "demo-edgeflow-merging")["REDIS_URL"] == url
    policy = find(docs, "NetworkPolicy", "demo-edgeflow-merging")
    ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {7000, 7001} <= ports


def _secret_refs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, variable, entry) of every env entry of every chart pod that names REDIS_URL,
    QDRANT_API_KEY or a Secret."""
    for where, pod in _pods(docs):
        for c in pod["containers"]:
            for e in c.get("env", []):
                if e["name"] in ("REDIS_URL", "QDRANT_API_KEY") or "secretKeyRef" in e.get(
                    "valueFrom", {}
                ):
                    yield where, e["name"], e


REDIS_REF = {"secretKeyRef": {"name": "redis-creds", "key": "url"}}
QDRANT_REF = {"secretKeyRef": {"name": "qdrant-key", "key": "api-key"}}


def test_store_credentials_come_from_secrets_and_appear_nowhere() -> None:
    text = helm("template", "demo", str(CHART), "--namespace", "edgeflow",
                *VALUE_SETS["store-secrets"])  # fmt: skip
    docs = [d for d in yaml.safe_load_all(text) if d]
    refs: dict[str, dict[str, Any]] = {}
    for where, var, entry in _secret_refs(docs):
        assert set(entry) == {"name", "valueFrom"}, (where, entry)  # no plain value beside
        refs.setdefault(where, {})[var] = entry["valueFrom"]
    backends = {f"Deployment/demo-edgeflow-{s}" for s in ("candidates", "features", "scoring",
                                                          "merging")}  # fmt: skip
    assert set(refs) == backends | {"StatefulSet/demo-edgeflow-qdrant"}
    for where in backends:
        assert refs[where] == {"REDIS_URL": REDIS_REF, "QDRANT_API_KEY": QDRANT_REF}, where
    # The in-cluster Qdrant requires the key; its probes (/readyz, /livez) need none.
    assert refs["StatefulSet/demo-edgeflow-qdrant"] == {"QDRANT__SERVICE__API_KEY": QDRANT_REF}
    # No URL of Redis anywhere: not in the pods, the NOTES' sources or the operator's config.
    assert "redis://" not in text and "rediss://" not in text
    raw = json.loads(find(docs, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    assert not {"REDIS_URL", "QDRANT_API_KEY"} & set(raw["env"])
    assert raw["redisUrlSecret"] == {"name": "redis-creds", "key": "url"}
    assert raw["qdrantApiKeySecret"] == {"name": "qdrant-key", "key": "api-key"}
    # The operator's children (here in a served namespace) read the same Secrets there.
    cfg = OperatorConfig.model_validate(raw)
    wf = parse_document(yaml.safe_load((REPO_ROOT / "examples" / "pymk.yaml").read_text()), "pymk")
    children, _ = desired_children(Owner("pymk", "surfaces", "uid-1", {}), wf, cfg)
    pods = {c["metadata"]["name"]: c["spec"]["template"]["spec"] for c in children
            if c["kind"] == "Deployment"}  # fmt: skip
    (cron,) = [c for c in children if c["kind"] == "CronJob"]
    pods["pymk-offline"] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for name, pod in pods.items():
        (c,) = pod["containers"]
        made = {e["name"]: e for e in c["env"] if "valueFrom" in e}
        assert made == {"REDIS_URL": {"name": "REDIS_URL", "valueFrom": REDIS_REF},
                        "QDRANT_API_KEY": {"name": "QDRANT_API_KEY",
                                           "valueFrom": QDRANT_REF}}, name  # fmt: skip

    # An external Qdrant with its key under another name, beside TLS.
    other = render(*VALUE_SETS["store-secrets-external-qdrant-tls"])
    key_ref = {"secretKeyRef": {"name": "qdrant-key", "key": "key.txt"}}
    redis_ref = {"secretKeyRef": {"name": "redis-creds", "key": "redis-url"}}  # the default key
    found = list(_secret_refs(other))
    assert len(found) == 8  # both variables in each of the four backends
    for where, var, entry in found:
        want = {"REDIS_URL": redis_ref, "QDRANT_API_KEY": key_ref}[var]
        assert entry == {"name": var, "valueFrom": want}, where
    raw = json.loads(find(other, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    assert raw["qdrantApiKeySecret"] == {"name": "qdrant-key", "key": "key.txt"}
    assert raw["env"]["QDRANT_URL"] == "https://qdrant.data:6333"

    # Without those values: plain REDIS_URL as before, no Secret named anywhere.
    plain = render()
    for where, var, entry in _secret_refs(plain):
        assert var == "REDIS_URL" and set(entry) == {"name", "value"}, (where, entry)
    raw = json.loads(find(plain, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    assert raw["env"]["REDIS_URL"] == "redis://demo-edgeflow-redis.edgeflow.svc:6379/0"
    assert not {"redisUrlSecret", "qdrantApiKeySecret"} & set(raw)


def test_egress_opens_the_redis_ports_the_values_name_when_the_url_is_secret() -> None:
    def egress(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        spec = find(docs, "NetworkPolicy", "demo-edgeflow-features")["spec"]
        assert len(spec["egress"]) == 3  # DNS, the release's pods, the external ports
        return list(spec["egress"][2]["ports"])

    assert egress(render(*VALUE_SETS["store-secrets"])) == [
        {"port": 7000, "protocol": "TCP"}, {"port": 7001, "protocol": "TCP"}]  # fmt: skip
    # redis.externalPorts defaults to Redis's own port; an external Qdrant adds its ports.
    assert egress(render(*VALUE_SETS["store-secrets-external-qdrant-tls"])) == [
        {"port": p, "protocol": "TCP"} for p in (6379, 6333, 6334)]  # fmt: skip
    # With the URL in the values, its ports, and redis.externalPorts is not used.
    assert egress(render("--set", "redis.enabled=false",
                         "--set", "redis.externalUrl=redis://redis.data:6380/0",
                         "--set", "redis.externalPorts={7000}")) == [
        {"port": 6380, "protocol": "TCP"}]  # fmt: skip


def test_network_policies_admit_only_this_release_and_limit_egress() -> None:
    release = {"matchLabels": {"app.kubernetes.io/instance": "demo"}}
    docs = render("--set", "operator.watchNamespaces={surfaces}")
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {f"demo-edgeflow-{c}" for c in (
        "redis", "qdrant", "candidates", "features", "scoring", "merging")}  # fmt: skip
    for name, spec in policies.items():
        assert spec["policyTypes"] == ["Ingress", "Egress"], name
        peers = spec["ingress"][0]["from"]
        # this namespace's release pods, and the release's pods in the served namespace
        assert peers == [
            {"podSelector": release},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "surfaces"}},
             "podSelector": release},
        ], name  # fmt: skip
        assert all(peer for rule in spec["ingress"] for peer in rule["from"])  # no open rule
        dns, own = spec["egress"][:2]
        assert {p["port"] for p in dns["ports"]} == {53}
        assert own == {"to": [{"podSelector": release}]}
        assert len(spec["egress"]) == 2, name  # nothing outside unless the values say so
    assert policies["demo-edgeflow-redis"]["ingress"][0]["ports"] == [
        {"port": 6379, "protocol": "TCP"}]  # fmt: skip

    external = render("--set", "redis.enabled=false",
                      "--set", "redis.externalUrl=redis://redis.data:6380/0",
                      "--set", "tracing.otlpEndpoint=http://otel.observability:4317",
                      "--set", "operator.clusterWide=true")  # fmt: skip
    spec = find(external, "NetworkPolicy", "demo-edgeflow-features")["spec"]
    assert spec["egress"][2] == {"ports": [{"port": 6380, "protocol": "TCP"},
                                           {"port": 4317, "protocol": "TCP"}]}  # fmt: skip
    assert {"namespaceSelector": {}, "podSelector": release} in spec["ingress"][0]["from"]
    assert not [d for d in render("--set", "networkPolicies.enabled=false")
                if d["kind"] == "NetworkPolicy"]  # fmt: skip


def _operator_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(
        find(docs, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"]
    )
    return raw


def _workflow_children(raw: dict[str, Any], annotations: dict[str, str]) -> list[dict[str, Any]]:
    """What the operator makes, with the chart's config.json, of the pymk example."""
    wf = parse_document(yaml.safe_load((REPO_ROOT / "examples" / "pymk.yaml").read_text()), "pymk")
    owner = Owner("pymk", "edgeflow", "uid-1", annotations)
    return desired_children(owner, wf, OperatorConfig.model_validate(raw))[0]


SPREAD_KEYS = ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]


def _spread(dep: dict[str, Any]) -> list[str]:
    """The keys a Deployment's pods spread over, each softly and over exactly its own pods."""
    constraints = dep["spec"]["template"]["spec"].get("topologySpreadConstraints") or []
    for c in constraints:
        assert c["maxSkew"] == 1 and c["labelSelector"] == dep["spec"]["selector"]
        assert c["whenUnsatisfiable"] == "ScheduleAnyway"  # a one-node cluster still runs
    return [c["topologyKey"] for c in constraints]


def test_each_backend_survives_one_pod_or_node_going_away() -> None:
    docs = render()
    for name in ("candidates", "features", "scoring", "merging"):
        dep = find(docs, "Deployment", f"demo-edgeflow-{name}")
        assert dep["spec"]["replicas"] >= 2, name
        labels = dep["spec"]["selector"]["matchLabels"]
        assert _spread(dep) == SPREAD_KEYS[:1], name
        pdb = find(docs, "PodDisruptionBudget", f"demo-edgeflow-{name}")
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": labels}}
    operator_cfg = _operator_config(docs)
    # The workflows' gateways and nearline workers, which the operator makes.
    assert [operator_cfg[c]["replicas"] for c in ("gateway", "nearline")] == [2, 2], operator_cfg
    # One replica has nothing to keep up through a drain: no budget that would block it.
    single = render("--set", "services.merging.replicas=1")
    assert not [d for d in single if d["kind"] == "PodDisruptionBudget"
                and d["metadata"]["name"] == "demo-edgeflow-merging"]  # fmt: skip
    off = render("--set", "availability.podDisruptionBudget=false")
    assert not [d for d in off if d["kind"] == "PodDisruptionBudget"]
    # Zones on request (off by default: the scheduler would leave every node without the
    # zone label out of the spread, on a cluster that has none).
    zones = render("--set", f"availability.zoneTopologyKey={SPREAD_KEYS[1]}")
    assert _spread(find(zones, "Deployment", "demo-edgeflow-scoring")) == SPREAD_KEYS
    same = render("--set", "availability.zoneTopologyKey=kubernetes.io/hostname")
    assert _spread(find(same, "Deployment", "demo-edgeflow-scoring")) == SPREAD_KEYS[:1]


def test_workflow_gateways_and_workers_get_what_the_chart_gives_its_services(
    tmp_path: Path,
) -> None:
    docs = render()
    raw = _operator_config(docs)
    assert raw["availability"] == {"podDisruptionBudget": True, "topologyKeys": SPREAD_KEYS[:1]}
    # The chart's defaults: two replicas each, so both get a budget.
    made = _workflow_children(raw, {})
    deployments = {c["metadata"]["name"]: c for c in made if c["kind"] == "Deployment"}
    budgets = {c["metadata"]["name"]: c for c in made if c["kind"] == "PodDisruptionBudget"}
    assert set(deployments) == set(budgets) == {"pymk-gateway", "pymk-nearline"}
    for name, dep in deployments.items():
        assert _spread(dep) == SPREAD_KEYS[:1], name
        assert budgets[name]["spec"] == {"maxUnavailable": 1, "selector": dep["spec"]["selector"]}
        # the same shape as the chart's own budgets
        chart_pdb = find(docs, "PodDisruptionBudget", "demo-edgeflow-scoring")
        assert budgets[name]["apiVersion"] == chart_pdb["apiVersion"]
        assert budgets[name]["spec"].keys() == chart_pdb["spec"].keys()
    kubernetes_validate(made, tmp_path / "children.yaml")
    # One nearline replica: no budget for it.
    single = _workflow_children(raw, {"edgeflow.dev/nearline-replicas": "1"})
    assert [c["metadata"]["name"] for c in single if c["kind"] == "PodDisruptionBudget"] == [
        "pymk-gateway"
    ]

    # Availability off in the chart: off for the operator's children too.
    off = _operator_config(render(*VALUE_SETS["availability-off"]))
    assert off["availability"] == {"podDisruptionBudget": False, "topologyKeys": []}
    made = _workflow_children(off, {"edgeflow.dev/gateway-replicas": "3"})
    assert not [c for c in made if c["kind"] == "PodDisruptionBudget"]
    for dep in (c for c in made if c["kind"] == "Deployment"):
        assert _spread(dep) == [], dep["metadata"]["name"]
    zones = _operator_config(render("--set", f"availability.zoneTopologyKey={SPREAD_KEYS[1]}"))
    assert zones["availability"]["topologyKeys"] == SPREAD_KEYS


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        (["--set", "services.scoring.port=0"], "services.scoring.port"),
        (["--set", "redis.enabled=false"], "redis.externalUrl"),
        (["--set", "gatway.replicas=2"], "gatway"),
        (["--set", "logLevel=LOUD"], "logLevel"),
        (["--set", "operator.watchNamespaces={Bad_NS}"], "operator.watchNamespaces"),
        (["--set", "services.features.resources.requests.cpu=lots"], "cpu"),
        (["--set", "securityContext.allowPrivilegeEscalation=true"], "allowPrivilegeEscalation"),
        (["--set", "metrics.port=50062"], "metrics.port 50062 is also services.features.port"),
        (["--set", "metrics.port=50065"], "metrics.port 50065 is also nearline.port"),
        (["--set", "metrics.serviceMonitor.interval=soon"], "metrics.serviceMonitor.interval"),
        (["--set", "metrics.port=0"], "metrics.port"),
        (["--set", "availability.zoneTopologyKey=a zone"], "availability.zoneTopologyKey"),
        (["--set", "availability.topologyKey=-host"], "availability.topologyKey"),
        (["--set", "redis.persistence.appendfsync=sometimes"], "appendfsync"),
        (
            ["--set", "redis.existingSecret=redis-creds"],
            "redis.existingSecret holds the URL of an external Redis: set redis.enabled=false",
        ),
        (
            [
                "--set",
                "redis.enabled=false,redis.existingSecret=redis-creds,"
                "redis.externalUrl=rediss://u:p@redis.data:6380/0",
            ],
            "redis.existingSecret and redis.externalUrl are both set",
        ),
        (["--set", "redis.existingSecretKey=a/b"], "redis.existingSecretKey"),
        (["--set", "redis.externalPorts={0}"], "redis.externalPorts"),
        (["--set", "qdrant.existingSecret=Qdrant_Key"], "qdrant.existingSecret"),
        (["--set", "qdrant.existingSecretKey="], "qdrant.existingSecretKey"),
        (["--set", "tls.enabled=true"], "tls.enabled needs exactly one of"),
        (
            ["--set", "tls.enabled=true,tls.existingSecret=certs,tls.selfSigned=true"],
            "got tls.existingSecret, tls.selfSigned",
        ),
        (
            ["--set", "tls.enabled=true,tls.selfSigned=true,operator.watchNamespaces={surfaces}"],
            "tls.selfSigned keeps its CA",
        ),
        (["--set", "tls.certManager.issuerRef.kind=cluster issuer"], "tls.certManager"),
        (["--set", "tls.certManager.extraDnsNames={Bad_Name}"], "extraDnsNames"),
        (["--set", "tls.certManager.duration=90days"], "tls.certManager.duration"),
        (
            [
                "--set",
                "tls.enabled=true,tls.existingSecret=s,metrics.enabled=false,metrics.port=50060",
            ],
            "metrics.port 50060 is also gateway.port",
        ),
    ],
)
def test_bad_values_fail_with_the_key(values: list[str], problem: str) -> None:
    out = helm("template", "demo", str(CHART), *values, check=False)
    assert "Error" in out and problem in out, out


SCRAPE = {"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
          "prometheus.io/path": "/metrics"}  # fmt: skip


def _scraped(template: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any], dict[str, str]]:
    """A pod template's prometheus.io annotations, its metrics port and its env."""
    annotations = template["metadata"].get("annotations") or {}
    (c,) = template["spec"]["containers"]
    ports = {p["name"]: p for p in c.get("ports", [])}
    env = {e["name"]: e["value"] for e in c["env"]}
    scrape = {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")}
    return scrape, ports.get("metrics", {}), env


def test_every_edgeflow_pod_is_scraped_on_a_port_named_metrics() -> None:
    docs = render()
    for svc in ("candidates", "features", "scoring", "merging"):
        scrape, port, env = _scraped(
            find(docs, "Deployment", f"demo-edgeflow-{svc}")["spec"]["template"]
        )
        assert scrape == SCRAPE, svc
        assert port == {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}, svc
        assert env["METRICS_PORT"] == "9090", svc
        service_ports = {p["name"]: p for p in find(docs, "Service", f"demo-edgeflow-{svc}")[
            "spec"]["ports"]}  # fmt: skip
        assert service_ports["metrics"]["targetPort"] == "metrics", svc
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]  # off unless asked for
    # The gateway and nearline worker of a workflow are the operator's: it reads the port
    # from the chart's config and writes the same annotations, port and env.
    raw = json.loads(find(docs, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    cfg = OperatorConfig.model_validate(raw)
    assert cfg.metrics_port == 9090
    wf = parse_document(yaml.safe_load((REPO_ROOT / "examples" / "pymk.yaml").read_text()), "pymk")
    children, _ = desired_children(Owner("pymk", "surfaces", "uid-1", {}), wf, cfg)
    made = {(c["kind"], c["metadata"]["name"]): c for c in children}
    for name in ("pymk-gateway", "pymk-nearline"):
        scrape, port, env = _scraped(made["Deployment", name]["spec"]["template"])
        assert scrape == SCRAPE and port["containerPort"] == 9090, name
        assert env["METRICS_PORT"] == "9090", name
    gateway_ports = {p["name"] for p in made["Service", "pymk-gateway"]["spec"]["ports"]}
    assert gateway_ports == {"grpc", "metrics"}
    (cron,) = [c for c in children if c["kind"] == "CronJob"]  # a batch job serves no metrics
    assert "METRICS_PORT" not in _scraped(cron["spec"]["jobTemplate"]["spec"]["template"])[2]


def test_service_monitor_when_enabled_and_nothing_when_metrics_are_off() -> None:
    docs = render(*VALUE_SETS["external-stores-cluster-wide"])
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["selector"] == {"matchLabels": {"app.kubernetes.io/part-of": "edgeflow"}}
    assert spec["namespaceSelector"] == {"any": True}  # the operator serves every namespace
    assert spec["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    # Each Service the monitor selects carries the port it names.
    for svc in ("candidates", "features", "scoring", "merging"):
        service = find(docs, "Service", f"demo-edgeflow-{svc}")
        assert service["metadata"]["labels"]["app.kubernetes.io/part-of"] == "edgeflow"
        assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
        # With network policies on, Prometheus (from its namespace) still reaches /metrics.
        rules = find(docs, "NetworkPolicy", f"demo-edgeflow-{svc}")["spec"]["ingress"]
        monitoring = {"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}  # fmt: skip
        assert {"from": [monitoring], "ports": [{"port": 9090, "protocol": "TCP"}]} in rules
    scoped = render("--set", "metrics.serviceMonitor.enabled=true",
                    "--set", "operator.watchNamespaces={surfaces}")  # fmt: skip
    (monitor,) = [d for d in scoped if d["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["edgeflow", "surfaces"]}

    off = render(*VALUE_SETS["services-only"], "--set", "metrics.serviceMonitor.enabled=true")
    assert not [d for d in off if d["kind"] == "ServiceMonitor"]
    for where, pod in _pods(off):
        for c in pod["containers"]:
            assert "metrics" not in {p["name"] for p in c.get("ports", [])}, where
            assert "METRICS_PORT" not in {e["name"] for e in c.get("env", [])}, where
    for d in off:
        if d["kind"] in ("Deployment", "StatefulSet"):
            annotations = d["spec"]["template"]["metadata"].get("annotations") or {}
            assert not any(k.startswith("prometheus.io/") for k in annotations)


def test_operator_config_in_the_chart_is_what_the_operator_reads() -> None:
    docs = render(*VALUE_SETS["ephemeral-autoscaled-multi-namespace"])
    raw = json.loads(find(docs, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    cfg = OperatorConfig.model_validate(raw)
    assert cfg.image == "edgeflow/edgeflow:0.1.0"
    assert cfg.gateway.autoscaling.enabled and cfg.gateway.port == 50060
    assert cfg.env["CANDIDATES_ADDR"] == "demo-edgeflow-candidates.edgeflow.svc:50061"
    assert cfg.image_pull_secrets == [{"name": "registry"}]
    deployment = find(docs, "Deployment", "demo-edgeflow-operator")["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    (c,) = deployment["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["args"][:2] == ["operator", "--liveness=http://0.0.0.0:8080/healthz"]
    assert sorted(a for a in c["args"] if a.startswith("--namespace=")) == [
        "--namespace=edgeflow", "--namespace=experiments", "--namespace=surfaces"
    ]  # fmt: skip
    roles = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"}
    assert roles == {"edgeflow", "experiments", "surfaces"}


def test_gateways_check_api_keys_from_a_secret() -> None:
    import base64
    import hashlib

    docs = render()
    secret = find(docs, "Secret", "demo-edgeflow-auth")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    key = data["admin.key"]
    assert key.startswith("ef_") and len(key) > 40
    (entry,) = json.loads(data["keys.json"])["keys"]
    assert entry["sha256"] == hashlib.sha256(key.encode()).hexdigest()
    assert entry["scopes"] == ["admin"]
    cfg = OperatorConfig.model_validate(
        json.loads(find(docs, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    )
    assert cfg.auth_secret == "demo-edgeflow-auth"
    # What the operator then makes: the gateway mounts only keys.json and checks keys.
    wf = parse_document(yaml.safe_load((REPO_ROOT / "examples" / "pymk.yaml").read_text()), "pymk")
    children, _ = desired_children(Owner("pymk", "edgeflow", "uid-1", {}), wf, cfg)
    gateway = next(c for c in children if c["kind"] == "Deployment"
                   and c["metadata"]["name"] == "pymk-gateway")  # fmt: skip
    pod = gateway["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["EDGEFLOW_AUTH"] == "on"
    assert env["EDGEFLOW_AUTH_KEYS"] == "/etc/edgeflow/auth/keys.json"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "auth"]
    assert volume["secret"] == {"secretName": "demo-edgeflow-auth",
                                "items": [{"key": "keys.json", "path": "keys.json"}]}  # fmt: skip
    others = [c for c in children if c["kind"] == "Deployment" and c is not gateway]
    for other in others:  # the nearline worker serves no API
        assert "EDGEFLOW_AUTH" not in str(other["spec"]["template"]["spec"]["containers"])

    own = render("--set", "auth.existingSecret=surface-keys")
    assert not [d for d in own if d["kind"] == "Secret"]
    raw = json.loads(find(own, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    assert raw["authSecret"] == "surface-keys"
    off = render("--set", "auth.enabled=false")
    raw = json.loads(find(off, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    assert raw["authSecret"] == "" and not [d for d in off if d["kind"] == "Secret"]


# ---- TLS --------------------------------------------------------------------------------------
TLS_SOURCES = {  # value set -> the Secret every pod mounts
    "tls-existing-secret-metrics-off": "edgeflow-certs",
    "tls-cert-manager-multi-namespace": "demo-edgeflow-tls",
    "tls-self-signed": "demo-edgeflow-tls",
}
TLS_DIR = "/etc/edgeflow/tls"


def _tls_mount(pod: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """The container's env and the Secret mounted read-only at EDGEFLOW_TLS_DIR (or None)."""
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    mounts = [m for m in c["volumeMounts"] if m["name"] == "tls"]
    if not mounts:
        assert "EDGEFLOW_TLS_DIR" not in env
        assert not [v for v in pod["volumes"] if v["name"] == "tls"]
        return env, None
    (mount,) = mounts
    assert mount == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}  # no subPath
    assert env["EDGEFLOW_TLS_DIR"] == TLS_DIR
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    secret = volume["secret"]
    assert [i["key"] for i in secret["items"]] == ["ca.crt", "tls.crt", "tls.key"]
    assert secret["defaultMode"] == 0o440  # the pod's fsGroup reads it, no one else
    return env, str(secret["secretName"])


@pytest.mark.parametrize("name", sorted(TLS_SOURCES))
def test_tls_mounts_the_secret_in_every_pod_and_probes_healthz(name: str) -> None:
    secret = TLS_SOURCES[name]
    docs = render(*VALUE_SETS[name])
    for svc in ("candidates", "features", "scoring", "merging"):
        pod = find(docs, "Deployment", f"demo-edgeflow-{svc}")["spec"]["template"]["spec"]
        env, mounted = _tls_mount(pod)
        assert mounted == secret, svc
        # /healthz is served on the metrics port, reachable by the kubelet, metrics on or off
        assert (env["METRICS_PORT"], env["METRICS_HOST"]) == ("9090", "0.0.0.0"), svc
        (c,) = pod["containers"]
        assert 9090 in {p["containerPort"] for p in c["ports"]}
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # The operator gets the Secret's name, and mounts it in every child it makes.
    raw = json.loads(find(docs, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    cfg = OperatorConfig.model_validate(raw)
    assert cfg.tls_secret == secret and cfg.http_port == 9090
    wf = parse_document(yaml.safe_load((REPO_ROOT / "examples" / "pymk.yaml").read_text()), "pymk")
    children, _ = desired_children(Owner("pymk", "edgeflow", "uid-1", {}), wf, cfg)
    pods = {c["metadata"]["name"]: c["spec"]["template"]["spec"] for c in children
            if c["kind"] == "Deployment"}  # fmt: skip
    (cron,) = [c for c in children if c["kind"] == "CronJob"]
    pods["pymk-offline"] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert set(pods) == {"pymk-gateway", "pymk-nearline", "pymk-offline"}
    for child, pod in pods.items():
        env, mounted = _tls_mount(pod)
        assert mounted == secret, child
        (c,) = pod["containers"]
        assert c["securityContext"] == raw["securityContext"], child
        if child != "pymk-offline":
            assert env["METRICS_PORT"] == "9090" and env["METRICS_HOST"] == "0.0.0.0"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {"path": "/healthz", "port": 9090}, child


def test_without_tls_nothing_mounts_a_certificate() -> None:
    docs = render()
    assert not [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
    for where, pod in _pods(docs):
        if where.startswith("Deployment/demo-edgeflow-") and not where.endswith("-operator"):
            assert _tls_mount(pod)[1] is None, where
    raw = json.loads(find(docs, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    assert raw["tlsSecret"] == ""
    # A Secret of one's own: the chart makes no certificate.
    own = render(*VALUE_SETS["tls-existing-secret-metrics-off"])
    assert not [d for d in own if d["apiVersion"].startswith("cert-manager.io/")]


# cert-manager.io/v1 as its API reference documents it (kubernetes-validate knows only built-in
# kinds, and cert-manager's CRDs are not vendored here).
CERTIFICATE_FIELDS = {
    "subject", "literalSubject", "commonName", "duration", "renewBefore",
    "renewBeforePercentage", "dnsNames", "ipAddresses", "uris", "otherNames",
    "emailAddresses", "secretName", "secretTemplate", "keystores", "issuerRef", "isCA",
    "usages", "privateKey", "signatureAlgorithm", "encodeUsagesInRequest",
    "revisionHistoryLimit", "additionalOutputFormats", "nameConstraints",
}  # fmt: skip
KEY_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime",
    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
}  # fmt: skip
ISSUER_TYPES = {"acme", "ca", "vault", "selfSigned", "venafi"}
DNS_NAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_certificate(doc: dict[str, Any]) -> dict[str, Any]:
    assert doc["apiVersion"] == "cert-manager.io/v1"
    spec = doc["spec"]
    assert set(spec) <= CERTIFICATE_FIELDS, set(spec) - CERTIFICATE_FIELDS
    assert spec["secretName"] and spec["issuerRef"]["name"]
    assert set(spec["issuerRef"]) <= {"name", "kind", "group"}
    assert set(spec.get("secretTemplate", {})) <= {"labels", "annotations"}
    key = spec.get("privateKey", {})
    assert set(key) <= {"algorithm", "size", "encoding", "rotationPolicy"}
    assert key.get("algorithm", "RSA") in ("RSA", "ECDSA", "Ed25519")
    if key.get("algorithm") == "ECDSA":
        assert key.get("size", 256) in (256, 384, 521)
    assert key.get("encoding", "PKCS1") in ("PKCS1", "PKCS8")
    assert key.get("rotationPolicy", "Always") in ("Never", "Always")
    assert set(spec.get("usages", [])) <= KEY_USAGES
    for dns in spec.get("dnsNames", []):
        assert DNS_NAME.match(dns) and len(dns) <= 253, dns
    assert spec.get("commonName") or spec.get("dnsNames")
    return dict(spec)


def _check_issuer(doc: dict[str, Any]) -> dict[str, Any]:
    assert doc["apiVersion"] == "cert-manager.io/v1"
    spec = doc["spec"]
    (kind,) = set(spec) & ISSUER_TYPES  # exactly one kind of issuer
    assert set(spec) == {kind}
    if kind == "ca":
        assert spec["ca"]["secretName"]
        assert set(spec["ca"]) <= {"secretName", "crlDistributionPoints", "ocspServers",
                                   "issuingCertificateURLs"}  # fmt: skip
    if kind == "selfSigned":
        assert set(spec["selfSigned"]) <= {"crlDistributionPoints"}
    return dict(spec)


def _covers(dns_names: list[str], host: str) -> bool:
    """Whether a certificate with these names is valid for host (one-label wildcards)."""
    return any(n == host or (n.startswith("*.") and host.split(".", 1)[-1] == n[2:]
                             and "." in host) for n in dns_names)  # fmt: skip


@pytest.mark.parametrize("name", ["tls-cert-manager-multi-namespace", "tls-self-signed"])
def test_cert_manager_issues_one_certificate_for_every_name_dialled(name: str) -> None:
    docs = render(*VALUE_SETS[name])
    cert_manager = [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
    certificates = {
        (d["metadata"].get("namespace", "edgeflow"), d["metadata"]["name"]): _check_certificate(d)
        for d in cert_manager
        if d["kind"] == "Certificate"
    }
    issuers = {d["metadata"]["name"]: _check_issuer(d) for d in cert_manager
               if d["kind"] == "Issuer"}  # fmt: skip
    assert {d["kind"] for d in cert_manager} <= {"Certificate", "Issuer"}
    served = ["edgeflow", "surfaces"] if "multi-namespace" in name else ["edgeflow"]
    # The same Secret in each namespace the operator serves: the gateways there mount it.
    leaves = {ns: certificates.pop((ns, "demo-edgeflow-tls")) for ns in served}
    raw = json.loads(find(docs, "ConfigMap", "demo-edgeflow-operator")["data"]["config.json"])
    for ns, spec in leaves.items():
        assert spec["secretName"] == raw["tlsSecret"] == "demo-edgeflow-tls", ns
        # The backends ask every caller for this certificate: client auth as well as server.
        assert {"server auth", "client auth"} <= set(spec["usages"]), ns
        dialled = [v.rsplit(":", 1)[0] for k, v in raw["env"].items() if k.endswith("_ADDR")]
        assert len(dialled) == 4
        for host in dialled:  # what the gateways and workers dial
            assert _covers(spec["dnsNames"], host), (ns, host)
        for other in served:  # every workflow's gateway Service
            assert _covers(spec["dnsNames"], f"pymk-gateway.{other}.svc"), (ns, other)
        assert not _covers(spec["dnsNames"], "pymk-gateway.elsewhere.svc")
    if name == "tls-self-signed":
        # cert-manager's bootstrap: a self-signed Issuer signs the CA, whose Issuer signs the
        # certificate the pods mount.
        ((_, ca_name), ca), *rest = certificates.items()
        assert not rest and ca["isCA"] is True
        assert "selfSigned" in issuers[ca["issuerRef"]["name"]]
        leaf_issuer = leaves["edgeflow"]["issuerRef"]
        assert leaf_issuer["kind"] == "Issuer"
        assert issuers[leaf_issuer["name"]] == {"ca": {"secretName": ca["secretName"]}}
        assert ca_name != "demo-edgeflow-tls" and "localhost" in leaves["edgeflow"]["dnsNames"]
    else:
        assert not certificates and not issuers  # the issuer is the user's
        for spec in leaves.values():
            assert spec["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer",
                                         "group": "cert-manager.io"}  # fmt: skip
            assert "recs.example.com" in spec["dnsNames"]


def test_tls_passes_helm_lint_with_a_values_file(tmp_path: Path) -> None:
    values = tmp_path / "tls.yaml"
    values.write_text(yaml.safe_dump({"tls": {"enabled": True, "certManager": {
        "issuerRef": {"name": "vault", "kind": "VaultIssuer", "group": "vault.example.com"},
        "extraDnsNames": ["localhost", "*.recs.example.com"]}}}))  # fmt: skip
    out = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    (leaf,) = [d for d in render("-f", str(values)) if d["kind"] == "Certificate"]
    assert _check_certificate(leaf)["issuerRef"]["kind"] == "VaultIssuer"


def test_rbac_is_exactly_what_the_operator_uses() -> None:
    for values, kind in (([], "Role"), (VALUE_SETS["external-stores-cluster-wide"], "ClusterRole")):
        role = next(d for d in render(*values) if d["kind"] == kind)
        granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
                   for r in rule["resources"] for v in rule["verbs"]}  # fmt: skip
        assert not any("*" in item for item in granted)
        wanted = {("edgeflow.dev", "edgeworkflows", v) for v in ("get", "list", "watch", "patch")}
        wanted |= {("edgeflow.dev", "edgeworkflows/status", v) for v in ("get", "patch")}
        wanted |= {("", "events", "create")}
        for k, (group, _version, plural) in KINDS.items():
            if k != "EdgeWorkflow":
                wanted |= {(group, plural, v) for v in ("get", "create", "patch", "delete")}
        assert granted == wanted
        assert ("policy", "poddisruptionbudgets", "create") in granted  # the workflows' budgets


def test_skaffold_builds_every_image_and_deploys_the_chart() -> None:
    skaffold = yaml.safe_load((REPO_ROOT / "skaffold.yaml").read_text())
    assert skaffold["apiVersion"].startswith("skaffold/v4beta") and skaffold["kind"] == "Config"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    images = {values["image"]["repository"], values["operator"]["image"]["repository"]}
    for build in (skaffold["build"], *(p["build"] for p in skaffold["profiles"] if "build" in p)):
        artifacts = {a["image"]: a for a in build["artifacts"]}
        assert set(artifacts) == images
        for a in artifacts.values():
            dockerfile = REPO_ROOT / a["context"] / a["docker"]["dockerfile"]
            assert dockerfile.is_file(), dockerfile
    for deploy in (
        skaffold["deploy"],
        *(p["deploy"] for p in skaffold["profiles"] if "deploy" in p),
    ):
        (release,) = deploy["helm"]["releases"]
        assert (REPO_ROOT / release["chartPath"]).resolve() == CHART
        templates = release["setValueTemplates"]
        for key, image in (("image", "edgeflow/edgeflow"),
                           ("operator.image", "edgeflow/edgeflow-operator")):  # fmt: skip
            token = image.replace("/", "_").replace("-", "_")
            assert templates[f"{key}.repository"] == f"{{{{.IMAGE_REPO_{token}}}}}"
            assert f"{{{{.IMAGE_TAG_{token}}}}}" in templates[f"{key}.tag"]
    assert "dev" in {p["name"] for p in skaffold["profiles"]}


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "operator/Dockerfile"])
def test_dockerfiles_are_multi_stage_and_non_root(dockerfile: str) -> None:
    lines = [ln.strip() for ln in (REPO_ROOT / dockerfile).read_text().splitlines()]
    assert sum(ln.startswith("FROM ") for ln in lines) >= 2
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                assert (REPO_ROOT / src).exists(), f"{dockerfile}: {src}"
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".cache", "tests"} <= set(ignored)
    # The image cannot write bytecode at run time, so it ships it, valid whatever the times.
    text = " ".join(lines)
    assert "compileall" in text and "--invalidation-mode unchecked-hash /opt/venv" in text
    assert "*.pyc' -delete" not in text and "PYTHONDONTWRITEBYTECODE=1" in text


# ---- kubectl against the emulator ------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorThread]:
    emulator = EmulatorThread(tmp_path_factory.mktemp("kube"))
    yield emulator
    emulator.stop()


def kubectl(
    api: EmulatorThread, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    assert shutil.which(str(KUBECTL)), f"{KUBECTL} is missing (the dev extra installs it)"
    return subprocess.run([str(KUBECTL), *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, "KUBECONFIG": str(api.kubeconfig)},
                          check=False, timeout=120)  # fmt: skip


def test_kubectl_apply_of_the_crd_and_examples(api: EmulatorThread) -> None:
    crd = kubectl(api, "apply", "--validate=false", "-f", str(CHART / "crds"))
    assert crd.returncode == 0, crd.stderr
    done = kubectl(api, "apply", "--validate=false", "-n", "surfaces",
                   "-f", str(REPO_ROOT / "examples"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = sorted(p.stem for p in (REPO_ROOT / "examples").glob("*.yaml"))
    assert sorted(done.stdout.split()) == sorted(
        [f"edgeworkflow.edgeflow.dev/{n}" for n in names] + ["created"] * len(names)
    )
    listed = kubectl(api, "get", "ewf", "-n", "surfaces", "-o", "name")
    assert sorted(listed.stdout.split()) == [f"edgeworkflow.edgeflow.dev/{n}" for n in names]
    stored = yaml.safe_load(kubectl(api, "get", "ewf", "pymk", "-n", "surfaces",
                                    "-o", "yaml").stdout)  # fmt: skip
    assert stored["spec"]["nodes"][2]["timeoutMs"] == 20
    assert stored["spec"]["nodes"][6]["timeoutMs"] == 40  # and defaults filled in by the schema
    again = kubectl(api, "apply", "--validate=false", "-n", "surfaces",
                    "-f", str(REPO_ROOT / "examples"))  # fmt: skip
    assert again.returncode == 0, again.stderr
    # kubectl re-sends a list whose items got server-side defaults (timeoutMs), as it would
    # against a real API server, but the spec does not change: no new generation.
    assert "edgeworkflow.edgeflow.dev/pymk unchanged" in again.stdout
    for n in names:
        meta = yaml.safe_load(kubectl(api, "get", "ewf", n, "-n", "surfaces", "-o", "yaml").stdout)
        assert meta["metadata"]["generation"] == 1, n


def test_kubectl_apply_rejects_what_the_schema_catches(api: EmulatorThread) -> None:
    kubectl(api, "apply", "--validate=false", "-f", str(CHART / "crds"))
    broken = yaml.safe_load((REPO_ROOT / "examples" / "cold-start.yaml").read_text())
    broken["metadata"]["name"] = "broken"
    broken["spec"]["nodes"][0]["timeoutMs"] = 0
    broken["spec"]["nodes"][1]["op"] = "candidates.nope"
    done = kubectl(api, "apply", "--validate=false", "-n", "surfaces", "-f", "-",
                   stdin=yaml.safe_dump(broken))  # fmt: skip
    assert done.returncode != 0
    assert 'EdgeWorkflow.edgeflow.dev "broken" is invalid' in done.stderr
    assert "spec.nodes.0.timeoutMs" in done.stderr and "spec.nodes.1.op" in done.stderr
    assert kubectl(api, "get", "ewf", "broken", "-n", "surfaces").returncode != 0


def test_rendered_chart_applies_with_kubectl(api: EmulatorThread) -> None:
    manifests = helm("template", "demo", str(CHART), "--namespace", "edgeflow", "--include-crds")
    done = kubectl(api, "apply", "--validate=false", "-n", "edgeflow", "-f", "-", stdin=manifests)
    assert done.returncode == 0, done.stderr
    assert "deployment.apps/demo-edgeflow-operator created" in done.stdout
    assert "statefulset.apps/demo-edgeflow-redis created" in done.stdout


def test_notes_tell_how_to_use_the_release(api: EmulatorThread) -> None:
    out = helm("install", "demo", str(CHART), "--dry-run=client", "--disable-openapi-validation",
               "--namespace", "notes", env={"KUBECONFIG": str(api.kubeconfig)})  # fmt: skip
    notes = out[out.index("NOTES:") :]
    assert "kubectl apply -n notes -f examples/pymk.yaml" in notes
    assert "kubectl get ewf -n notes" in notes
    for condition in ("Valid=False", "Deployed=True", "Ready=True"):
        assert condition in notes
    assert "redis://demo-edgeflow-redis.notes.svc:6379/0" in notes
    assert ("export EDGEFLOW_API_KEY=$(kubectl get secret -n notes demo-edgeflow-auth -o "
            "jsonpath='{.data.admin\\.key}' | base64 -d)") in notes  # fmt: skip
    assert "TLS" not in notes and "EDGEFLOW_TLS_DIR" not in notes
    # (The emulator has no cert-manager CRDs: a Secret of one's own.)
    out = helm("install", "demo", str(CHART), "--dry-run=client", "--disable-openapi-validation",
               "--namespace", "notes", *VALUE_SETS["tls-existing-secret-metrics-off"],
               env={"KUBECONFIG": str(api.kubeconfig)})  # fmt: skip
    notes = out[out.index("NOTES:") :]
    assert "TLS: every gRPC connection of the release uses Secret edgeflow-certs" in notes
    assert ("kubectl get secret -n notes edgeflow-certs -o jsonpath='{.data.tls\\.key}' "
            "| base64 -d > tls/tls.key") in notes  # fmt: skip
    assert "EDGEFLOW_TLS_DIR=$PWD/tls" in notes
    assert "edgeflow recommend --addr localhost:50060" in notes
    # The stores' credentials in Secrets: named, never printed.
    out = helm("install", "demo", str(CHART), "--dry-run=client", "--disable-openapi-validation",
               "--namespace", "notes", *VALUE_SETS["store-secrets"],
               env={"KUBECONFIG": str(api.kubeconfig)})  # fmt: skip
    notes = out[out.index("NOTES:") :]
    assert "Redis:  the URL in Secret redis-creds (key url)" in notes
    assert "API key in Secret qdrant-key (key api-key)" in notes
    assert "every namespace the operator serves" in notes
    assert ("export REDIS_URL=\"$(kubectl get secret -n notes redis-creds -o "
            "jsonpath='{.data.url}' | base64 -d)\"") in notes  # fmt: skip
    assert "jsonpath='{.data.api-key}'" in notes
    assert "redis://" not in notes and "REDIS_URL=redis" not in notes
    assert "     QDRANT_URL=http://demo-edgeflow-qdrant.notes.svc:6333 \\\n" in notes
