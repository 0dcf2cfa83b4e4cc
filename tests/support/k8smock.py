"""kmock's KubernetesEmulator plus the API-server behaviour the operator relies on.

kmock 0.8 stores objects as plain JSON and merges patches into them. A real API server also:
sets uid, resourceVersion, generation, creationTimestamp, apiVersion/kind and generateName on
create; bumps resourceVersion on every change (generation only on spec changes); rejects a
write whose metadata.resourceVersion is stale (409) and a create of an existing name (409);
splits the status and scale subresources from the main resource; filters lists and watches by
labelSelector; and garbage-collects dependents through ownerReferences on delete. This class
adds exactly those, and nothing that would make the operator look better than it is: there
is still no StatefulSet controller and no kubelet (the tests play them), no strategic merge
(kubectl and the operator both send JSON merge patches for what they touch here) and no
server-side apply. Foreground and Background deletion both remove dependents at once;
Orphan leaves them.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import dicts, enums, rendering
from typing_extensions import override

# Resources whose writes go through the status (and scale) subresources, as their CRD/built-in
# declares. Keyed by (group, plural).
SCALE_PATHS = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}

_SELECTOR_TERM = re.compile(
    r"\s*(?P<key>[A-Za-z0-9_./-]+)\s*(?:(?P<op>==|!=|=)\s*(?P<value>[A-Za-z0-9_.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


class ApiStatusError(kmock.KubernetesError):
    """A Kubernetes Status error with a real reason string (NotFound, AlreadyExists, Conflict)."""


def _not_found(kind: str, name: str) -> ApiStatusError:
    return ApiStatusError(404, "NotFound", f'{kind} "{name}" not found', {"name": name, "kind": kind})


def prune(value: Any, schema: Mapping[str, Any]) -> Any:
    """What the API server keeps of `value` under a structural schema: object fields the schema
    does not name are dropped (unless x-kubernetes-preserve-unknown-fields), recursively."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is not None:
            return {k: prune(v, props[k]) for k, v in value.items() if k in props}
        if isinstance(extra, Mapping):
            return {k: prune(v, extra) for k, v in value.items()}
        return value
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [prune(v, schema["items"]) for v in value]
    return value


