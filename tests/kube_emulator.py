"""A Kubernetes API emulator for tests: kmock's KubernetesEmulator with its gaps closed.

kmock (by kopf's author) serves discovery, CRUD, merge/JSON patches and watch streams from
memory. This subclass adds what kopf and kubectl rely on and kmock 0.8 lacks:
- `/api/v1/namespaces` (500 in kmock) and the core group's discovery ("v1", not "/v1");
- standard error reasons (NotFound, AlreadyExists, Invalid) and kinds on list responses;
- uid, resourceVersion, creationTimestamp, generation (bumped on spec changes) and
  generateName on every object, so kopf.adopt works and kopf sees its own writes;
- CRDs that become discoverable when created, with their status subresource honoured (status
  only through /status) and their schema enforced: defaults, then validation (422 Invalid);
- PUT, label selectors on lists and ownerReference garbage collection on delete.
There are still no controllers: a Deployment never gets Pods (tests set its status).

`EmulatorThread` runs it on a loopback port in a thread of its own, with a kubeconfig for
kopf, lightkube and kubectl.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import httpx
import jsonpatch
import kmock
import yaml
from crd_schema import CrdValidator
from kmock._internal import dicts, enums, rendering

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
# group/version/plural: (kind, namespaced, subresources)
BUILTINS: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "v1/namespaces": ("Namespace", False, ()),
    "v1/events": ("Event", True, ()),
    "v1/configmaps": ("ConfigMap", True, ()),
    "v1/secrets": ("Secret", True, ()),
    "v1/services": ("Service", True, ("status",)),
    "v1/serviceaccounts": ("ServiceAccount", True, ()),
    "v1/pods": ("Pod", True, ("status",)),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", True, ("status",)),
    "apps/v1/deployments": ("Deployment", True, ("status", "scale")),
    "apps/v1/statefulsets": ("StatefulSet", True, ("status", "scale")),
    "batch/v1/jobs": ("Job", True, ("status",)),
    "batch/v1/cronjobs": ("CronJob", True, ("status",)),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", True, ("status",)),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, ("status",)),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True, ()),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, ()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, ()),
    "rbac.authorization.k8s.io/v1/clusterroles": ("ClusterRole", False, ()),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": ("ClusterRoleBinding", False, ()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, ()),
}
SHORT_NAMES = {
    "namespaces": ["ns"],
    "configmaps": ["cm"],
    "services": ["svc"],
    "serviceaccounts": ["sa"],
    "persistentvolumeclaims": ["pvc"],
    "pods": ["po"],
    "deployments": ["deploy"],
    "statefulsets": ["sts"],
    "cronjobs": ["cj"],
    "horizontalpodautoscalers": ["hpa"],
    "poddisruptionbudgets": ["pdb"],
    "networkpolicies": ["netpol"],
    "customresourcedefinitions": ["crd", "crds"],
}
REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
           409: "AlreadyExists", 422: "Invalid", 500: "InternalError"}  # fmt: skip


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch (kmock's flavour: None deletes) that turns `old` into `new`."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return copy.deepcopy(new)
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old:
            out[k] = copy.deepcopy(v)
        elif old[k] != v:
            out[k] = merge_diff(old[k], v)
    return out


def _strip_directives(value: Any) -> Any:
    """Strategic-merge-patch directives ($patch, $setElementOrder/...) have no place here."""
    if isinstance(value, Mapping):
        return {k: _strip_directives(v) for k, v in value.items() if not str(k).startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return value


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.reason = reason or REASONS.get(code, "InternalError")


class ApiEmulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = itertools.count(1)
        self._validators: dict[kmock.resource, CrdValidator] = {}
        self._columns: dict[kmock.resource, list[dict[str, Any]]] = {}
        self.namespaces: set[str] = {"default"}
        # Injected failures: [method, plural, namespace, code, times left (None: forever)].
        self.faults: list[list[Any]] = []
        for key, (kind, namespaced, subs) in BUILTINS.items():
            self.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=ALL_VERBS, subresources=subs,
                singular=kind.lower(), shortnames=SHORT_NAMES.get(key.rsplit("/", 1)[-1], []),
            )  # fmt: skip

    # ---- entry point: namespaces, PUT and our own errors before kmock sees the request -------
    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        parts = raw.path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            await raw.read()
            return await self._serve_namespaces(raw, parts[3] if len(parts) == 4 else None)
        return await super().__call__(raw)

    async def _serve_namespaces(
        self, raw: aiohttp.web.BaseRequest, name: str | None
    ) -> aiohttp.web.StreamResponse:
        def ns(n: str) -> dict[str, Any]:
            return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n},
                    "status": {"phase": "Active"}}  # fmt: skip

        if raw.method == "POST":
            body = await raw.json()
            self.namespaces.add(body["metadata"]["name"])
            return aiohttp.web.json_response(ns(body["metadata"]["name"]), status=201)
        if name is None:
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"},
                "items": [ns(n) for n in sorted(self.namespaces)],
            })  # fmt: skip
        if name in self.namespaces:
            return aiohttp.web.json_response(ns(name))
        return self._status(ApiError(404, f'namespaces "{name}" not found'))

    @staticmethod
    def _status(exc: ApiError) -> aiohttp.web.Response:
        body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": exc.message, "reason": exc.reason, "code": exc.code}  # fmt: skip
        # Exactly this content type, as the API server sends it (lightkube relies on it).
        return aiohttp.web.Response(
            body=json.dumps(body).encode(), status=exc.code,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, ApiError):
            return self._status(exc)
        if isinstance(exc, kmock.KubernetesError):
            reason = REASONS.get(exc.status, "InternalError")
            if isinstance(exc, kmock.KubernetesNotFoundError) or exc.status == 404:
                reason = "NotFound"
            return self._status(ApiError(exc.status, exc.message or reason, reason))
        return await super()._render_error(exc)

    # ---- writes: stamp metadata, honour subresources, validate custom resources -------------
    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None:
            return await super()._handle(request)
        if request.action in (enums.action.LIST, enums.action.FETCH):
            table = self._table(request)
            if table is not None:
                return table
        for fault in self.faults:
            method, plural, namespace, code, left = fault
            if (request.method.value == method and request.resource.plural == plural
                    and request.namespace == namespace and left != 0):  # fmt: skip
                fault[4] = None if left is None else left - 1
                return self._status(ApiError(code, f"injected failure of {method} {plural}"))
        original = request
        if request.method == enums.method.PUT and request.name is not None:
            request = attrs.evolve(request, action=enums.action.UPDATE)
        try:
            if request.action == enums.action.CREATE:
                request = self._prepare_create(request)
            elif request.action == enums.action.UPDATE and request.name is not None:
                request = self._prepare_update(request)
            elif request.action == enums.action.DELETE and request.name is not None:
                return await self._delete(request)
        except ApiError as exc:
            return self._status(exc)
        if request is not original:  # kmock matches reactions to the requests it recorded
            idx = next(i for i, r in enumerate(self._requests) if r is original)
            self._requests[idx] = request
        response = await super()._handle(request)
        if request.action == enums.action.CREATE and request.resource == kmock.resource(
            "apiextensions.k8s.io", "v1", "customresourcedefinitions"
        ):
            self._register_crd(request.data)
        return response

    def _info(self, res: kmock.resource) -> kmock.ResourceInfo | None:
        # kmock's arrays create entries on access, and have no .get()
        return self.resources[res] if res in self.resources else None  # noqa: SIM401

    def _prepare_create(self, request: rendering.Request) -> rendering.Request:
        data = _strip_directives(request.data or {})
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiError(422, "metadata.name: Required value")
        info = self._info(request.resource)  # type: ignore[arg-type]
        if info is not None and info.namespaced:
            meta["namespace"] = request.namespace or meta.get("namespace") or "default"
            self.namespaces.add(meta["namespace"])
        if info is not None and "status" in info.subresources and request.resource.group not in (
            "", "apps", "batch", "autoscaling", "policy"
        ):  # fmt: skip
            data.pop("status", None)  # custom resources: status only through /status
        meta.update(
            uid=str(uuid.uuid4()), resourceVersion=str(next(self._rv)),
            creationTimestamp=_now(), generation=1,
        )  # fmt: skip
        self._validate(request.resource, data)  # type: ignore[arg-type]
        return attrs.evolve(request, data=data)

    def _prepare_update(self, request: rendering.Request) -> rendering.Request:
        key = (request.resource, request.namespace, request.name)
        obj = self.objects[key] if key in self.objects else None  # noqa: SIM401
        if obj is None or obj.deleted:
            raise ApiError(404, f'{request.resource.plural} "{request.name}" not found')  # type: ignore[union-attr]
        old = copy.deepcopy(obj.raw)
        patch = _strip_directives(request.data)
        if request.method == enums.method.PUT:
            new = copy.deepcopy(patch)
        elif isinstance(patch, list):
            try:
                new = jsonpatch.apply_patch(old, patch, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise ApiError(422, f"the JSON patch does not apply: {exc}") from None
        else:
            new = copy.deepcopy(dict(dicts.merge_patch_dict(old, patch or {})))
        info = self._info(request.resource)  # type: ignore[arg-type]
        if request.subresource == "status":
            new = {**old, "status": new.get("status")}
        elif info is not None and "status" in info.subresources:
            new = {k: v for k, v in new.items() if k != "status"}
            if "status" in old:
                new["status"] = old["status"]
        if request.subresource != "status":  # defaults first: they are part of the spec
            self._validate(request.resource, new)  # type: ignore[arg-type]
        meta = new.setdefault("metadata", {})
        for k in ("uid", "creationTimestamp", "name", "namespace"):
            if k in old.get("metadata", {}):
                meta[k] = old["metadata"][k]
        generation = int(old.get("metadata", {}).get("generation", 1))
        meta["generation"] = generation + (1 if new.get("spec") != old.get("spec") else 0)
        meta["resourceVersion"] = str(next(self._rv))
        return attrs.evolve(request, data=merge_diff(old, new))

    def _validate(self, res: kmock.resource, data: dict[str, Any]) -> None:
        validator = self._validators.get(res)
        if validator is None:
            return
        defaulted = validator.defaulted(data)
        errors = validator.errors(defaulted)
        if errors:
            name = data.get("metadata", {}).get("name", "")
            raise ApiError(422, f'{validator.kind}.{res.group} "{name}" is invalid: '
                           + "; ".join(errors))  # fmt: skip
        data.clear()
        data.update(defaulted)

    def _register_crd(self, crd: Mapping[str, Any]) -> None:
        spec, names = crd["spec"], crd["spec"]["names"]
        for ver in spec["versions"]:
            res = kmock.resource(spec["group"], ver["name"], names["plural"])
            self.resources[res] = kmock.ResourceInfo(
                kind=names["kind"], namespaced=spec.get("scope") == "Namespaced",
                singular=names.get("singular"), shortnames=names.get("shortNames", []),
                categories=names.get("categories", []), verbs=ALL_VERBS,
                subresources=list(ver.get("subresources", {})),
            )  # fmt: skip
            self._validators[res] = CrdValidator(crd, ver["name"])
            self._columns[res] = list(ver.get("additionalPrinterColumns", []))

    async def _delete(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """Delete, then garbage-collect dependents by ownerReference (background cascade)."""
        response = await super()._handle(request)
        if response.status >= 300:
            return response
        gone: list[str] = []
        key = (request.resource, request.namespace, request.name)
        if key in self.objects:
            uid = self.objects[key].last.raw.get("metadata", {}).get("uid")
            gone = [uid] if uid else []
        async with self._lock:
            while gone:
                owner = gone.pop()
                for (res, _ns, _name), obj in list(self.objects.items()):
                    if obj.deleted:
                        continue
                    refs = obj.raw.get("metadata", {}).get("ownerReferences") or []
                    if any(r.get("uid") == owner for r in refs):
                        raw = obj.raw
                        obj.delete()
                        await self._buses[res].put({"type": "DELETED", "object": raw})
                        gone.append(raw["metadata"].get("uid", ""))
        return response

    # ---- reads: list kinds and label selectors, core discovery --------------------------------
    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        payload: Any = await super()._serve_list(request)
        res = request.resource
        info = self._info(res) if res is not None else None
        if res is not None and info is not None and info.kind:
            payload["kind"] = f"{info.kind}List"
            payload["apiVersion"] = f"{res.group}/{res.version}" if res.group else res.version
        payload["metadata"] = {"resourceVersion": str(next(self._rv))}
        selector = request.params.get("labelSelector")
        if selector:
            wanted = dict(p.split("=", 1) for p in selector.replace("==", "=").split(","))
            payload["items"] = [
                i for i in payload["items"]
                if all(i.get("metadata", {}).get("labels", {}).get(k) == v
                       for k, v in wanted.items())
            ]  # fmt: skip
        return payload  # type: ignore[no-any-return]

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        """Watch from the given resourceVersion; kmock subscribes to changes only after it has
        streamed the existing objects, so a change made meanwhile would be lost."""
        yield b""
        assert request.resource is not None
        since = int(request.params.get("resourceVersion") or 0) if str(
            request.params.get("resourceVersion", "")
        ).isdigit() else 0  # fmt: skip
        bus = self._buses[request.resource]
        async with self._lock:
            marker = await bus.mark()
            existing = [
                obj.raw for (res, ns, name), obj in self.objects.items()
                if not obj.deleted and self._watched(request, res, ns, name)
                and int(obj.raw.get("metadata", {}).get("resourceVersion") or 0) > since
            ]  # fmt: skip
        try:
            for raw in existing:
                yield {"type": "ADDED" if since == 0 else "MODIFIED", "object": raw}
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if self._watched(request, request.resource, meta.get("namespace"),
                                 meta.get("name")):  # fmt: skip
                    yield event
        finally:
            await bus.unmark(marker)

    @staticmethod
    def _watched(
        request: rendering.Request, res: Any, namespace: str | None, name: str | None
    ) -> bool:
        return (
            res == request.resource
            and request.namespace in (None, namespace)
            and request.name in (None, name)
        )

    async def _serve_server_version(self, request: rendering.Request) -> rendering.Payload:
        return {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        payload: Any = await super()._serve_version(request)
        if request.resource is not None and request.resource.group == "":
            payload["groupVersion"] = request.resource.version
        for entry in payload.get("resources", []):
            if "/" in entry["name"]:  # a subresource has no short names of its own
                entry["shortNames"], entry["categories"] = [], []
        return payload  # type: ignore[no-any-return]

    def _table(self, request: rendering.Request) -> aiohttp.web.Response | None:
        """`kubectl get` asks for a Table: print a CRD's additionalPrinterColumns."""
        res = request.resource
        columns = self._columns.get(res) if res is not None else None
        accept = request.headers.get("Accept", "")
        if columns is None or "as=Table" not in accept or request.subresource:
            return None
        rows = []
        for (r, ns, name), obj in list(self.objects.items()):
            if r != res or obj.deleted or (request.namespace not in (None, ns)):
                continue
            if request.name is not None and name != request.name:
                continue
            raw = obj.raw
            cells: list[Any] = [name]
            for col in columns:
                value = jsonpath(raw, col["jsonPath"])
                cells.append(_age(value) if col["type"] == "date" and value else value or "")
            rows.append({"cells": cells, "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": raw.get("metadata", {})}})  # fmt: skip
        if request.name is not None and not rows:
            return self._status(ApiError(404, f'{res.plural} "{request.name}" not found'))  # type: ignore[union-attr]
        return aiohttp.web.json_response({
            "kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(next(self._rv))},
            "columnDefinitions": [
                {"name": "Name", "type": "string", "format": "name", "priority": 0},
                *({"name": c["name"], "type": "string", "format": "", "priority": 0}
                  for c in columns),
            ],
            "rows": rows,
        })  # fmt: skip


