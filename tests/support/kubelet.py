"""The test plays the StatefulSet controller and the kubelet, in a background thread.

kmock has no controllers. Every tick this makes, through the API like the real ones: one pod per
StatefulSet ordinal (labels from the template plus apps.kubernetes.io/pod-index, owned by the
StatefulSet), Running and Ready after `ready_delay` seconds, unless the test asked a StatefulSet
to crash-loop (its pods restart a container as soon as they run) or to hold (pods never Ready).
Given `nodes`, it also plays the scheduler: a pod binds to the next of them whose allocatable
extended resources (GPUs) cover its requests, else stays Pending, unbound, until one frees up.
It also watches an invariant for rollout tests: the most groups of one LargeModel that were
unavailable (missing or not all pods Ready) at the same time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import httpx

from largemodel.operator.builders import LABEL_GROUP, LABEL_NAME, POD_INDEX_LABEL
from tests.support.mockcluster import TEST_AGENT, MockCluster, apps_path, core_path


def _requests(pod: dict[str, Any]) -> dict[str, int]:
    """The extended resources (GPUs) a pod's containers request; cpu and memory are not scheduled here."""
    out: dict[str, int] = {}
    for container in pod["spec"].get("containers", []):
        resources = container.get("resources") or {}
        for resource, value in (resources.get("requests") or resources.get("limits") or {}).items():
            if "/" in resource:
                out[resource] = out.get(resource, 0) + int(value)
    return out


class Kubelet:
    """StatefulSet controller + kubelet for the namespaces of a MockCluster."""

    def __init__(self, cluster: MockCluster, namespaces: list[str], ready_delay: float = 0.0) -> None:
        self.cluster = cluster
        self.namespaces = namespaces
        self.ready_delay = ready_delay
        self.crashloop: set[str] = set()  # StatefulSet names whose pods keep restarting
        self.hold: set[str] = set()  # StatefulSet names whose pods never become Ready
        self.max_unavailable: dict[str, int] = {}  # LargeModel name -> worst seen (while watched)
        self.watch_replicas: dict[str, int] = {}  # LargeModel name -> replicas to check against
        # issue 17: the scheduler's job, binding pods round-robin to these nodes where the GPUs they ask for
        # are free (affinity is not evaluated); a pod that fits nowhere stays Pending, unbound, until one does.
        self.nodes: list[str] = []
        self._bound = 0
        self._born: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
        self._http = httpx.Client(base_url=cluster.url, timeout=10, headers={"User-Agent": TEST_AGENT})

    def __enter__(self) -> Kubelet:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._http.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for ns in self.namespaces:
                # A race with the operator (an object just deleted): the next tick sees the truth.
                with contextlib.suppress(httpx.HTTPError, KeyError):
                    self.tick(ns)
            self._stop.wait(0.05)

    def tick(self, ns: str) -> None:
        """One round of controller and kubelet work in namespace `ns`."""
        sets = self._http.get(apps_path("statefulsets", ns)).json()["items"]
        pods = {p["metadata"]["name"]: p for p in self._http.get(core_path("pods", ns)).json()["items"]}
        nodes: dict[str, dict[str, Any]] | None = None  # listed once a tick, when a pod waits to be bound
        for sts in sets:
            if sts["metadata"].get("deletionTimestamp"):
                continue
            for ordinal in range(int(sts["spec"].get("replicas") or 0)):
                name = f"{sts['metadata']['name']}-{ordinal}"
                pod = pods.get(name)
                if pod is None:
                    self._create_pod(ns, sts, ordinal)
                elif self.nodes and not pod["spec"].get("nodeName"):
                    if nodes is None:
                        nodes = {n["metadata"]["name"]: n for n in self._http.get("/api/v1/nodes").json()["items"]}
                    self._bind(ns, pod, list(pods.values()), nodes)
                elif not pod.get("status"):
                    self._start_pod(ns, sts, pod)
        self._check_unavailable(ns, sets, list(pods.values()))

    def _create_pod(self, ns: str, sts: dict[str, Any], ordinal: int) -> None:
        template = sts["spec"]["template"]
        labels = {**template["metadata"].get("labels", {}), POD_INDEX_LABEL: str(ordinal)}
        owner = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts["metadata"]["name"],
                 "uid": sts["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{sts['metadata']['name']}-{ordinal}", "labels": labels,
                             "ownerReferences": [owner]},
                "spec": dict(template["spec"])}
        reply = self._http.post(core_path("pods", ns), json=body)
        if reply.status_code == 201:
            self._born[f"{ns}/{body['metadata']['name']}"] = time.monotonic()

    def _bind(self, ns: str, pod: dict[str, Any], pods: list[dict[str, Any]], nodes: dict[str, dict[str, Any]]) -> None:
        """Bind `pod` to the next of `self.nodes` whose free GPUs cover its request; none: it stays Pending."""
        for _ in range(len(self.nodes)):
            name = self.nodes[self._bound % len(self.nodes)]
            self._bound += 1
            if name not in nodes:
                continue
            allocatable = nodes[name].get("status", {}).get("allocatable", {})
            fits = True
            for resource, want in _requests(pod).items():
                used = sum(_requests(p).get(resource, 0) for p in pods if p["spec"].get("nodeName") == name)
                fits = fits and used + want <= int(allocatable.get(resource, 0))
            if fits:
                self._http.patch(core_path("pods", ns, pod["metadata"]["name"]), json={"spec": {"nodeName": name}},
                                 headers={"Content-Type": "application/merge-patch+json"})
                pod["spec"]["nodeName"] = name  # later pods of this tick see the GPUs taken
                return

    def _start_pod(self, ns: str, sts: dict[str, Any], pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        born = self._born.get(f"{ns}/{name}", 0.0)
        if time.monotonic() - born < self.ready_delay:
            return
        sts_name = sts["metadata"]["name"]
        crashing = sts_name in self.crashloop
        ready = not crashing and sts_name not in self.hold
        self.set_pod_status(ns, name, ready=ready, restarts=1 if crashing else 0)

    def set_pod_status(self, ns: str, name: str, *, ready: bool, restarts: int = 0, phase: str = "Running") -> None:
        """What a kubelet reports for one pod."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {
            "phase": phase,
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                           {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}],
            "containerStatuses": [{"name": "rank", "ready": ready, "started": ready, "restartCount": restarts,
                                   "state": {"running": {"startedAt": now}}}],
        }
        self._http.patch(core_path("pods", ns, name) + "/status", json={"status": status},
                         headers={"Content-Type": "application/merge-patch+json"})

    def _check_unavailable(self, ns: str, sets: list[dict[str, Any]], pods: list[dict[str, Any]]) -> None:
        for model, replicas in list(self.watch_replicas.items()):
            ready_groups = set()
            for sts in sets:
                labels = sts["metadata"].get("labels", {})
                if labels.get(LABEL_NAME) != model or sts["metadata"].get("deletionTimestamp"):
                    continue
                mine = [p for p in pods if any(o.get("uid") == sts["metadata"]["uid"]
                                                for o in p["metadata"].get("ownerReferences", []))]
                ok = len(mine) == sts["spec"]["replicas"] and all(
                    c.get("status") == "True"
                    for p in mine for c in (p.get("status") or {}).get("conditions", [{}]) if c.get("type") == "Ready"
                ) and all(p.get("status") for p in mine)
                if ok:
                    ready_groups.add(labels.get(LABEL_GROUP))
            down = replicas - len(ready_groups)
            self.max_unavailable[model] = max(self.max_unavailable.get(model, 0), down)
