"""The operator on the real kopf runtime (KopfRunner) against the Kubernetes API emulator."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from edgeflow_operator.children import (
    AnnotationError,
    Owner,
    child_name,
    compiled_document,
    compiled_yaml,
    config_hash,
    deployment_ready,
    desired_children,
    scaling,
)
from edgeflow_operator.config import HOSTNAME_KEY, ZONE_KEY, OperatorConfig
from edgeflow_operator.kube import contains
from kopf.testing import KopfRunner
from kube_emulator import EmulatorThread
from pydantic import ValidationError

from edgeflow.config import REPO_ROOT
from edgeflow.workflow.validate import parse_document

# Read when kopf imports the handlers: refresh Ready and retry quickly in tests.
os.environ["EDGEFLOW_OPERATOR_READY_INTERVAL_S"] = "0.3"
os.environ["EDGEFLOW_OPERATOR_RETRY_DELAY_S"] = "0.3"

CRD_FILE = REPO_ROOT / "charts" / "edgeflow" / "crds" / "edgeworkflows.edgeflow.dev.yaml"
EWF = "/apis/edgeflow.dev/v1alpha1/namespaces/{ns}/edgeworkflows"
PATHS = {
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "CronJob": "/apis/batch/v1/namespaces/{ns}/cronjobs",
    "HorizontalPodAutoscaler": "/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    "Event": "/api/v1/namespaces/{ns}/events",
}
T = TypeVar("T")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorThread]:
    emulator = EmulatorThread(tmp_path_factory.mktemp("kube"))
    emulator.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                    yaml.safe_load(CRD_FILE.read_text(encoding="utf-8")))  # fmt: skip
    yield emulator
    emulator.stop()


@pytest.fixture
def kubeconfig(api: EmulatorThread, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig))
    monkeypatch.delenv("EDGEFLOW_OPERATOR_CONFIG", raising=False)
    return api.kubeconfig


def operator(namespace: str) -> KopfRunner:
    return KopfRunner(
        ["run", "--standalone", "-n", namespace, "-m", "edgeflow_operator.handlers"],
        timeout=60,
    )


def wait_for(fn: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def example(name: str = "pymk") -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO_ROOT / "examples" / f"{name}.yaml").read_text())
    return doc


def ewf(api: EmulatorThread, ns: str, name: str) -> dict[str, Any]:
    obj = api.get(f"{EWF.format(ns=ns)}/{name}")
    assert obj is not None
    return obj


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return dict(c)
    return {}


def wait_condition(
    api: EmulatorThread, ns: str, name: str, type_: str, status: str, generation: int = 1
) -> dict[str, Any]:
    last: list[Any] = [None]

    def check() -> dict[str, Any] | None:
        obj = last[0] = ewf(api, ns, name)
        c = condition(obj, type_)
        return (
            obj if c.get("status") == status and c.get("observedGeneration") == generation else None
        )

    try:
        return wait_for(check, f"{type_}={status} on {ns}/{name} (generation {generation})")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; status: {last[0].get('status')}") from None


def children(api: EmulatorThread, ns: str, kind: str) -> dict[str, dict[str, Any]]:
    return {i["metadata"]["name"]: i for i in api.items(PATHS[kind].format(ns=ns))}


def roll_out(api: EmulatorThread, ns: str, name: str) -> None:
    """Play the Deployment controller: the current generation rolled out and available."""
    path = f"{PATHS['Deployment'].format(ns=ns)}/{name}"
    dep = api.get(path)
    assert dep is not None
    n = int(dep["spec"].get("replicas", 1))
    api.patch(f"{path}/status", {"status": {
        "observedGeneration": dep["metadata"]["generation"], "replicas": n,
        "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n}})  # fmt: skip


def test_valid_workflow_gets_owned_children_and_status(
    api: EmulatorThread, kubeconfig: Path
) -> None:
    ns = "valid"
    with operator(ns) as runner:
        created = api.create(EWF.format(ns=ns), example())
        obj = wait_condition(api, ns, "pymk", "Deployed", "True")
        uid = created["metadata"]["uid"]
        assert condition(obj, "Valid")["status"] == "True"
        assert "offline (8 shards" in condition(obj, "Valid")["message"]
        ready = condition(obj, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "ChildrenNotReady"
        assert obj["status"]["surface"] == "pymk"
        digest = obj["status"]["configHash"]

        owned = {(kind, name): child for kind in PATHS if kind != "Event"
                 for name, child in children(api, ns, kind).items()}  # fmt: skip
        assert set(owned) == {
            ("ConfigMap", "pymk-workflow"), ("Deployment", "pymk-gateway"),
            ("Service", "pymk-gateway"), ("HorizontalPodAutoscaler", "pymk-gateway"),
            ("PodDisruptionBudget", "pymk-gateway"),  # up to 10 replicas; nearline runs one
            ("Deployment", "pymk-nearline"), ("CronJob", "pymk-offline"),
        }  # fmt: skip
        for (kind, name), child in owned.items():
            (ref,) = child["metadata"]["ownerReferences"]
            assert ref == {"apiVersion": "edgeflow.dev/v1alpha1", "kind": "EdgeWorkflow",
                           "name": "pymk", "uid": uid, "controller": True,
                           "blockOwnerDeletion": True}, (kind, name)  # fmt: skip
            assert child["metadata"]["labels"]["edgeflow.dev/workflow"] == "pymk"
        assert {c["kind"] + "/" + c["name"] for c in obj["status"]["children"]} == {
            f"{k}/{n}" for k, n in owned
        }

        # The compiled graph is a workflow the gateway itself accepts.
        text = owned[("ConfigMap", "pymk-workflow")]["data"]["workflow.yaml"]
        compiled = parse_document(yaml.safe_load(text), "configmap")
        assert [n.node.name for n in compiled.nodes][-1] == "blend"
        assert config_hash(text) == digest

        gateway = owned[("Deployment", "pymk-gateway")]["spec"]
        pod = gateway["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["serve", "gateway"]
        assert container["readinessProbe"]["grpc"] == {"port": 50060}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert gateway["template"]["metadata"]["annotations"]["edgeflow.dev/config-hash"] == digest
        assert "replicas" not in gateway  # the HPA owns it: edgeflow.dev/gateway-replicas "2-10"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["EDGEFLOW_WORKFLOWS"] == "/etc/edgeflow/workflows" and env["PORT"] == "50060"
        assert pod["volumes"][0] == {"name": "workflow", "configMap": {"name": "pymk-workflow"}}
        hpa = owned[("HorizontalPodAutoscaler", "pymk-gateway")]["spec"]
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)

        job = owned[("CronJob", "pymk-offline")]["spec"]
        assert job["schedule"] == "0 3 * * *"
        indexed = job["jobTemplate"]["spec"]
        assert indexed["completionMode"] == "Indexed" and indexed["completions"] == 8
        args = indexed["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["offline", "run"]
        assert "$(JOB_COMPLETION_INDEX)" in args and args[args.index("--shards") + 1] == "8"
        nearline = owned[("Deployment", "pymk-nearline")]["spec"]["template"]["spec"]
        assert nearline["containers"][0]["args"] == ["serve", "nearline"]

        reasons = {(e["type"], e["reason"]) for e in api.items(PATHS["Event"].format(ns=ns))
                   if e["involvedObject"]["name"] == "pymk"}  # fmt: skip
        assert ("Normal", "Reconciled") in reasons

        # Ready follows the children's rollout.
        roll_out(api, ns, "pymk-gateway")
        roll_out(api, ns, "pymk-nearline")
        obj = wait_condition(api, ns, "pymk", "Ready", "True")
        assert condition(obj, "Ready")["reason"] == "ChildrenReady"
        printed = subprocess.run(
            ["kubectl", "get", "ewf", "-n", ns], capture_output=True, text=True, check=True,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        ).stdout  # fmt: skip
        header, row = printed.splitlines()[:2]
        assert header.split() == ["NAME", "SURFACE", "VALID", "READY", "AGE"]
        assert row.split()[:4] == ["pymk", "pymk", "True", "True"]

        # Deleting the workflow leaves its children to ownerReference garbage collection.
        api.http.delete(f"{EWF.format(ns=ns)}/pymk").raise_for_status()
        assert children(api, ns, "Deployment") == {} and children(api, ns, "ConfigMap") == {}
        assert children(api, ns, "PodDisruptionBudget") == {}
    assert runner.exception is None and runner.exit_code == 0


def test_spec_change_rolls_deployments_and_prunes_children(
    api: EmulatorThread, kubeconfig: Path
) -> None:
    ns = "update"
    with operator(ns) as runner:
        api.create(EWF.format(ns=ns), example())
        before = wait_condition(api, ns, "pymk", "Deployed", "True")
        old_hash = before["status"]["configHash"]
        api.patch(f"{EWF.format(ns=ns)}/pymk", {
            "metadata": {"annotations": {"edgeflow.dev/gateway-replicas": "4"}},
            "spec": {"budgetMs": 200, "modes": {"nearline": None}},
        })  # fmt: skip
        after = wait_condition(api, ns, "pymk", "Deployed", "True", generation=2)
        new_hash = after["status"]["configHash"]
        assert new_hash != old_hash
        gateway = children(api, ns, "Deployment")["pymk-gateway"]["spec"]
        assert (
            gateway["template"]["metadata"]["annotations"]["edgeflow.dev/config-hash"] == new_hash
        )
        assert gateway["replicas"] == 4
        text = children(api, ns, "ConfigMap")["pymk-workflow"]["data"]["workflow.yaml"]
        assert yaml.safe_load(text)["spec"]["budgetMs"] == 200
        assert "pymk-nearline" not in children(api, ns, "Deployment")
        assert children(api, ns, "HorizontalPodAutoscaler") == {}
        assert set(children(api, ns, "PodDisruptionBudget")) == {"pymk-gateway"}
        assert condition(after, "Deployed")["message"] == "5 children match the spec"
        messages = [e["message"] for e in api.items(PATHS["Event"].format(ns=ns))
                    if e["reason"] == "Reconciled"]  # fmt: skip
        assert any("2 deleted" in m for m in messages), messages  # nearline and its HPA
    assert runner.exception is None and runner.exit_code == 0


def test_invalid_workflow_is_reported_and_gets_no_children(
    api: EmulatorThread, kubeconfig: Path
) -> None:
    ns = "invalid"
    bad = example("follows")
    next(n for n in bad["spec"]["nodes"] if n["name"] == "features")["inputs"].append("rank")
    with operator(ns) as runner:
        api.create(EWF.format(ns=ns), bad)
        obj = wait_condition(api, ns, "follows", "Valid", "False")
        valid = condition(obj, "Valid")
        assert valid["reason"] == "InvalidSpec"
        assert "cycle" in valid["message"] and "(field inputs)" in valid["message"]
        assert condition(obj, "Deployed")["status"] == "False"
        events = [e for e in api.items(PATHS["Event"].format(ns=ns))
                  if e["involvedObject"]["name"] == "follows"]  # fmt: skip
        assert any(e["type"] == "Warning" and e["reason"] == "InvalidWorkflow"
                   and "cycle" in e["message"] for e in events)  # fmt: skip
        for kind in ("ConfigMap", "Deployment", "Service", "CronJob"):
            assert children(api, ns, kind) == {}, kind

        # Fixed: valid, with children (offline and nearline only: no gateway).
        api.patch(f"{EWF.format(ns=ns)}/follows", {"spec": example("follows")["spec"]})
        wait_condition(api, ns, "follows", "Deployed", "True", generation=2)
        assert set(children(api, ns, "Deployment")) == {"follows-nearline"}
        assert set(children(api, ns, "CronJob")) == {"follows-offline"}
        assert children(api, ns, "Service") == {}
    assert runner.exception is None and runner.exit_code == 0


def test_a_deeply_nested_spec_is_invalid_not_a_crash(api: EmulatorThread, kubeconfig: Path) -> None:
    """The operator checks the nesting before it copies kopf's views recursively, and reports
    it like any invalid spec (the emulator itself takes no deeper documents than this)."""
    ns = "deep"
    bad = example("follows")
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(100):
        inner["a"] = {}
        inner = inner["a"]
    first = bad["spec"]["nodes"][0]["name"]  # variant params: the schema keeps any value
    variant = {"name": "a", "weight": 100, "overrides": {"params": {first: {"deep": deep}}}}
    bad["spec"]["experiments"] = [{"name": "e", "variants": [variant]}]
    with operator(ns) as runner:
        api.create(EWF.format(ns=ns), bad)
        obj = wait_condition(api, ns, "follows", "Valid", "False")
        valid = condition(obj, "Valid")
        assert valid["reason"] == "InvalidSpec"
        assert "nested deeper than 32 levels" in valid["message"], valid["message"]
        for kind in ("ConfigMap", "Deployment", "CronJob"):
            assert children(api, ns, kind) == {}, kind
    assert runner.exception is None and runner.exit_code == 0


def test_invalid_update_keeps_the_last_valid_version_running(
    api: EmulatorThread, kubeconfig: Path
) -> None:
    ns = "keep"
    with operator(ns) as runner:
        api.create(EWF.format(ns=ns), example("cold-start"))
        first = wait_condition(api, ns, "cold-start", "Deployed", "True")
        api.patch(f"{EWF.format(ns=ns)}/cold-start", {
            "metadata": {"annotations": {"edgeflow.dev/gateway-replicas": "9-3"}}})  # fmt: skip
        obj = wait_for(lambda: (o := ewf(api, ns, "cold-start")) and
                       condition(o, "Valid").get("status") == "False" and o,
                       "Valid=False after a bad annotation")  # fmt: skip
        message = condition(obj, "Valid")["message"]
        assert "edgeflow.dev/gateway-replicas" in message and "'9-3'" in message
        deployed = condition(obj, "Deployed")
        assert deployed["status"] == "False" and "keeps running" in deployed["message"]
        gateway = children(api, ns, "Deployment")["cold-start-gateway"]
        hash_now = gateway["spec"]["template"]["metadata"]["annotations"]
        assert hash_now["edgeflow.dev/config-hash"] == first["status"]["configHash"]
        assert gateway["spec"]["replicas"] == 3
    assert runner.exception is None and runner.exit_code == 0


def _writes(api: EmulatorThread, since: int) -> list[str]:
    """Writes to anything but EdgeWorkflows and Events after request number `since`."""
    out = []
    for r in api.requests()[since:]:
        plural = r.resource.plural if r.resource is not None else None
        if r.method.value in ("POST", "PATCH", "PUT", "DELETE") and plural not in (
            "edgeworkflows", "events"
        ):  # fmt: skip
            out.append(f"{r.method.value} {r.url.path}")
    return out


def test_a_second_run_changes_nothing(api: EmulatorThread, kubeconfig: Path) -> None:
    ns = "idem"
    with operator(ns):
        api.create(EWF.format(ns=ns), example())
        wait_condition(api, ns, "pymk", "Deployed", "True")
    status = ewf(api, ns, "pymk")["status"]
    mark = len(api.requests())
    with operator(ns) as runner:
        # The resumed reconcile reads every child, checks the last one it could prune, then
        # reads the Deployments' rollout; the readiness timer reads them again later.
        def gets(suffix: str, after: int) -> list[int]:
            return [i for i, r in enumerate(api.requests()) if i >= after
                    and r.method.value == "GET" and r.url.path.endswith(suffix)]  # fmt: skip

        pruned = wait_for(lambda: gets("/poddisruptionbudgets/pymk-nearline", mark),
                          "the resumed reconcile")[0]  # fmt: skip
        wait_for(lambda: len(gets("/deployments/pymk-nearline", pruned)) >= 2,
                 "a readiness check after the reconcile")  # fmt: skip
    assert runner.exception is None and runner.exit_code == 0
    assert "Resuming is processed: 1 succeeded; 0 failed" in runner.output
    assert _writes(api, mark) == []
    assert ewf(api, ns, "pymk")["status"] == status


def test_transient_api_errors_are_retried(api: EmulatorThread, kubeconfig: Path) -> None:
    ns = "flaky"
    api.inject("POST", "deployments", ns, 503, times=2)
    with operator(ns) as runner:
        api.create(EWF.format(ns=ns), example("cold-start"))
        wait_condition(api, ns, "cold-start", "Deployed", "True")
        assert set(children(api, ns, "Deployment")) == {"cold-start-gateway"}
    assert runner.exception is None and runner.exit_code == 0
    assert "failed temporarily" in runner.output and "503" in runner.output


def test_permanent_api_errors_stop_with_a_condition(api: EmulatorThread, kubeconfig: Path) -> None:
    ns = "forbidden"
    api.inject("POST", "deployments", ns, 403)
    with operator(ns) as runner:
        api.create(EWF.format(ns=ns), example("cold-start"))
        obj = wait_for(lambda: (o := ewf(api, ns, "cold-start")) and
                       condition(o, "Deployed").get("status") == "False" and o,
                       "Deployed=False")  # fmt: skip
        deployed = condition(obj, "Deployed")
        assert deployed["reason"] == "ApplyFailed"
        assert "Deployment cold-start-gateway (HTTP 403)" in deployed["message"]
        assert condition(obj, "Valid")["status"] == "True"
        events = api.items(PATHS["Event"].format(ns=ns))
        assert any(e["reason"] == "ApplyFailed" and e["type"] == "Warning" for e in events)
        time.sleep(1.0)  # several retry delays: a permanent failure must not be retried
    assert runner.exception is None and runner.exit_code == 0
    assert "failed permanently" in runner.output
    attempts = [r for r in api.requests() if r.method.value == "POST"
                and r.url.path == f"/apis/apps/v1/namespaces/{ns}/deployments"]  # fmt: skip
    assert len(attempts) == 1


def test_children_mount_the_tls_secret_the_config_names(
    api: EmulatorThread, kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = "tls"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"tlsSecret": "edgeflow-tls", "metricsPort": 9090}))
    monkeypatch.setenv("EDGEFLOW_OPERATOR_CONFIG", str(config))
    with operator(ns) as runner:
        api.create(EWF.format(ns=ns), example())
        wait_condition(api, ns, "pymk", "Deployed", "True")
        deployments = children(api, ns, "Deployment")
        (cron,) = children(api, ns, "CronJob").values()
        pods = {name: d["spec"]["template"]["spec"] for name, d in deployments.items()}
        pods["pymk-offline"] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert set(pods) == {"pymk-gateway", "pymk-nearline", "pymk-offline"}
        for name, pod in pods.items():
            (c,) = pod["containers"]
            assert _tls_of(c, pod) == ("/etc/edgeflow/tls", "edgeflow-tls"), name
            if name != "pymk-offline":  # a Job has no probes
                assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 9090}
    assert runner.exception is None and runner.exit_code == 0


def _spread_keys(dep: dict[str, Any]) -> list[str] | None:
    """The keys a Deployment's pods are spread over, each selecting exactly its own pods."""
    constraints = dep["spec"]["template"]["spec"].get("topologySpreadConstraints")
    if constraints is None:
        return None
    for c in constraints:
        assert c["labelSelector"] == dep["spec"]["selector"], dep["metadata"]["name"]
        assert (c["maxSkew"], c["whenUnsatisfiable"]) == (1, "ScheduleAnyway")
    return [c["topologyKey"] for c in constraints]


