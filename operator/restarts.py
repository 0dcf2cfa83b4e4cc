"""The restart budget of rank groups, kept in an annotation on the LargeModel.

A group whose pod failed, restarted a container or was deleted is recreated as a whole, at most
`restart.maxGroupRestarts` times within `restart.windowSeconds`, the k-th restart in the window
waiting `backoffSeconds * 2**(k-1)` before the group starts again. Past the budget the group is
left down until old restarts leave the window (or a spec change starts a new revision, which
starts a fresh history).

The history lives in the annotation RESTARTS_ANNOTATION, not in memory, so a restarted operator
keeps counting; each record remembers the uid of the StatefulSet it restarted so that a pass
which runs twice (an operator killed between the annotation write and the delete) counts once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from largemodel.operator import api

RESTARTS_ANNOTATION = "serving.largemodel.io/restarts"


@dataclass(frozen=True)
class GroupRestarts:
    """Restart record of one group."""

    total: int = 0
    times: tuple[float, ...] = ()  # epoch seconds of restarts still inside the window
    uid: str = ""  # StatefulSet uid the last decision was about
    not_before: float = 0.0  # earliest epoch second the group may start again
    down: bool = False  # budget exhausted: left down
    # Issue 17: restarts of incarnations that never became Ready (long loads, failed joins) have
    # their own budget, restart.maxStartupRestarts, in the same window.
    startup_total: int = 0
    startup_times: tuple[float, ...] = ()
    down_on_startup: bool = False  # left down because the startup budget ran out


@dataclass(frozen=True)
class RestartHistory:
    """Restart records of every group, for one template revision."""

    revision: str = ""
    groups: dict[int, GroupRestarts] = field(default_factory=dict)

    def get(self, index: int) -> GroupRestarts:
        """The record of group `index` (empty if it never restarted)."""
        return self.groups.get(index, GroupRestarts())

    def with_group(self, index: int, record: GroupRestarts | None) -> RestartHistory:
        """A copy with group `index` set (or removed when `record` is None)."""
        groups = dict(self.groups)
        if record is None:
            groups.pop(index, None)
        else:
            groups[index] = record
        return RestartHistory(self.revision, groups)


def load_history(annotations: Mapping[str, str], revision: str) -> RestartHistory:
    """Parse the annotation; a missing, unreadable or other-revision history starts empty."""
    raw = annotations.get(RESTARTS_ANNOTATION)
    if not raw:
        return RestartHistory(revision)
    try:
        data = json.loads(raw)
        if data.get("revision") != revision:
            return RestartHistory(revision)
        groups = {
            int(index): GroupRestarts(
                total=int(rec.get("total", 0)),
                times=tuple(float(t) for t in rec.get("times", [])),
                uid=str(rec.get("uid", "")),
                not_before=float(rec.get("notBefore", 0.0)),
                down=bool(rec.get("down", False)),
                startup_total=int(rec.get("startupTotal", 0)),
                startup_times=tuple(float(t) for t in rec.get("startupTimes", [])),
                down_on_startup=bool(rec.get("downOnStartup", False)),
            )
            for index, rec in (data.get("groups") or {}).items()
        }
    except (ValueError, TypeError, AttributeError):
        return RestartHistory(revision)  # a hand-edited annotation must not wedge the operator
    return RestartHistory(revision, groups)


def dump_history(history: RestartHistory) -> str:
    """The annotation value (stable key order, so an unchanged history compares equal)."""
    groups: dict[str, dict[str, object]] = {}
    for index, rec in sorted(history.groups.items()):
        entry: dict[str, object] = {
            "total": rec.total,
            "times": [round(t, 3) for t in rec.times],
            "uid": rec.uid,
            "notBefore": round(rec.not_before, 3),
            "down": rec.down,
        }
        if rec.startup_total:  # absent when zero: histories written before issue 17 read back unchanged
            entry["startupTotal"] = rec.startup_total
            entry["startupTimes"] = [round(t, 3) for t in rec.startup_times]
        if rec.down_on_startup:
            entry["downOnStartup"] = True
        groups[str(index)] = entry
    return json.dumps({"revision": history.revision, "groups": groups}, sort_keys=True, separators=(",", ":"))


def in_window(record: GroupRestarts, policy: api.Restart, now: float) -> tuple[float, ...]:
    """Restart times of `record` still inside the budget window at `now` (startup restarts when the
    group is down on that budget)."""
    source = record.startup_times if record.down_on_startup else record.times
    return tuple(t for t in source if now - t < policy.window_seconds)


def backoff_seconds(restarts_in_window: int, policy: api.Restart) -> float:
    """Wait before the k-th restart in the window starts the group: backoff * 2**(k-1), capped by the window."""
    if restarts_in_window <= 0:
        return 0.0
    return float(min(policy.backoff_seconds * 2 ** (restarts_in_window - 1), policy.window_seconds))


@dataclass(frozen=True)
class RestartDecision:
    """What to do with a failed group, and the record to store."""

    record: GroupRestarts
    restart: bool  # True: recreate after the backoff; False: budget exhausted, leave it down
    counted: bool  # False when this StatefulSet was already counted (a repeated pass)


def decide_restart(record: GroupRestarts, sts_uid: str, policy: api.Restart, now: float,
                   startup: bool = False) -> RestartDecision:
    """A group failed: restart it within the budget, or leave it down past the budget.

    `startup`: this incarnation never became Ready; it counts against restart.maxStartupRestarts
    (and its own backoff), not against the crash-loop budget maxGroupRestarts.
    """
    if record.uid == sts_uid and sts_uid:
        return RestartDecision(record, restart=not record.down, counted=False)
    if startup:
        recent = tuple(t for t in record.startup_times if now - t < policy.window_seconds)
        if len(recent) >= policy.max_startup_restarts:
            return RestartDecision(replace(record, startup_times=recent, uid=sts_uid, down=True, down_on_startup=True),
                                   restart=False, counted=True)
        times = (*recent, now)
        updated = replace(record, startup_total=record.startup_total + 1, startup_times=times, uid=sts_uid,
                          not_before=now + backoff_seconds(len(times), policy), down=False)
        return RestartDecision(updated, restart=True, counted=True)
    recent = in_window(record, policy, now)
    if len(recent) >= policy.max_group_restarts:
        return RestartDecision(replace(record, times=recent, uid=sts_uid, down=True), restart=False, counted=True)
    times = (*recent, now)
    updated = GroupRestarts(
        total=record.total + 1,
        times=times,
        uid=sts_uid,
        not_before=now + backoff_seconds(len(times), policy),
        down=False,
    )
    return RestartDecision(updated, restart=True, counted=True)


def may_start(record: GroupRestarts, policy: api.Restart, now: float) -> tuple[bool, GroupRestarts, float | None]:
    """Whether a missing group may be created now; the updated record; seconds until it may."""
    if record.down:
        recent = in_window(record, policy, now)
        startup = record.down_on_startup
        limit = policy.max_startup_restarts if startup else policy.max_group_restarts
        if len(recent) >= limit:
            wait = min(recent) + policy.window_seconds - now if recent else 0.0
            kept = replace(record, startup_times=recent) if startup else replace(record, times=recent)
            return False, kept, max(wait, 0.0)
        # Old restarts left the window: the group gets another chance, counted as a restart.
        times = (*recent, now)
        if startup:
            return True, replace(record, startup_total=record.startup_total + 1, startup_times=times, down=False,
                                 down_on_startup=False, not_before=now), None
        return True, replace(record, total=record.total + 1, times=times, down=False, not_before=now), None
    if record.not_before > now:
        return False, record, record.not_before - now
    return True, record, None
