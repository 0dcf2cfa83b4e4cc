"""What a reconcile pass sees (Observed) and decides (Result of Create/Patch/Delete and Events)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Observed:
    """The children of one LargeModel as listed from the API server (by its name label)."""

    statefulsets: Sequence[Obj] = ()
    services: Sequence[Obj] = ()
    pods: Sequence[Obj] = ()
    networkpolicies: Sequence[Obj] = ()


@dataclass(frozen=True)
class Create:
    """Create this object."""

    obj: dict[str, Any]


@dataclass(frozen=True)
class Patch:
    """JSON-merge-patch the named object."""

    api_version: str
    kind: str
    name: str
    patch: dict[str, Any]


@dataclass(frozen=True)
class Delete:
    """Delete the named object (Foreground: dependents first), only if it still has `uid`."""

    api_version: str
    kind: str
    name: str
    uid: str


Action = Create | Patch | Delete


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event about the LargeModel."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Result:
    """Everything one pass decided."""

    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()
    status: dict[str, Any] | None = None  # the whole new status; None when unchanged
    annotations: dict[str, str | None] | None = None  # metadata.annotations patch; None when unchanged
    requeue_after: float | None = None  # run again after this many seconds even if nothing changes
    group_states: dict[str, int] = field(default_factory=dict)
    restarts: int = 0  # group restarts decided in this pass

    @property
    def writes(self) -> int:
        """API writes this result makes (Events not counted)."""
        return len(self.actions) + (self.status is not None) + (self.annotations is not None)