def test_a_budget_follows_the_replicas_and_goes_with_the_workflow(
    api: EmulatorThread, kubeconfig: Path
) -> None:
    ns = "budget"
    path = f"{EWF.format(ns=ns)}/cold-start"

    def replicas(value: str) -> None:
        api.patch(path, {"metadata": {"annotations": {"edgeflow.dev/gateway-replicas": value}}})

    def budgets() -> dict[str, dict[str, Any]]:
        return children(api, ns, "PodDisruptionBudget")

    with operator(ns) as runner:
        created = api.create(EWF.format(ns=ns), example("cold-start"))  # 3 gateway replicas
        wait_condition(api, ns, "cold-start", "Deployed", "True")
        dep = children(api, ns, "Deployment")["cold-start-gateway"]
        assert dep["spec"]["replicas"] == 3
        assert _spread_keys(dep) == [HOSTNAME_KEY, ZONE_KEY]
        pdb = budgets()["cold-start-gateway"]
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": dep["spec"]["selector"]}
        (ref,) = pdb["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == (
            "EdgeWorkflow", created["metadata"]["uid"], True)  # fmt: skip

        # Down to one replica: the budget would only block drains, so it goes; the spread stays.
        replicas("1")
        wait_for(lambda: children(api, ns, "Deployment")["cold-start-gateway"]["spec"][
            "replicas"] == 1 and not budgets(), "one replica and no budget")  # fmt: skip
        dep = children(api, ns, "Deployment")["cold-start-gateway"]
        assert _spread_keys(dep) == [HOSTNAME_KEY, ZONE_KEY]
        # An HPA that may add a second replica: a budget again.
        replicas("1-4")
        wait_for(lambda: "cold-start-gateway" in budgets()
                 and children(api, ns, "HorizontalPodAutoscaler"),
                 "the HPA and its budget")  # fmt: skip

        # Deleted with the workflow, by ownerReference garbage collection.
        api.http.delete(path).raise_for_status()
        assert budgets() == {} and children(api, ns, "Deployment") == {}
    assert runner.exception is None and runner.exit_code == 0


