"""kopf wiring: one daemon per LargeModel runs reconcile passes; watch events wake it.

Why a daemon: reconcile is level-based, so what matters is "something changed, look again",
not which handler-cause kopf saw. A per-object daemon serialises passes of one LargeModel,
is resumed for every existing object when the operator restarts, and is stopped when the
object is deleted. Watch events of the LargeModel and of its StatefulSets, Services, pods and
NetworkPolicy (found by the name label) only wake it; the pass itself re-reads everything. No
state is kept in the object, so a steady state makes no writes (kopf's finalizer, which lets a
daemon stop before its object goes, is written once per object).

The state and the loops live in operator/controller.py, where tests drive them without kopf;
this module only registers them. Errors: a transient API error raises kopf.TemporaryError with
an exponential delay and kopf runs the daemon again; user errors never get here (they are a
status condition, see reconcile.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf

from largemodel.operator import api
from largemodel.operator.actions import Event
from largemodel.operator.builders import LABEL_NAME
from largemodel.operator.controller import Controller, OperatorConfig

__all__ = ["FINALIZER", "OperatorConfig", "configure", "controller"]

log = logging.getLogger(__name__)

FINALIZER = "serving.largemodel.io/operator"
controller = Controller()


def configure(config: OperatorConfig) -> None:
    """Set the operator's knobs (before kopf starts)."""
    controller.config = config


def _post_event(body: dict[str, Any], event: Event) -> None:
    kopf.event(cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf settings: one operator replica, no cluster scanning, Events under our own name."""
    controller.reset()
    controller.relogin = lambda: _relogin(settings)
    settings.peering.standalone = True  # one replica (Recreate strategy); no peering objects or RBAC
    settings.scanning.disabled = True  # never list CRDs or namespaces cluster-wide
    settings.persistence.finalizer = FINALIZER
    settings.posting.enabled = True
    settings.posting.reporting_component = controller.config.field_manager
    settings.posting.level = logging.WARNING  # kopf's own INFO logs are not Events; ours go via kopf.event
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300
    # Only our children and their pods: the API server filters, so other workloads cost nothing.
    for plural in ("statefulsets", "services", "pods", "networkpolicies"):
        settings.watching.label_selectors[plural] = LABEL_NAME
    settings.watching.client_timeout = 330
    log.info("operator starting field_manager=%s resync_seconds=%s", controller.config.field_manager,
             controller.config.resync_seconds)


def _load_credentials(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no service account token and no kubeconfig (KUBECONFIG or ~/.kube/config)")
    controller.connection = info
    return info


def _relogin(settings: kopf.OperatorSettings) -> None:
    # Service account tokens rotate: on a 401 read the credentials again (the next pass rebuilds
    # the client) instead of retrying forever with an expired token.
    try:
        _load_credentials(settings)
    except kopf.LoginError as err:
        log.warning("re-login failed error=%s", err)


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """In-cluster service account, else kubeconfig; the reconcile client uses the same credentials."""
    return _load_credentials(settings)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    """Close the reconcile client."""
    await controller.close()


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def model_changed(namespace: str | None, name: str | None, **_: Any) -> None:
    """A LargeModel changed: wake its daemon."""
    controller.wake(namespace, name)


@kopf.on.event("apps", "v1", "statefulsets", labels={LABEL_NAME: kopf.PRESENT})
@kopf.on.event("", "v1", "services", labels={LABEL_NAME: kopf.PRESENT})
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels={LABEL_NAME: kopf.PRESENT})
async def child_changed(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    """A child of a LargeModel changed: wake the owner's daemon."""
    controller.wake(namespace, labels.get(LABEL_NAME))


@kopf.on.event("", "v1", "pods", labels={LABEL_NAME: kopf.PRESENT})
async def pod_changed(namespace: str | None, labels: Mapping[str, str], uid: str | None, body: kopf.Body,
                      type: str | None, **_: Any) -> None:  # noqa: A002 - kopf's keyword
    """A rank pod changed: keep the GPUs it holds (fit), wake the owner's daemon."""
    controller.pod_event(uid, cast(Mapping[str, Any], body), type)
    controller.wake(namespace, labels.get(LABEL_NAME))


@kopf.on.event("", "v1", "nodes")
async def node_changed(name: str | None, body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002
    """Keep the Node facts cache (allocatable GPUs, labels, taints, Ready) for the Schedulable condition."""
    controller.node_event(name, cast(Mapping[str, Any], body), type)


@kopf.daemon(api.GROUP, api.VERSION, api.PLURAL, cancellation_timeout=10.0, backoff=5.0)
async def largemodel_daemon(namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """Reconcile one LargeModel whenever it or its children change, until it is deleted."""
    assert namespace is not None  # LargeModel is namespaced
    await controller.run_daemon(namespace, name, stopped, _post_event)
