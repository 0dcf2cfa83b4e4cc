"""A small async Kubernetes API client for the reconcile loop, on kopf's credentials.

kopf watches; this client lists children and writes them. It speaks plain REST with aiohttp
(kopf's own transport) so the operator has no second Kubernetes library. Every write carries
`fieldManager`, merge patches are `application/merge-patch+json`, and every request is
counted by verb and resource (largemodel_operator_api_requests_total) so tests and the bench
can see how many writes a pass made.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from largemodel import metrics
from largemodel.operator import api

log = logging.getLogger(__name__)

USER_AGENT = "largemodel-operator/0.1"
# API statuses worth retrying: conflicts, throttling, server trouble. Everything else is a bug or a
# user error and would fail the same way again.
TRANSIENT_STATUSES = frozenset({409, 429, 500, 502, 503, 504})

_PLURALS = {"StatefulSet": "statefulsets", "Service": "services", "Pod": "pods", "Secret": "secrets",
            "NetworkPolicy": "networkpolicies", "PodGroup": "podgroups", api.KIND: api.PLURAL}


class ApiError(Exception):
    """A failed API request, with the server's status code and reason."""

    def __init__(self, status: int, reason: str, message: str, what: str) -> None:
        super().__init__(f"{what}: {status} {reason}: {message}")
        self.status = status
        self.reason = reason

    @property
    def transient(self) -> bool:
        """Whether retrying later may succeed."""
        return self.status in TRANSIENT_STATUSES


def resource_path(api_version: str, kind: str, namespace: str, name: str = "", subresource: str = "") -> str:
    """REST path of a namespaced object (or collection when `name` is empty)."""
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{_PLURALS[kind]}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def _resource_label(path: str) -> str:
    parts = path.split("/")
    if "namespaces" in parts:
        index = parts.index("namespaces") + 2
        rest = parts[index:]
        return "/".join([rest[0], *rest[2:3]]) if rest else "?"
    return "?"


class KubeClient:
    """REST calls the reconcile loop makes, over one aiohttp session."""

    def __init__(self, info: kopf.ConnectionInfo, field_manager: str) -> None:
        headers = {**info.as_http_headers(), "User-Agent": USER_AGENT}
        self._session = aiohttp.ClientSession(
            base_url=info.server.rstrip("/") + "/",
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=30),
        )
        self.field_manager = field_manager

    async def close(self) -> None:
        """Close the session."""
        await self._session.close()

    async def _call(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None, body: Any = None,
        content_type: str = "application/json", missing_ok: bool = False,
    ) -> dict[str, Any] | None:
        verb = {
            "GET": "list" if params and "labelSelector" in params else "get",
            "POST": "create", "PATCH": "patch", "DELETE": "delete",
        }[method]
        metrics.OPERATOR_API_REQUESTS.labels(verb=verb, resource=_resource_label(path)).inc()
        headers = {"Content-Type": content_type} if body is not None else {}
        try:
            async with self._session.request(
                method, path.lstrip("/"), params=params, json=body, headers=headers
            ) as reply:
                if reply.status == 404 and missing_ok:
                    return None
                data = await reply.json(content_type=None) if reply.content_length != 0 else {}
                if reply.status >= 400:
                    info = data if isinstance(data, dict) else {}
                    raise ApiError(reply.status, str(info.get("reason", "")), str(info.get("message", "")),
                                   f"{method} {path}")
                return dict(data) if isinstance(data, dict) else {}
        except (aiohttp.ClientError, TimeoutError) as err:
            raise ApiError(503, "Unavailable", repr(err), f"{method} {path}") from err

    async def get(self, path: str) -> dict[str, Any] | None:
        """GET one object; None when it does not exist."""
        return await self._call("GET", path, missing_ok=True)

    async def list(self, path: str, selector: str) -> list[dict[str, Any]]:
        """LIST a collection by label selector."""
        data = await self._call("GET", path, params={"labelSelector": selector})
        return list((data or {}).get("items") or [])

    async def list_if_served(self, path: str, selector: str) -> builtins.list[dict[str, Any]] | None:
        """LIST a collection by label selector; None when the server does not serve the resource (404)."""
        data = await self._call("GET", path, params={"labelSelector": selector}, missing_ok=True)
        return None if data is None else list(data.get("items") or [])

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST an object."""
        return await self._call("POST", path, params={"fieldManager": self.field_manager}, body=body) or {}

    async def patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """JSON-merge-patch an object (or its /status)."""
        return await self._call(
            "PATCH", path, params={"fieldManager": self.field_manager}, body=patch,
            content_type="application/merge-patch+json",
        ) or {}

    async def delete(self, path: str, uid: str = "") -> None:
        """Delete with Foreground propagation (dependents first); gone already is fine."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Foreground"}
        if uid:
            body["preconditions"] = {"uid": uid}  # never delete a newer object of the same name
        await self._call("DELETE", path, body=body, missing_ok=True)