def test_turning_availability_off_takes_it_off_running_children(
    api: EmulatorThread, kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = "availability"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"metricsPort": 9090}))  # availability as by default: on
    monkeypatch.setenv("EDGEFLOW_OPERATOR_CONFIG", str(config))
    with operator(ns) as runner:
        api.create(EWF.format(ns=ns), example())
        wait_condition(api, ns, "pymk", "Deployed", "True")
        deployments = children(api, ns, "Deployment")
        assert {n: _spread_keys(d) for n, d in deployments.items()} == {
            "pymk-gateway": [HOSTNAME_KEY, ZONE_KEY],
            "pymk-nearline": [HOSTNAME_KEY, ZONE_KEY],
        }
        assert set(children(api, ns, "PodDisruptionBudget")) == {"pymk-gateway"}
    assert runner.exception is None and runner.exit_code == 0
    # The chart upgraded with availability off: the resumed reconcile prunes the budget and
    # patches the constraints away.
    off = {"podDisruptionBudget": False, "topologyKeys": []}
    config.write_text(json.dumps({"metricsPort": 9090, "availability": off}))
    with operator(ns) as runner:
        done = wait_for(
            lambda: not children(api, ns, "PodDisruptionBudget")
            and (d := children(api, ns, "Deployment"))
            and all(_spread_keys(dep) is None for dep in d.values()) and d,
            "no budget and no spread",
        )  # fmt: skip
    assert runner.exception is None and runner.exit_code == 0
    assert set(done) == {"pymk-gateway", "pymk-nearline"}


