"""An in-memory world for the pure reconcile tests: applies Results, plays StatefulSet controller.

Only for unit tests of reconcile(): the end-to-end tests use the real operator against K8sMock.
"""

from __future__ import annotations

import copy
import datetime
import itertools
from typing import Any

import yaml

from largemodel.operator import crd, fit, gang
from largemodel.operator.builders import POD_INDEX_LABEL
from largemodel.operator.reconcile import Create, Delete, Observed, Patch, Result, reconcile
from tests.support.k8smock import prune
from tests.support.paths import REPO

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def example_lm(name: str = "smollm2", **spec: Any) -> dict[str, Any]:
    """examples/smollm2-local.yaml as the API server returns it, with `spec` overrides merged."""
    body: dict[str, Any] = yaml.safe_load((REPO / "examples" / "smollm2-local.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": "models", "uid": f"uid-{name}", "generation": 1}
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body["spec"].get(key), dict):
            body["spec"][key] = {**body["spec"][key], **value}
        else:
            body["spec"][key] = value
    return body


STATUS_SCHEMA = crd.openapi_schema()["properties"]["status"]


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7386)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _key(kind: str, api_version: str) -> str:
    """Objects are kept by (kind, name); PodGroups of the two schedulers share a kind and a name."""
    return f"PodGroup {api_version}" if kind == "PodGroup" else kind


class World:
    """The LargeModel, its children and pods; `now` advances only when a test says so."""

    def __init__(self, lm: dict[str, Any]) -> None:
        self.lm = lm
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.now = T0
        self.uids = itertools.count(1)
        self.last: Result = Result()
        # Issue 17: the PodGroup APIs this cluster serves, its Nodes (None: no Node information),
        # and where run_pods binds a new pod (None: nowhere; the pod has no nodeName).
        self.served = {gang.SP_API_VERSION, gang.VOLCANO_API_VERSION}
        self.nodes: list[dict[str, Any]] | None = None
        self.bind: Any = None

    def _podgroups(self) -> list[dict[str, Any]] | None:
        needed = gang.podgroup_api(((self.lm["spec"].get("placement") or {}).get("gang")) or "none")
        if needed is not None and needed not in self.served:
            return None
        return [o for (kind, _), o in self.objects.items() if kind.startswith("PodGroup") and o["apiVersion"] in self.served]

    def gpu_usage(self) -> dict[str, dict[str, int]]:
        """GPUs the pods hold by node, as the operator's pod watch sums them."""
        usage: dict[str, dict[str, int]] = {}
        for pod in self.pods.values():
            found = fit.pod_gpu_usage(pod)
            if found:
                node, requests = found
                for key, count in requests.items():
                    usage.setdefault(node, {})[key] = usage.get(node, {}).get(key, 0) + count
        return usage

    def observed(self) -> Observed:
        """What the operator would list."""
        return Observed(
            statefulsets=[o for (kind, _), o in self.objects.items() if kind == "StatefulSet"],
            services=[o for (kind, _), o in self.objects.items() if kind == "Service"],
            pods=list(self.pods.values()),
            networkpolicies=[o for (kind, _), o in self.objects.items() if kind == "NetworkPolicy"],
            podgroups=self._podgroups(),
            nodes=None if self.nodes is None else [fit.node_facts(n) for n in self.nodes],
            gpu_usage=self.gpu_usage(),
        )

    def step(self) -> Result:
        """One reconcile pass, its result applied."""
        self.last = reconcile(self.lm, self.observed(), self.now)
        self.apply(self.last)
        return self.last

    def apply(self, result: Result) -> None:
        """Make the writes of `result` as an API server would."""
        for action in result.actions:
            if isinstance(action, Create):
                obj = copy.deepcopy(action.obj)
                obj["metadata"]["uid"] = f"uid-{next(self.uids)}"
                self.objects[(_key(obj["kind"], obj["apiVersion"]), obj["metadata"]["name"])] = obj
            elif isinstance(action, Patch):
                key = (_key(action.kind, action.api_version), action.name)
                self.objects[key] = merge(self.objects[key], action.patch)
            elif isinstance(action, Delete):
                gone = self.objects.pop((_key(action.kind, action.api_version), action.name))
                for name, pod in list(self.pods.items()):
                    if pod["metadata"]["ownerReferences"][0]["uid"] == gone["metadata"]["uid"]:
                        del self.pods[name]
        if result.annotations is not None:
            self.lm = merge(self.lm, {"metadata": {"annotations": result.annotations}})
        if result.status is not None:
            # Pruned to the CRD's status schema as the API server prunes it.
            stored = merge(self.lm, {"status": result.status})
            self.lm = {**stored, "status": prune(stored.get("status") or {}, STATUS_SCHEMA)}

    def run_pods(self, ready: bool = True) -> None:
        """StatefulSet controller + kubelet: every StatefulSet gets its pods, Running and Ready."""
        for (kind, name), sts in self.objects.items():
            if kind != "StatefulSet":
                continue
            for ordinal in range(sts["spec"]["replicas"]):
                pod_name = f"{name}-{ordinal}"
                if pod_name in self.pods:
                    continue
                labels = {**sts["spec"]["template"]["metadata"]["labels"], POD_INDEX_LABEL: str(ordinal)}
                node = self.bind(pod_name) if self.bind else None
                self.pods[pod_name] = {
                    "spec": {"nodeName": node, "containers": sts["spec"]["template"]["spec"]["containers"]} if node
                    else {},
                    "metadata": {
                        "name": pod_name, "uid": f"uid-{next(self.uids)}", "labels": labels,
                        "ownerReferences": [{"kind": "StatefulSet", "name": name, "uid": sts["metadata"]["uid"]}],
                    },
                    "status": {
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                        "containerStatuses": [{"name": "rank", "restartCount": 0, "ready": ready}],
                    },
                }

    def converge(self, passes: int = 20) -> int:
        """Reconcile and run pods until a pass writes nothing; the number of passes it took."""
        for count in range(1, passes + 1):
            result = self.step()
            self.run_pods()
            if result.writes == 0 and not result.requeue_after:
                return count
        raise AssertionError(f"no steady state after {passes} passes; last: {self.last}")

    def edit(self, **spec: Any) -> None:
        """A user edit of the spec (generation bumps)."""
        for key, value in spec.items():
            current = self.lm["spec"].get(key)
            self.lm["spec"][key] = {**current, **value} if isinstance(value, dict) and isinstance(current, dict) else value
        self.lm["metadata"]["generation"] += 1

    def groups(self) -> list[str]:
        """Names of the group StatefulSets that exist."""
        return sorted(name for kind, name in self.objects if kind == "StatefulSet")
