"""`largemodel operator`: run the kopf operator with a health and metrics endpoint.

Namespaced (`--namespace`, repeatable: only those namespaces are listed and watched) or
`--all-namespaces`. `/healthz` and `/metrics` (every largemodel_operator_* series) share their
own port (`--metrics-port`), separate from anything kopf serves, on the same guarded server as the
rank pods' metrics ports (`largemodel.guardedhttp`: read timeouts, a deadline per connection, a
connection cap), in a thread of its own so no client can stall the reconcile loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler

import kopf
import prometheus_client

from largemodel.guardedhttp import GuardedHTTPServer
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


def health_handler(ready: asyncio.Event, operator_task: asyncio.Task[None]) -> type[BaseHTTPRequestHandler]:
    """/healthz: 200 once kopf is up and while it runs; /metrics: the Prometheus exposition.

    Runs on the server's threads: it only reads the event's and the task's state.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                status = ("stopped" if operator_task.done() else "ok" if ready.is_set() else "starting")
                body, ctype = json.dumps({"status": status}).encode(), "application/json"
                code = 200 if status == "ok" else 503
            elif path == "/metrics":
                body, ctype, code = (prometheus_client.generate_latest(prometheus_client.REGISTRY),
                                     prometheus_client.CONTENT_TYPE_LATEST, 200)
            else:
                body, ctype, code = b'{"status": "not found"}', "application/json", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - probes are not news
            return

    return Handler


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
    server = None
    if args.metrics_port:
        try:
            server = GuardedHTTPServer((args.metrics_address, args.metrics_port), health_handler(ready, operator_task))
        except OSError:
            operator_task.cancel()
            raise
        threading.Thread(target=server.serve_forever, name="operator-metrics", daemon=True).start()
        log.info("health and metrics serving address=%s port=%d", args.metrics_address, args.metrics_port)
    try:
        await operator_task
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


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