# ---- the pure parts ---------------------------------------------------------------------------
def _owner(annotations: dict[str, str] | None = None) -> Owner:
    return Owner("pymk", "ns", "uid-1", annotations or {})


def test_compiled_workflow_round_trips() -> None:
    wf = parse_document(example(), "pymk")
    doc = compiled_document(wf, _owner())
    again = parse_document(copy.deepcopy(doc), "compiled")
    assert compiled_document(again, _owner()) == doc
    assert config_hash(compiled_yaml(again, _owner())) == config_hash(compiled_yaml(wf, _owner()))
    assert [n["name"] for n in doc["spec"]["nodes"]][-1] == "blend"
    assert all("fallback" in n and "timeoutMs" in n for n in doc["spec"]["nodes"])


def test_child_names_are_valid_dns_labels() -> None:
    assert child_name("pymk", "gateway") == "pymk-gateway"
    assert child_name("1st", "gateway") == "ewf-1st-gateway"
    long = "a" * 63
    for suffix, limit in (("gateway", 63), ("offline", 52)):
        name = child_name(long, suffix, limit)
        assert len(name) <= limit and name.endswith(f"-{suffix}") and name[0].isalpha()
    assert child_name(long, "gateway") != child_name("a" * 62 + "b", "gateway")


@pytest.mark.parametrize(
    ("value", "replicas", "hpa"),
    [(None, 1, None), ("3", 3, None), ("2-10", 2, (2, 10)), (" 1 - 1 ", 1, (1, 1))],
)
def test_replica_annotation(value: str | None, replicas: int, hpa: tuple[int, int] | None) -> None:
    owner = _owner({} if value is None else {"edgeflow.dev/gateway-replicas": value})
    got = scaling(owner, "gateway", OperatorConfig().gateway)
    assert got.replicas == replicas
    bounds = (
        (got.autoscaling.min_replicas, got.autoscaling.max_replicas) if got.autoscaling else None
    )
    assert bounds == hpa


