"""Start phases and measured lifecycle of a rank group, from pod status (pure).

Phases of a group's start, as status.groups[].startPhase shows them:
- `Scheduling`: a pod of the group does not exist yet or is not bound to a node.
- `Pulling`: every pod is bound; a container is not running yet (image pull, volume mounts).
- `Loading n%`: every container runs; some pod's startupProbe (`/startedz`: this pod's ranks have
  their shards in memory) has not passed. n is an estimate: the time since the container started
  against the load time the startupProbe was sized for (weight bytes per GPU / spec.startup
  loadRateMBps), capped at 99; the measured rate is the rank metric and status `loadRateMBps`.
- `Joining`: every pod loaded (container `started`), not every pod Ready (the group's barrier, the
  server on stage 0).
- `Ready`.

Timings (status.groups[].lifecycle, and the operator's histograms when a group first turns Ready):
scheduling = last pod bound - group created; image = last container started - last pod bound;
load = first pass that saw every pod loaded - last container started; join = Ready - loaded;
total = Ready - created. Pod timestamps have one-second resolution; `loadedAt` is when the
operator saw it (a pod status change wakes a pass, so within a pass of the event).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from largemodel.operator.planner import GIB, Plan

if TYPE_CHECKING:  # groups imports builders, which imports this module
    from largemodel.operator.groups import GroupView

Obj = Mapping[str, Any]

STARTUP_BASE_S = 120  # process start, imports, CUDA/NCCL init and the join on top of the reads
STARTUP_SAFETY = 2.0  # the stated rate is a promise about storage, not a measurement: double it
STARTUP_PERIOD_S = 10


def expected_load_seconds(plan: Plan, load_rate_mb_s: float) -> float:
    """Seconds to read one GPU's weights at the stated rate."""
    return plan.weight_gib_per_gpu * GIB / (load_rate_mb_s * 1e6)


def startup_budget_seconds(plan: Plan, load_rate_mb_s: float, override: int | None) -> int:
    """The startupProbe's whole budget: the override, else base + safety x expected load time."""
    if override is not None:
        return int(override)
    return int(math.ceil(STARTUP_BASE_S + STARTUP_SAFETY * expected_load_seconds(plan, load_rate_mb_s)))


def startup_probe(plan: Plan, load_rate_mb_s: float, override: int | None, port: str) -> dict[str, Any]:
    """GET /startedz every STARTUP_PERIOD_S for the budget; liveness starts only after it passed."""
    budget = startup_budget_seconds(plan, load_rate_mb_s, override)
    return {
        "httpGet": {"path": "/startedz", "port": port},
        "periodSeconds": STARTUP_PERIOD_S,
        "failureThreshold": max(1, math.ceil(budget / STARTUP_PERIOD_S)),
    }


def _time(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(pod: Obj, kind: str) -> Obj | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


def _container(pod: Obj) -> Obj:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def _bound(pod: Obj) -> bool:
    cond = _condition(pod, "PodScheduled")
    return bool((pod.get("spec") or {}).get("nodeName")) or bool(cond and cond.get("status") == "True")


def _running(pod: Obj) -> bool:
    return "running" in (_container(pod).get("state") or {}) or (pod.get("status") or {}).get("phase") == "Running"


def _loaded(pod: Obj) -> bool:
    container = _container(pod)
    return bool(container.get("started")) or bool(container.get("ready"))


def start_phase(view: GroupView, size: int, now: float, expected_load_s: float) -> str:
    """Scheduling, Pulling, Loading n%, Joining or Ready."""
    pods = view.pods
    if view.ready:
        return "Ready"
    if len(pods) < size or not all(_bound(p) for p in pods):
        return "Scheduling"
    if not all(_running(p) for p in pods):
        return "Pulling"
    if not all(_loaded(p) for p in pods):
        started = [t for t in (_time((_container(p).get("state") or {}).get("running", {}).get("startedAt"))
                               for p in pods) if t is not None]
        if not started or expected_load_s <= 0:
            return "Loading"
        pct = int(min(99, max(0, 100 * (now - min(started)) / expected_load_s)))
        return f"Loading {pct}%"
    return "Joining"


def lifecycle(view: GroupView, previous: Obj, now: float, weight_bytes_per_gpu: float) -> dict[str, Any]:
    """The status.groups[].lifecycle of this incarnation, carried over from `previous` where known."""
    uid = view.uid
    prev = dict(previous) if previous.get("uid") == uid else {}
    out: dict[str, Any] = {"uid": uid}
    created = _time((view.sts.get("metadata") or {}).get("creationTimestamp"))
    bound = [_time((_condition(p, "PodScheduled") or {}).get("lastTransitionTime")) for p in view.pods]
    started = [_time((_container(p).get("state") or {}).get("running", {}).get("startedAt")) for p in view.pods]
    ready = [_time((_condition(p, "Ready") or {}).get("lastTransitionTime")) for p in view.pods]
    complete = bool(view.pods) and len(view.pods) == int((view.sts.get("spec") or {}).get("replicas") or 0)
    if created is not None:
        out["createdAt"] = _iso(created)
    if complete and all(t is not None for t in bound):
        out["scheduledAt"] = _iso(max(t for t in bound if t is not None))
    if complete and all(t is not None for t in started):
        out["startedAt"] = _iso(max(t for t in started if t is not None))
    loaded_at = prev.get("loadedAt")
    if not loaded_at and complete and all(_loaded(p) for p in view.pods):
        loaded_at = _iso(now)
    if loaded_at:
        out["loadedAt"] = loaded_at
    ready_at = prev.get("readyAt")
    if not ready_at and view.ready:
        stamps = [t for t in ready if t is not None]
        ready_at = _iso(max(stamps) if len(stamps) == len(ready) else now)
    if ready_at:
        out["readyAt"] = ready_at
    seconds = durations(out)
    if seconds:
        out["seconds"] = seconds
    load_s = seconds.get("load")
    if load_s and load_s > 0 and weight_bytes_per_gpu > 0:
        out["loadRateMBps"] = round(weight_bytes_per_gpu / load_s / 1e6, 1)
    return out


def durations(record: Obj) -> dict[str, float]:
    """scheduling, image, load, join and total seconds from a lifecycle record (what is known)."""
    stamps = {k: _time(record.get(k)) for k in ("createdAt", "scheduledAt", "startedAt", "loadedAt", "readyAt")}
    spans = {"scheduling": ("createdAt", "scheduledAt"), "image": ("scheduledAt", "startedAt"),
             "load": ("startedAt", "loadedAt"), "join": ("loadedAt", "readyAt"), "total": ("createdAt", "readyAt")}
    out = {}
    for name, (a, b) in spans.items():
        ta, tb = stamps[a], stamps[b]
        if ta is not None and tb is not None:
            out[name] = round(max(0.0, tb - ta), 3)
    return out