def jsonpath(obj: Any, path: str) -> Any:
    """The few JSONPath forms printer columns use: .a.b and .a[?(@.k=="v")].b"""
    for step in re.findall(r'\.([A-Za-z0-9_-]+)|\[\?\(@\.(\w+)=="([^"]*)"\)\]', path):
        field, key, value = step
        if field:
            obj = obj.get(field) if isinstance(obj, Mapping) else None
        else:
            obj = next((i for i in obj or [] if isinstance(i, Mapping) and i.get(key) == value),
                       None)  # fmt: skip
    return obj


def _age(stamp: str) -> str:
    then = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


class EmulatorThread:
    """The emulator on a loopback port, in its own thread and event loop."""

    def __init__(self, workdir: Path) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.emulator: ApiEmulator | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes API emulator did not start")
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test"}}],
            "contexts": [{"name": "emulator", "context": {
                "cluster": "emulator", "user": "tester", "namespace": "default"}}],
        }))  # fmt: skip
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiEmulator() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        self.http.close()
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # ---- a small synchronous client for assertions ------------------------------------------
    def get(self, path: str) -> dict[str, Any] | None:
        resp = self.http.get(path)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def items(self, path: str) -> list[dict[str, Any]]:
        listing = self.get(path)
        return list(listing["items"]) if listing else []

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        resp = self.http.post(path, json=dict(body))
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        resp = self.http.patch(
            path, content=json.dumps(body),
            headers={"Content-Type": "application/merge-patch+json"},
        )  # fmt: skip
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def inject(
        self, method: str, plural: str, namespace: str, code: int, times: int | None = None
    ) -> None:
        """Fail matching requests with `code`, `times` times (None: every time)."""
        assert self.emulator is not None
        self.emulator.faults.append([method, plural, namespace, code, times])

    def requests(self) -> list[rendering.Request]:
        """Every request served so far (kmock records them)."""
        assert self.emulator is not None
        return list(self.emulator._requests)
