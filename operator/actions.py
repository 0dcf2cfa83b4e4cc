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
    # Issue 17. PodGroups of the gang scheduler in use (and of the one used before, to delete them);
    # None: the cluster does not serve the PodGroup CRD that spec.placement.gang needs.
    podgroups: Sequence[Obj] | None = ()
    # The operator's cache of Node facts (operator/fit.py); None: no Node information yet.
    nodes: Sequence[Any] | None = None
    # GPUs the watched rank pods hold, by node and resource.
    gpu_usage: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


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
    # Issue 17: (phase, seconds) of every group that turned Ready for the first time in this pass:
    # phases scheduling, image, load, join, total, and recovery (after a restart).
    lifecycle: tuple[tuple[str, float], ...] = ()

    @property
    def writes(self) -> int:
        """API writes this result makes (Events not counted)."""
        return len(self.actions) + (self.status is not None) + (self.annotations is not None)
