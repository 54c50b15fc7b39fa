"""The operator's own Kubernetes calls: read, create-or-patch and prune its children.

Children are plain dicts (lightkube generic resources), written with JSON merge patches only
when they differ from the live object, so a second reconcile of an unchanged workflow makes
no write at all. Errors are sorted into transient (retry) and permanent (stop and report).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.generic_resource import create_namespaced_resource
from lightkube.types import PatchType

from edgeflow_operator import GROUP, KIND, PLURAL, VERSION

# kind -> (group, version, plural) of every kind the operator reads or writes.
KINDS: Final = {
    "ConfigMap": ("", "v1", "configmaps"),
    "Service": ("", "v1", "services"),
    "Deployment": ("apps", "v1", "deployments"),
    "CronJob": ("batch", "v1", "cronjobs"),
    "HorizontalPodAutoscaler": ("autoscaling", "v2", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets"),
    KIND: (GROUP, VERSION, PLURAL),
}
# Conflicts, throttling, timeouts and server trouble pass; the rest needs a person.
TRANSIENT_CODES: Final = frozenset({401, 408, 409, 425, 429, 500, 502, 503, 504})

_RESOURCES: dict[str, Any] = {}


def resource(kind: str) -> Any:
    if kind not in _RESOURCES:
        group, version, plural = KINDS[kind]
        _RESOURCES[kind] = create_namespaced_resource(group, version, kind, plural)
    return _RESOURCES[kind]


class KubeError(Exception):
    """A failed API call, naming the object; `transient` says whether a retry may help."""

    def __init__(self, kind: str, name: str, action: str, code: int | None, message: str):
        self.kind, self.name, self.code = kind, name, code
        self.transient = code is None or code in TRANSIENT_CODES
        where = f"{kind} {name}"
        status = f" (HTTP {code})" if code is not None else ""
        super().__init__(f"{action} {where}{status}: {message}")


def _error(kind: str, name: str, action: str, exc: Exception) -> KubeError:
    if isinstance(exc, ApiError):
        code = exc.status.code if exc.status.code is not None else exc.response.status_code
        return KubeError(kind, name, action, code, exc.status.message or str(exc))
    return KubeError(kind, name, action, None, f"{type(exc).__name__}: {exc}")


def contains(live: Any, desired: Any) -> bool:
    """Whether the live object already has every field of the desired one (the server may
    have added defaults and status). A desired None is a field that must be unset, which a
    merge patch removes."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            live.get(k) is None if v is None else k in live and contains(live[k], v)
            for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    return bool(live == desired)


Outcome = Literal["created", "patched", "unchanged"]


class Kube:
    def __init__(self, client: AsyncClient | None = None) -> None:
        self._client = client

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            # In a pod: the service account; elsewhere: KUBECONFIG or ~/.kube/config.
            self._client = AsyncClient(field_manager="edgeflow-operator")
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def get(self, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            obj = await self.client.get(resource(kind), name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise _error(kind, name, "read", exc) from None
        except httpx2.HTTPError as exc:
            raise _error(kind, name, "read", exc) from None
        return dict(obj.to_dict())

    async def ensure(self, manifest: Mapping[str, Any]) -> Outcome:
        """Create the object, or merge-patch it where it differs from the manifest."""
        kind = str(manifest["kind"])
        meta = manifest["metadata"]
        name, namespace = str(meta["name"]), str(meta["namespace"])
        live = await self.get(kind, name, namespace)
        res = resource(kind)
        try:
            if live is None:
                await self.client.create(res(dict(manifest)))
                return "created"
            if contains(live, manifest):
                return "unchanged"
            await self.client.patch(
                res, name, dict(manifest), namespace=namespace, patch_type=PatchType.MERGE
            )
            return "patched"
        except (ApiError, httpx2.HTTPError) as exc:
            raise _error(kind, name, "create" if live is None else "patch", exc) from None

    async def delete_owned(self, kind: str, name: str, namespace: str, owner_uid: str) -> bool:
        """Delete a child that the owner no longer needs; objects it does not own stay."""
        live = await self.get(kind, name, namespace)
        if live is None:
            return False
        refs = live.get("metadata", {}).get("ownerReferences") or []
        if not any(r.get("uid") == owner_uid for r in refs):
            return False
        try:
            await self.client.delete(resource(kind), name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return False
            raise _error(kind, name, "delete", exc) from None
        except httpx2.HTTPError as exc:
            raise _error(kind, name, "delete", exc) from None
        return True
