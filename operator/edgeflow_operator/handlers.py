"""kopf handlers: validate each EdgeWorkflow, reconcile its children, report conditions.

- create/update/resume all run `reconcile`, which is idempotent: validate with the same code
  as `edgeflow validate`, then create or patch only what differs, then prune children that
  the spec no longer needs. Deletion is left to ownerReference garbage collection.
- An invalid spec gets Valid=False (the node and field in the message) and a Warning event;
  a new one gets no children, an existing one keeps its last valid children running.
- Transient API errors retry (kopf.TemporaryError); permanent ones (forbidden, rejected)
  stop with Deployed=False and the API's message (kopf.PermanentError).
- A timer refreshes Ready from the children's rollout status.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from edgeflow.workflow.compiled import Workflow
from edgeflow.workflow.model import API_VERSION, KIND
from edgeflow.workflow.validate import WorkflowError, check_size, parse_document
from edgeflow_operator import GROUP, PLURAL, VERSION, conditions
from edgeflow_operator.children import (
    AnnotationError,
    Owner,
    deployment_ready,
    desired_children,
    possible_children,
)
from edgeflow_operator.conditions import DEPLOYED, READY, VALID, condition
from edgeflow_operator.config import load
from edgeflow_operator.kube import Kube, KubeError

READY_INTERVAL_S = float(os.environ.get("EDGEFLOW_OPERATOR_READY_INTERVAL_S", "10"))
RETRY_DELAY_S = float(os.environ.get("EDGEFLOW_OPERATOR_RETRY_DELAY_S", "10"))
KOPF_PREFIX = f"operator.{GROUP}"


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Handler state lives in annotations, so the status stays exactly what the CRD declares.
    # kopf ignores every annotation under its own prefix when it looks for changes, so it
    # gets a prefix of its own, apart from the edgeflow.dev/ annotations that users set.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    # Least privilege: no cluster-wide watching of namespaces and CRDs.
    settings.scanning.disabled = True
    settings.peering.standalone = True
    settings.posting.level = logging.INFO
    memo.config = load()
    memo.kube = Kube()


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    kube = memo.get("kube")
    if kube is not None:
        await kube.close()


def _plain(value: Any) -> Any:
    """kopf's read-only views as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _modes(wf: Workflow) -> str:
    modes = wf.spec.modes
    parts = ["online"] if modes.online.enabled else []
    if modes.offline is not None:
        parts.append(f"offline ({modes.offline.shards} shards, '{modes.offline.schedule}')")
    if modes.nearline is not None:
        parts.append(f"nearline ({', '.join(modes.nearline.events)})")
    return ", ".join(parts) or "none"


async def _readiness(
    kube: Kube, namespace: str, children: Sequence[Mapping[str, Any]]
) -> list[str]:
    """What keeps the workflow from Ready; empty when every child Deployment is available."""
    waiting = []
    for child in children:
        if child.get("kind") != "Deployment":
            continue
        live = await kube.get("Deployment", str(child["name"]), namespace)
        if live is None:
            waiting.append(f"Deployment {child['name']}: missing")
            continue
        ok, why = deployment_ready(live)
        if not ok:
            waiting.append(why)
    return waiting