@pytest.mark.parametrize("value", ["ten", "10-2", "0-5", "-1", "3-", "51", "2-9999"])
def test_bad_replica_annotation_names_itself(value: str) -> None:
    with pytest.raises(AnnotationError, match=r"edgeflow\.dev/gateway-replicas"):
        scaling(
            _owner({"edgeflow.dev/gateway-replicas": value}), "gateway", OperatorConfig().gateway
        )


def test_the_replica_cap_comes_from_the_chart() -> None:
    owner = _owner({"edgeflow.dev/gateway-replicas": "2-80"})
    with pytest.raises(AnnotationError, match="asks for 80 replicas; at most 50"):
        scaling(owner, "gateway", OperatorConfig().gateway, OperatorConfig().max_replicas)
    raised = OperatorConfig.model_validate({"maxReplicas": 100})
    got = scaling(owner, "gateway", raised.gateway, raised.max_replicas)
    assert got.autoscaling is not None and got.autoscaling.max_replicas == 80


def test_deployment_readiness_follows_rollout_status() -> None:
    dep: dict[str, Any] = {"metadata": {"name": "d", "generation": 2}, "spec": {"replicas": 2}}
    assert deployment_ready(dep)[0] is False
    dep["status"] = {"observedGeneration": 1, "updatedReplicas": 2, "availableReplicas": 2}
    assert "not observed" in deployment_ready(dep)[1]
    dep["status"]["observedGeneration"] = 2
    dep["status"]["availableReplicas"] = 1
    assert deployment_ready(dep) == (False, "Deployment d: 1/2 replicas available")
    dep["status"]["availableReplicas"] = 2
    assert deployment_ready(dep)[0] is True


