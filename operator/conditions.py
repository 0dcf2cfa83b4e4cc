"""Status conditions with Kubernetes semantics: lastTransitionTime moves only on a transition."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CONDITION_TYPES = ("Admitted", "Progressing", "Ready", "Degraded", "Schedulable")


@dataclass(frozen=True)
class Cond:
    """A condition as one reconcile pass decides it."""

    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str


def timestamp(now: datetime.datetime) -> str:
    """RFC 3339 seconds in UTC, as the API server writes times."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def find(conditions: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    """The condition of type `kind`, if present."""
    return next((c for c in conditions if c.get("type") == kind), None)


def render(
    old: Sequence[Mapping[str, Any]], new: Sequence[Cond], generation: int, now: datetime.datetime
) -> list[dict[str, Any]]:
    """status.conditions: keep each old lastTransitionTime unless that condition's status flipped."""
    out = []
    for cond in new:
        status = "Unknown" if cond.status is None else "True" if cond.status else "False"
        before = find(old, cond.type)
        since = before.get("lastTransitionTime") if before and before.get("status") == status else None
        out.append(
            {
                "type": cond.type,
                "status": status,
                "reason": cond.reason,
                "message": cond.message,
                "lastTransitionTime": since or timestamp(now),
                "observedGeneration": generation,
            }
        )
    return out


def flipped(old: Sequence[Mapping[str, Any]], kind: str, status: bool, message: str | None = None) -> bool:
    """Whether condition `kind` becomes `status` (or, with `message`, changes its message) in this pass."""
    before = find(old, kind)
    want = "True" if status else "False"
    if before is None or before.get("status") != want:
        return True
    return message is not None and before.get("message") != message