def _ready_condition(waiting: list[str], generation: int) -> dict[str, Any]:
    if waiting:
        return condition(READY, False, "ChildrenNotReady", "; ".join(waiting), generation)
    return condition(READY, True, "ChildrenReady", "every child is available", generation)


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile", backoff=RETRY_DELAY_S)
@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile", backoff=RETRY_DELAY_S)
@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile", backoff=RETRY_DELAY_S)
async def reconcile(
    body: kopf.Body,
    meta: kopf.Meta,
    spec: kopf.Spec,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    generation = int(meta.get("generation") or 1)
    current = _plain(status.get("conditions") or [])
    owner = Owner.from_body(body)
    source = f"EdgeWorkflow {namespace}/{name}"
    try:
        check_size(spec, source)  # before _plain walks it: a deep spec is invalid, not a crash
        doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name},
               "spec": _plain(spec)}  # fmt: skip
        wf = parse_document(doc, source=source)
        children, digest = desired_children(owner, wf, memo.config)
    except (WorkflowError, AnnotationError) as exc:
        problems = exc.problems if isinstance(exc, WorkflowError) else [str(exc)]
        message = "invalid workflow: " + "; ".join(problems)
        updates = [condition(VALID, False, "InvalidSpec", message, generation)]
        if status.get("children"):
            note = "the last valid version keeps running; fix the spec to roll out changes"
            updates.append(condition(DEPLOYED, False, "InvalidSpec", note, generation))
        else:
            updates.append(condition(DEPLOYED, False, "InvalidSpec", "nothing deployed",
                                     generation))  # fmt: skip
            updates.append(condition(READY, False, "InvalidSpec", "nothing deployed", generation))
        patch.status["conditions"] = conditions.merge(current, updates)
        patch.status["observedGeneration"] = generation
        kopf.warn(body, reason="InvalidWorkflow", message=message)
        logger.warning("%s", message)
        return

    kube: Kube = memo.kube
    valid = condition(VALID, True, "Validated", f"{len(wf.nodes)} nodes; modes: {_modes(wf)}",
                      generation)  # fmt: skip
    wanted = {(c["kind"], c["metadata"]["name"]) for c in children}
    counts: dict[str, int] = {}
    try:
        for child in children:
            outcome = await kube.ensure(child)
            counts[outcome] = counts.get(outcome, 0) + 1
        for kind, child_name in possible_children(name):
            if (kind, child_name) not in wanted and await kube.delete_owned(
                kind, child_name, owner.namespace, owner.uid
            ):
                counts["deleted"] = counts.get("deleted", 0) + 1
        listed = [{"kind": c["kind"], "name": c["metadata"]["name"]} for c in children]
        waiting = await _readiness(kube, owner.namespace, listed)
    except KubeError as exc:
        if exc.transient:
            raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY_S) from None
        failed = condition(DEPLOYED, False, "ApplyFailed", str(exc), generation)
        patch.status["conditions"] = conditions.merge(current, [valid, failed])
        patch.status["observedGeneration"] = generation
        kopf.warn(body, reason="ApplyFailed", message=str(exc))
        raise kopf.PermanentError(str(exc)) from None

    summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
    patch.status["conditions"] = conditions.merge(
        current,
        [
            valid,
            condition(
                DEPLOYED, True, "Reconciled", f"{len(children)} children match the spec", generation
            ),  # a message without this run's counts: a rerun writes nothing
            _ready_condition(waiting, generation),
        ],
    )
    patch.status["observedGeneration"] = generation
    patch.status["surface"] = wf.surface
    patch.status["configHash"] = digest
    patch.status["children"] = listed
    if set(counts) - {"unchanged"}:
        kopf.info(body, reason="Reconciled", message=f"{wf.surface}: {summary}")
    logger.info("reconciled %s/%s: %s", namespace, name, summary)


@kopf.timer(GROUP, VERSION, PLURAL, interval=READY_INTERVAL_S, id="readiness")
async def refresh_ready(
    meta: kopf.Meta,
    status: kopf.Status,
    namespace: str | None,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    current = _plain(status.get("conditions") or [])
    deployed = conditions.find(current, DEPLOYED)
    generation = int(meta.get("generation") or 1)
    if deployed is None or deployed.get("status") != "True":
        return
    if deployed.get("observedGeneration") != generation:
        return  # a reconcile of the new spec is under way; it writes every condition itself
    try:
        waiting = await _readiness(
            memo.kube, namespace or "default", _plain(status.get("children") or [])
        )
    except KubeError as exc:  # the next tick tries again
        logger.warning("readiness: %s", exc)
        return
    ready = _ready_condition(waiting, generation)
    updated = conditions.merge(current, [ready])
    if conditions.changed(current, updated):
        patch.status["conditions"] = updated
