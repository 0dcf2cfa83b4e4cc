"""`largemodel operator`: run the kopf operator with a health and metrics endpoint.

Namespaced (`--namespace`, repeatable: only those namespaces are listed and watched) or
`--all-namespaces`. `/healthz` and `/metrics` (every largemodel_operator_* series) share their
own port (`--metrics-port`), separate from anything kopf serves.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import aiohttp.web
import kopf
import prometheus_client

from largemodel.operator import handlers

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of `largemodel operator`."""
    parser = argparse.ArgumentParser(prog="largemodel operator", description="Run the LargeModel operator.")
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeat for several)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--metrics-port", type=int, default=8080, help="port of /healthz and /metrics (0: off)")
    parser.add_argument("--metrics-address", default="0.0.0.0", help="address of /healthz and /metrics")
    parser.add_argument("--field-manager", default="largemodel-operator", help="fieldManager of every write")
    parser.add_argument("--resync-seconds", type=float, default=300.0,
                        help="reconcile each LargeModel at least this often, events or not")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port {args.metrics_port} is not a port (0-65535)")
    if args.resync_seconds <= 0:
        parser.error("--resync-seconds must be > 0")
    return args


def health_app(ready: asyncio.Event, operator_task: asyncio.Task[None]) -> aiohttp.web.Application:
    """/healthz: 200 once kopf is up and while it runs; /metrics: the Prometheus exposition."""

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        if operator_task.done():
            return aiohttp.web.json_response({"status": "stopped"}, status=503)
        if not ready.is_set():
            return aiohttp.web.json_response({"status": "starting"}, status=503)
        return aiohttp.web.json_response({"status": "ok"})

    async def metrics(_: aiohttp.web.Request) -> aiohttp.web.Response:
        body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
        return aiohttp.web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    app = aiohttp.web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(args: argparse.Namespace) -> None:
    """Run kopf and the health/metrics server until kopf exits (SIGTERM/SIGINT stop it)."""
    ready = asyncio.Event()
    operator_task = asyncio.create_task(
        kopf.operator(
            clusterwide=args.all_namespaces,
            namespaces=args.namespace,
            standalone=True,
            ready_flag=ready,
        )
    )
    runner = None
    if args.metrics_port:
        runner = aiohttp.web.AppRunner(health_app(ready, operator_task), access_log=None)
        await runner.setup()
        await aiohttp.web.TCPSite(runner, args.metrics_address, args.metrics_port).start()
        log.info("health and metrics serving address=%s port=%d", args.metrics_address, args.metrics_port)
    try:
        await operator_task
    finally:
        if runner is not None:
            await runner.cleanup()


def main(argv: list[str]) -> int:
    """Entry point of `largemodel operator`."""
    args = parse_args(argv)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.PLAIN)
    handlers.configure(handlers.OperatorConfig(field_manager=args.field_manager, resync_seconds=args.resync_seconds))
    scope = "all namespaces" if args.all_namespaces else ",".join(args.namespace)
    log.info("largemodel operator watching=%s", scope)
    try:
        asyncio.run(serve(args))
    except OSError as err:  # e.g. the metrics port is taken: a clear line, not a traceback
        print(f"largemodel operator: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