def matches_selector(labels: Mapping[str, str], selector: str) -> bool:
    """Whether `labels` satisfy a label selector string (=, ==, !=, in, notin, key, !key)."""
    if not selector.strip():
        return True
    # Split on commas outside parentheses: "a in (x,y),b=c".
    terms = re.split(r",(?![^()]*\))", selector)
    for term in terms:
        term = term.strip()
        if term.startswith("!"):
            if term[1:].strip() in labels:
                return False
            continue
        found = _SELECTOR_TERM.match(term)
        if found is None:
            raise ApiStatusError(400, "BadRequest", f"unable to parse requirement: {term!r}")
        key = found["key"]
        if found["op"] in ("=", "=="):
            if labels.get(key) != found["value"]:
                return False
        elif found["op"] == "!=":
            if labels.get(key) == found["value"]:
                return False
        elif found["setop"]:
            values = {v.strip() for v in found["values"].split(",") if v.strip()}
            if found["setop"] == "in" and labels.get(key) not in values:
                return False
            if found["setop"] == "notin" and key in labels and labels[key] in values:
                return False
        elif key not in labels:
            return False
    return True


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class K8sMock(kmock.KubernetesEmulator):
    """The emulator with identity, versioning, subresources, selectors and cascading deletion."""

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    # Injected failures: [method, plural, subresource, name, agent, status, times left]; see fail_next().
    _faults: list[list[Any]] = attrs.field(factory=list, init=False)
    # kind -> the structural schema its status writes are pruned to (see declare()).
    status_schemas: dict[str, Any] = attrs.field(factory=dict, init=False)

    def fail_next(
        self, method: str, plural: str, status: int, *, times: int = 1, subresource: str = "", name: str = "",
        agent: str = "",
    ) -> None:
        """Answer the next `times` matching requests (of a User-Agent prefix) with `status` (e.g. 409, 503)."""
        self._faults.append([method.upper(), plural, subresource, name, agent, status, times])

    def _injected_fault(self, request: rendering.Request) -> ApiStatusError | None:
        assert request.resource is not None
        for fault in self._faults:
            method, plural, sub, name, agent, status, left = fault
            if left > 0 and method == str(request.method.value) and plural == request.resource.plural \
                    and sub == (request.subresource or "") and name in ("", request.name) \
                    and str(request.headers.get("User-Agent", "")).startswith(agent):
                fault[6] -= 1
                reason = {401: "Unauthorized", 409: "Conflict", 429: "TooManyRequests", 500: "InternalError"}.get(
                    status, "ServiceUnavailable")
                return ApiStatusError(status, reason, f"injected by the test ({status})")
        return None

    def declare(
        self, resource: str, kind: str, *, namespaced: bool = True, subresources: tuple[str, ...] = (),
        shortnames: tuple[str, ...] = (), status_schema: dict[str, Any] | None = None,
    ) -> None:
        """Declare a served resource ('group/version/plural' or 'v1/plural') for discovery.

        `status_schema` (a CRD's structural schema of .status): status writes are pruned to it, as
        the API server prunes fields a structural schema does not name."""
        if status_schema is not None:
            self.status_schemas[str(kind)] = status_schema
        verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
        self.resources[resource] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=verbs, subresources=set(subresources),
            shortnames=set(shortnames),
        )

    # -- request routing -------------------------------------------------------------------

    @override
    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is None or res.plural is None:
            return await super()._handle(request)
        method = request.method
        if (fault := self._injected_fault(request)) is not None:
            raise fault
        if request.subresource == "scale":
            return await self._serve_scale(request)
        if method == enums.method.POST and request.name is None:
            return await self._create(request)
        if method in (enums.method.PATCH, enums.method.PUT) and request.name is not None:
            return await self._update(request)
        if method == enums.method.DELETE and request.name is not None:
            return await self._delete(request)
        # Reads skip kmock's reaction matching, which rescans every past request per request
        # (quadratic: 50 LargeModels' traffic slowed it to a crawl); no test adds reactions here.
        reads: dict[enums.action, Callable[[rendering.Request], rendering.Payload]] = {
            enums.action.LIST: self._serve_list, enums.action.WATCH: self._serve_watch,
            enums.action.FETCH: self._serve_fetch,
        }
        if request.action in reads:
            return await rendering.Response(payload=reads[request.action])(request)
        return await super()._handle(request)

    def _info(self, request: rendering.Request) -> kmock.ResourceInfo:
        assert request.resource is not None
        for resource in self._get_resources():
            if resource == request.resource:
                return self.resources[resource]
        raise kmock.KubernetesResourceNotFoundError()

    def _key(self, request: rendering.Request, name: str | None = None) -> Any:
        return (request.resource, request.namespace, name or request.name)

    def _live(self, key: Any) -> kmock.Object | None:
        obj = self._objects[key] if key in self._objects else None  # noqa: SIM401 (no .get on ObjectsArray)
        return None if obj is None or obj.deleted else obj

    def _bump(self, raw: dict[str, Any]) -> None:
        raw.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))

    async def _emit(self, request: rendering.Request, kind: str, raw: dict[str, Any]) -> None:
        assert request.resource is not None
        await self._buses[request.resource].put({"type": kind, "object": copy.deepcopy(raw)})

    # -- create ------------------------------------------------------------------------------

    async def _create(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        info = self._info(request)
        assert request.resource is not None
        body = copy.deepcopy(request.data) if isinstance(request.data, dict) else None
        if body is None:
            raise ApiStatusError(400, "BadRequest", "the body of a create must be a JSON object")
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise ApiStatusError(422, "Invalid", "metadata.name: Required value")
        if info.namespaced:
            meta["namespace"] = request.namespace or meta.get("namespace") or "default"
        key = (request.resource, meta.get("namespace") if info.namespaced else None, meta["name"])
        if self._live(key) is not None:
            raise ApiStatusError(
                409, "AlreadyExists", f'{info.kind} "{meta["name"]}" already exists', {"name": meta["name"]}
            )
        group, version = request.resource.group, request.resource.version
        body["apiVersion"] = f"{group}/{version}" if group else str(version)
        body["kind"] = info.kind
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        meta.pop("deletionTimestamp", None)
        if "status" in info.subresources:
            body.pop("status", None)  # the status subresource owns it; create ignores it
        self._bump(body)
        if key in self._objects:
            self._objects[key].create(body)
        else:
            self._objects[key] = body
        await self._emit(request, "ADDED", body)
        owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
        if owners and not owners & self._live_uids():
            # The garbage collector removes an object whose owners are all gone (a controller that
            # acted on a stale list, say); a real one does it moments later, this one at once.
            await self._remove(request, key, body, cascade=True)
        return aiohttp.web.json_response(body, status=201)

    def _live_uids(self) -> set[str]:
        return {str(obj.raw["metadata"].get("uid")) for obj in self._objects.values() if not obj.deleted}

    # -- update (PATCH merge / json-patch, PUT replace) -------------------------------------

    async def _update(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        info = self._info(request)
        key = self._key(request)
        obj = self._live(key)
        if obj is None:
            raise _not_found(str(info.kind), str(request.name))
        old = copy.deepcopy(obj.raw)
        new = self._apply_change(request, old)
        if request.subresource == "status":
            new = {**old, "status": new.get("status")} if "status" in new else {k: v for k, v in old.items() if k != "status"}
            schema = self.status_schemas.get(str(info.kind))
            if schema is not None and isinstance(new.get("status"), dict):
                new["status"] = prune(new["status"], schema)
        elif "status" in info.subresources:
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        # Identity and server-set fields cannot be changed by clients.
        for field in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "name", "namespace"):
            if field in old.get("metadata", {}):
                new.setdefault("metadata", {})[field] = old["metadata"][field]
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return aiohttp.web.json_response(old)  # a no-op write changes nothing, emits nothing
        spec_old = {k: v for k, v in old.items() if k not in ("metadata", "status")}
        spec_new = {k: v for k, v in new.items() if k not in ("metadata", "status")}
        if spec_old != spec_new:
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self._bump(new)
        obj.history.append(new)
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            await self._remove(request, key, new, cascade=True)
        else:
            await self._emit(request, "MODIFIED", new)
        return aiohttp.web.json_response(new)

    def _apply_change(self, request: rendering.Request, old: dict[str, Any]) -> dict[str, Any]:
        data = request.data
        content_type = request.headers.get("Content-Type", "")
        if request.method == enums.method.PUT:
            if not isinstance(data, dict):
                raise ApiStatusError(400, "BadRequest", "the body of a replace must be a JSON object")
            self._check_precondition(old, data)
            return copy.deepcopy(data)
        if isinstance(data, list) or "json-patch" in content_type:
            try:
                return dict(jsonpatch.apply_patch(old, data, in_place=False))
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
                raise ApiStatusError(422, "Invalid", f"json patch: {err}") from None
        if "strategic-merge-patch" in content_type:
            raise ApiStatusError(415, "UnsupportedMediaType", "strategic merge patch is not emulated")
        if not isinstance(data, dict):
            raise ApiStatusError(400, "BadRequest", "the body of a merge patch must be a JSON object")
        self._check_precondition(old, data)
        try:
            return dict(dicts.merge_patch_dict(old, data))
        except ValueError as err:
            raise ApiStatusError(422, "Invalid", str(err)) from None

    @staticmethod
    def _check_precondition(old: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        wanted = (data.get("metadata") or {}).get("resourceVersion")
        current = old.get("metadata", {}).get("resourceVersion")
        if wanted and wanted != current:
            raise ApiStatusError(
                409, "Conflict",
                "Operation cannot be fulfilled: the object has been modified; "
                "please apply your changes to the latest version and try again",
            )

    # -- scale subresource ---------------------------------------------------------------------

    async def _serve_scale(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        info = self._info(request)
        if "scale" not in info.subresources:
            raise _not_found(str(info.kind), f"{request.name}/scale")
        key = self._key(request)
        obj = self._live(key)
        if obj is None:
            raise _not_found(str(info.kind), str(request.name))
        raw = obj.raw
        if request.method in (enums.method.PATCH, enums.method.PUT):
            scale = self._apply_change(request, self._scale_of(raw))
            replicas = (scale.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                raise ApiStatusError(422, "Invalid", "spec.replicas must be a non-negative integer")
            if raw.get("spec", {}).get("replicas") != replicas:
                new = copy.deepcopy(raw)
                new.setdefault("spec", {})["replicas"] = replicas
                new["metadata"]["generation"] = int(raw["metadata"].get("generation", 1)) + 1
                self._bump(new)
                obj.history.append(new)
                await self._emit(request, "MODIFIED", new)
                raw = new
        elif request.method != enums.method.GET:
            raise ApiStatusError(405, "MethodNotAllowed", f"{request.method} is not allowed on scale")
        return aiohttp.web.json_response(self._scale_of(raw))

    @staticmethod
    def _scale_of(raw: Mapping[str, Any]) -> dict[str, Any]:
        meta = raw.get("metadata", {})
        status = raw.get("status") or {}
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta},
            "spec": {"replicas": (raw.get("spec") or {}).get("replicas", 0)},
            "status": {"replicas": status.get("replicas", 0), "selector": status.get("selector", "")},
        }

    # -- delete and garbage collection -------------------------------------------------------

    async def _delete(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        info = self._info(request)
        key = self._key(request)
        obj = self._live(key)
        if obj is None:
            raise _not_found(str(info.kind), str(request.name))
        options = request.data if isinstance(request.data, dict) else {}
        policy = request.params.get("propagationPolicy") or options.get("propagationPolicy") or "Background"
        raw = copy.deepcopy(obj.raw)
        wanted_uid = (options.get("preconditions") or {}).get("uid")
        if wanted_uid and wanted_uid != raw["metadata"].get("uid"):
            raise ApiStatusError(409, "Conflict", f"Precondition failed: UID in precondition: {wanted_uid}, "
                                 f"UID in object meta: {raw['metadata'].get('uid')}")
        if raw["metadata"].get("finalizers"):
            if not raw["metadata"].get("deletionTimestamp"):
                raw["metadata"]["deletionTimestamp"] = _now()
                self._bump(raw)
                obj.history.append(raw)
                await self._emit(request, "MODIFIED", raw)
            return aiohttp.web.json_response(raw)
        await self._remove(request, key, raw, cascade=policy != "Orphan")
        return aiohttp.web.json_response(raw)

    async def _remove(self, request: rendering.Request, key: Any, raw: dict[str, Any], *, cascade: bool) -> None:
        self._objects[key].delete()
        await self._emit(request, "DELETED", raw)
        if cascade:
            await self._collect_dependents(str(raw["metadata"].get("uid", "")))

    async def _collect_dependents(self, owner_uid: str) -> None:
        """Delete (or mark, when they hold finalizers) every object owned by `owner_uid`, recursively."""
        if not owner_uid:
            return
        for (resource, namespace, name), obj in list(self._objects.items()):
            if obj.deleted:
                continue
            raw = copy.deepcopy(obj.raw)
            owners = raw.get("metadata", {}).get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in owners):
                continue
            fake = rendering.Request(resource=resource, namespace=namespace, name=name)
            if raw["metadata"].get("finalizers"):
                if not raw["metadata"].get("deletionTimestamp"):
                    raw["metadata"]["deletionTimestamp"] = _now()
                    self._bump(raw)
                    obj.history.append(raw)
                    await self._emit(fake, "MODIFIED", raw)
                continue
            await self._remove(fake, (resource, namespace, name), raw, cascade=True)

    # -- reads: discovery fix, label selectors, a real list resourceVersion -----------------

    @override
    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        result: Any = await super()._serve_version(request)
        # kmock writes the core group's groupVersion as "/v1"; kubectl then cannot map pods.
        result["groupVersion"] = str(result["groupVersion"]).lstrip("/")
        for entry in result["resources"]:
            if "/" in entry["name"]:  # subresources have no short names (kubectl warns of ambiguity)
                entry["shortNames"], entry["categories"], entry["singularName"] = [], [], ""
        return result

    @override
    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        result: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector", "")
        result["items"] = [
            item for item in result["items"]
            if matches_selector((item.get("metadata") or {}).get("labels") or {}, selector)
        ]
        result["metadata"]["resourceVersion"] = str(next(self._versions))
        assert request.resource is not None
        group, version = request.resource.group, request.resource.version
        result["apiVersion"] = f"{group}/{version}" if group else str(version)
        result["kind"] = f"{self._info(request).kind}List"
        return json.loads(json.dumps(result))

    @override
    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        selector = request.params.get("labelSelector", "")
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and selector:
                labels = ((event.get("object") or {}).get("metadata") or {}).get("labels") or {}
                if not matches_selector(labels, selector):
                    continue
            yield event