def test_operator_command_explains_a_bad_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeflow.cli.main import main

    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.delenv("EDGEFLOW_OPERATOR_CONFIG", raising=False)
    assert main(["operator"]) == 2
    assert "--namespace" in capsys.readouterr().err
    bad = tmp_path / "config.json"
    bad.write_text('{"gateway": {"port": 0, "resources": {}}}')
    monkeypatch.setenv("EDGEFLOW_OPERATOR_CONFIG", str(bad))
    assert main(["operator", "-n", "default"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "gateway.port" in err


def _tls_of(container: dict[str, Any], pod: dict[str, Any]) -> tuple[str, str] | None:
    """(EDGEFLOW_TLS_DIR, the Secret mounted there read-only), or None without TLS."""
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    volumes = [v for v in pod["volumes"] if v["name"] == "tls"]
    if "EDGEFLOW_TLS_DIR" not in env and not mounts and not volumes:
        return None
    (mount,), (volume,) = mounts, volumes
    assert mount == {"name": "tls", "mountPath": env["EDGEFLOW_TLS_DIR"], "readOnly": True}
    assert "subPath" not in mount  # the kubelet must be able to swap in a renewed certificate
    assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt", "tls.crt", "tls.key"]
    return env["EDGEFLOW_TLS_DIR"], volume["secret"]["secretName"]


def _pods(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for c in children:
        if c["kind"] == "Deployment":
            out[c["metadata"]["name"]] = c["spec"]["template"]
        elif c["kind"] == "CronJob":
            out[c["metadata"]["name"]] = c["spec"]["jobTemplate"]["spec"]["template"]
    return out


def _without_tls(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod template less what TLS adds (mount, volume, env) and changes (probes)."""
    pod = copy.deepcopy(pod)
    spec = pod["spec"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "tls"]
    for c in spec["containers"]:
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "tls"]
        c["env"] = [e for e in c["env"] if e["name"] != "EDGEFLOW_TLS_DIR"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            c.pop(probe, None)
    return pod


def test_a_tls_secret_reaches_every_child_and_moves_the_probes_to_healthz() -> None:
    wf = parse_document(example(), "pymk")
    plain = OperatorConfig.model_validate({"metricsPort": 9090})
    tls = OperatorConfig.model_validate({"metricsPort": 9090, "tlsSecret": "edgeflow-tls"})
    before, digest = desired_children(_owner(), wf, plain)
    after, digest_tls = desired_children(_owner(), wf, tls)
    assert digest == digest_tls
    pods_before, pods_after = _pods(before), _pods(after)
    assert set(pods_after) == {"pymk-gateway", "pymk-nearline", "pymk-offline"}
    for name, template in pods_after.items():
        pod = template["spec"]
        (c,) = pod["containers"]
        assert _tls_of(c, pod) == ("/etc/edgeflow/tls", "edgeflow-tls"), name
        (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
        assert volume["secret"]["defaultMode"] == 0o440  # group-readable: the pod's fsGroup
        assert c["securityContext"] == tls.security_context, name  # still locked down
        assert pod["securityContext"] == tls.pod_security_context, name
        if name == "pymk-offline":
            assert not any(p in c for p in ("readinessProbe", "livenessProbe")), name
            continue
        env = {e["name"]: e["value"] for e in c["env"]}
        assert (env["METRICS_PORT"], env["METRICS_HOST"]) == ("9090", "0.0.0.0"), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": 9090}, (name, probe)
            assert "grpc" not in c[probe], (name, probe)
        # Only the health check changed: the same thresholds as the gRPC probes.
        (old,) = pods_before[name]["spec"]["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert {k: v for k, v in c[probe].items() if k != "httpGet"} == {
                k: v for k, v in old[probe].items() if k != "grpc"}  # fmt: skip
    # Without a Secret named, nothing of it; with one, nothing else changes.
    for name, template in pods_before.items():
        (c,) = template["spec"]["containers"]
        assert _tls_of(c, template["spec"]) is None, name
        if name != "pymk-offline":
            assert c["readinessProbe"]["grpc"] == {"port": c["ports"][0]["containerPort"]}
        assert _without_tls(template) == _without_tls(pods_after[name]), name
    others = [(c["kind"], c) for c in before if c["kind"] not in ("Deployment", "CronJob")]
    assert others == [(c["kind"], c) for c in after if c["kind"] not in ("Deployment", "CronJob")]


def test_tls_without_metrics_still_serves_healthz() -> None:
    wf = parse_document(example(), "pymk")
    cfg = OperatorConfig.model_validate({"tlsSecret": "edgeflow-tls", "healthPort": 9090})
    assert cfg.metrics_port == 0 and cfg.http_port == 9090
    made = {(c["kind"], c["metadata"]["name"]): c for c in desired_children(_owner(), wf, cfg)[0]}
    for name in ("pymk-gateway", "pymk-nearline"):
        template = made["Deployment", name]["spec"]["template"]
        (c,) = template["spec"]["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert (env["METRICS_PORT"], env["METRICS_HOST"]) == ("9090", "0.0.0.0"), name
        assert {"name": "health", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9090}
        # metrics are off: nothing tells Prometheus to scrape
        assert not any(k.startswith("prometheus.io/") for k in template["metadata"]["annotations"])
    assert [p["name"] for p in made["Service", "pymk-gateway"]["spec"]["ports"]] == ["grpc"]
    # The healthPort matters only with TLS; without either port the probes have nowhere to go.
    assert OperatorConfig.model_validate({"healthPort": 9090}).http_port == 0
    with pytest.raises(ValidationError, match="tlsSecret needs metricsPort or healthPort"):
        OperatorConfig.model_validate({"tlsSecret": "edgeflow-tls"})
    # Without an fsGroup to own the files, they stay world-readable (the default mode).
    bare = OperatorConfig.model_validate(
        {"tlsSecret": "s", "healthPort": 9090, "podSecurityContext": {"runAsNonRoot": True}}
    )
    pod = _pods(desired_children(_owner(), wf, bare)[0])["pymk-gateway"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert "defaultMode" not in volume["secret"]


# ---- store credentials from Secrets -------------------------------------------------------------
STORE_SECRETS = {
    "redisUrlSecret": {"name": "redis-creds", "key": "redis-url"},
    "qdrantApiKeySecret": {"name": "qdrant-key", "key": "api-key"},
}
SECRET_ENV = {
    "REDIS_URL": {"secretKeyRef": {"name": "redis-creds", "key": "redis-url"}},
    "QDRANT_API_KEY": {"secretKeyRef": {"name": "qdrant-key", "key": "api-key"}},
}
PLAIN_STORES = {
    "REDIS_URL": "rediss://edge:s3cret@redis.data:6380/0",
    "QDRANT_URL": "http://q:6333",
}


def _without_store_env(pod: dict[str, Any]) -> dict[str, Any]:
    """A pod template less REDIS_URL and QDRANT_API_KEY, however they are given."""
    pod = copy.deepcopy(pod)
    for c in pod["spec"]["containers"]:
        c["env"] = [e for e in c["env"] if e["name"] not in SECRET_ENV]
    return pod


def test_store_secrets_reach_every_child_as_secret_key_refs() -> None:
    wf = parse_document(example(), "pymk")
    common = {"metricsPort": 9090, "tlsSecret": "edgeflow-tls", "authSecret": "keys"}
    plain = OperatorConfig.model_validate({**common, "env": PLAIN_STORES})
    secret = OperatorConfig.model_validate(
        {**common, "env": {"QDRANT_URL": "http://q:6333"}, **STORE_SECRETS}
    )
    before, digest = desired_children(_owner(), wf, plain)
    after, digest_secret = desired_children(_owner(), wf, secret)
    assert digest == digest_secret
    pods_before, pods_after = _pods(before), _pods(after)
    assert set(pods_after) == {"pymk-gateway", "pymk-nearline", "pymk-offline"}
    for name, template in pods_after.items():
        (c,) = template["spec"]["containers"]
        names = [e["name"] for e in c["env"]]
        assert names == sorted(names), name  # TLS and API keys' env merged in, still sorted
        refs = {e["name"]: e for e in c["env"] if "valueFrom" in e}
        # The Secret's name and key, never a value; nothing else comes from a Secret.
        assert refs == {k: {"name": k, "valueFrom": v} for k, v in SECRET_ENV.items()}, name
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["EDGEFLOW_TLS_DIR"] == "/etc/edgeflow/tls", name
        assert env["QDRANT_URL"] == "http://q:6333", name
        # Only those two variables changed.
        assert _without_store_env(template) == _without_store_env(pods_before[name]), name
    assert "s3cret" not in json.dumps(after)
    others = [c for c in before if c["kind"] not in ("Deployment", "CronJob")]
    assert others == [c for c in after if c["kind"] not in ("Deployment", "CronJob")]


def test_without_store_secrets_the_children_keep_plain_env() -> None:
    wf = parse_document(example(), "pymk")
    for extra in ({}, {"tlsSecret": "edgeflow-tls", "authSecret": "keys"}):
        cfg = OperatorConfig.model_validate({"metricsPort": 9090, "env": PLAIN_STORES, **extra})
        assert cfg.secret_env() == {}
        # A Secret's key alone (no name) is no Secret either.
        keyed = OperatorConfig.model_validate(
            {"metricsPort": 9090, "env": PLAIN_STORES, **extra,
             "redisUrlSecret": {"key": "url"}, "qdrantApiKeySecret": {"name": "", "key": "k"}}
        )  # fmt: skip
        children, _ = desired_children(_owner(), wf, cfg)
        assert desired_children(_owner(), wf, keyed)[0] == children
        for name, template in _pods(children).items():
            (c,) = template["spec"]["containers"]
            # every entry a plain value, sorted by name, the stores' as the config gives them
            assert all(set(e) == {"name", "value"} for e in c["env"]), name
            assert [e["name"] for e in c["env"]] == sorted(e["name"] for e in c["env"])
            env = {e["name"]: e["value"] for e in c["env"]}
            assert env["REDIS_URL"] == PLAIN_STORES["REDIS_URL"], name
            assert "QDRANT_API_KEY" not in env, name


def test_a_store_secret_and_a_plain_value_conflict() -> None:
    with pytest.raises(ValidationError, match="redisUrlSecret names Secret 'redis-creds' for "
                       "REDIS_URL, which env sets too"):  # fmt: skip
        OperatorConfig.model_validate({"env": PLAIN_STORES, **STORE_SECRETS})
    with pytest.raises(ValidationError, match="qdrantApiKeySecret"):
        OperatorConfig.model_validate(
            {"env": {"QDRANT_API_KEY": "k"}, "qdrantApiKeySecret": {"name": "q", "key": "k"}}
        )
    for bad in ({"name": "Bad_Name", "key": "k"}, {"name": "s", "key": "a/b"}, {"name": "s"}):
        with pytest.raises(ValidationError, match="redisUrlSecret"):
            OperatorConfig.model_validate({"redisUrlSecret": bad})


def test_moving_the_store_credentials_into_secrets_repatches_every_child(
    api: EmulatorThread, kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = "secrets"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"env": PLAIN_STORES}))
    monkeypatch.setenv("EDGEFLOW_OPERATOR_CONFIG", str(config))

    def pods() -> dict[str, dict[str, Any]]:
        out = {name: d["spec"]["template"]["spec"]
               for name, d in children(api, ns, "Deployment").items()}  # fmt: skip
        for name, cron in children(api, ns, "CronJob").items():
            out[name] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return out

    def store_env(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
        (c,) = pod["containers"]
        return {e["name"]: e for e in c["env"] if e["name"] in SECRET_ENV}

    with operator(ns) as runner:
        api.create(EWF.format(ns=ns), example())
        wait_condition(api, ns, "pymk", "Deployed", "True")
        for name, pod in pods().items():
            plain = {"name": "REDIS_URL", "value": PLAIN_STORES["REDIS_URL"]}
            assert store_env(pod) == {"REDIS_URL": plain}, name
    assert runner.exception is None and runner.exit_code == 0
    # The chart upgraded with redis.existingSecret and qdrant.existingSecret: the resumed
    # reconcile patches each child, and no plain value stays beside the reference.
    config.write_text(json.dumps({"env": {"QDRANT_URL": "http://q:6333"}, **STORE_SECRETS}))
    want = {k: {"name": k, "valueFrom": v} for k, v in SECRET_ENV.items()}
    with operator(ns) as runner:
        done = wait_for(
            lambda: (p := pods()) and all(store_env(pod) == want for pod in p.values()) and p,
            "every child reading the stores' Secrets",
        )
    assert runner.exception is None and runner.exit_code == 0
    assert set(done) == {"pymk-gateway", "pymk-nearline", "pymk-offline"}
    assert "s3cret" not in json.dumps(done)


# ---- availability: spread and disruption budgets -----------------------------------------------
def _by_kind(children: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


@pytest.mark.parametrize(
    ("gateway", "nearline", "budgets"),
    [
        ("3", "2", {"pymk-gateway", "pymk-nearline"}),
        ("2-10", "1", {"pymk-gateway"}),  # an HPA's maximum counts, not its minimum
        ("1-3", "0", {"pymk-gateway"}),
        ("1", "1-1", set()),
    ],
)
def test_deployments_that_may_run_two_replicas_get_a_budget_and_all_spread(
    gateway: str, nearline: str, budgets: set[str]
) -> None:
    wf = parse_document(example(), "pymk")
    owner = _owner(
        {"edgeflow.dev/gateway-replicas": gateway, "edgeflow.dev/nearline-replicas": nearline}
    )
    made = _by_kind(desired_children(owner, wf, OperatorConfig())[0])
    assert {n for k, n in made if k == "PodDisruptionBudget"} == budgets
    deployments = {n: c for (k, n), c in made.items() if k == "Deployment"}
    assert set(deployments) == {"pymk-gateway", "pymk-nearline"}
    for name, dep in deployments.items():
        assert _spread_keys(dep) == [HOSTNAME_KEY, ZONE_KEY], name
        if name not in budgets:
            continue
        pdb = made["PodDisruptionBudget", name]
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["metadata"]["ownerReferences"] == [owner.reference()]
        assert pdb["metadata"]["labels"] == dep["metadata"]["labels"]
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": dep["spec"]["selector"]}
        # It selects exactly this Deployment's pods: its own, and not the other one's.
        wanted = pdb["spec"]["selector"]["matchLabels"].items()
        for other, d in deployments.items():
            pod_labels = d["spec"]["template"]["metadata"]["labels"].items()
            assert (wanted <= pod_labels) == (other == name), (name, other)
    # The offline job's pods run to completion: nothing to spread or keep up.
    cron = made["CronJob", "pymk-offline"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in cron


def test_availability_off_in_the_config_gives_neither_spread_nor_budgets() -> None:
    wf = parse_document(example(), "pymk")
    owner = _owner({"edgeflow.dev/gateway-replicas": "3", "edgeflow.dev/nearline-replicas": "2-4"})

    def made(availability: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        cfg = OperatorConfig.model_validate({"availability": availability})
        return _by_kind(desired_children(owner, wf, cfg)[0])

    def budgets(children: dict[tuple[str, str], dict[str, Any]]) -> set[str]:
        return {n for k, n in children if k == "PodDisruptionBudget"}

    on, off = made({}), made({"podDisruptionBudget": False, "topologyKeys": []})
    assert budgets(on) == {"pymk-gateway", "pymk-nearline"} and budgets(off) == set()
    for name in ("pymk-gateway", "pymk-nearline"):
        pod = off["Deployment", name]["spec"]["template"]["spec"]
        # null, not absent: a merge patch then removes constraints an earlier config set
        assert "topologySpreadConstraints" in pod and pod["topologySpreadConstraints"] is None
    # Nothing else differs.
    for children in (on, off):
        for key in list(children):
            if key[0] == "PodDisruptionBudget":
                del children[key]
            elif key[0] == "Deployment":
                children[key]["spec"]["template"]["spec"].pop("topologySpreadConstraints")
    assert on == off
    # Each on its own: budgets without spread, spread over nodes only without budgets.
    assert budgets(made({"topologyKeys": []})) == {"pymk-gateway", "pymk-nearline"}
    nodes_only = made({"podDisruptionBudget": False, "topologyKeys": [HOSTNAME_KEY]})
    assert budgets(nodes_only) == set()
    assert _spread_keys(nodes_only["Deployment", "pymk-gateway"]) == [HOSTNAME_KEY]


@pytest.mark.parametrize(
    "keys", [[HOSTNAME_KEY, HOSTNAME_KEY], ["no spaces"], [""], ["-zone"], ["Zone.Example/x"]]
)
def test_bad_topology_keys_are_refused(keys: list[str]) -> None:
    with pytest.raises(ValidationError, match="topologyKeys"):
        OperatorConfig.model_validate({"availability": {"topologyKeys": keys}})


def test_a_null_field_is_one_the_live_object_must_not_have() -> None:
    assert contains({"a": 1}, {"a": 1, "b": None})
    assert contains({"a": 1, "b": None}, {"b": None})
    assert not contains({"a": 1, "b": [{"k": "v"}]}, {"b": None})
