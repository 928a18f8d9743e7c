"""/metrics (Prometheus), /healthz and /status on ``agent.http``."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer


class ServiceGauges:
    """One service's desired, running and healthy gauges; a value is set only when it
    changes (a pass over 10,000 unchanged services sets none)."""

    __slots__ = ("_gauges", "_values")

    def __init__(self, *gauges: Any) -> None:
        self._gauges = gauges
        self._values: tuple[float, ...] | None = None

    def set(self, desired: float, running: float, healthy: float) -> None:
        values = (desired, running, healthy)
        if values != self._values:  # NaN != NaN: an unknown count is set again, harmlessly
            for gauge, value in zip(self._gauges, values, strict=True):
                gauge.set(value)
            self._values = values


class Metrics:
    """The agent's gauges and counters, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["service"]
        self.desired = Gauge("shipmate_desired_instances", "effective desired count", labels,
                             registry=self.registry)
        self.running = Gauge("shipmate_running_instances", "instances running", labels,
                             registry=self.registry)
        self.healthy = Gauge("shipmate_healthy_instances", "instances passing health", labels,
                             registry=self.registry)
        self.restarts = Counter("shipmate_restarts", "exits and failed starts of instances",
                                labels, registry=self.registry)
        self.passes = Counter("shipmate_passes", "reconcile passes", registry=self.registry)
        self.errors = Counter("shipmate_errors", "errors by where they happened", ["where"],
                              registry=self.registry)
        self.pass_seconds = Gauge("shipmate_pass_seconds", "duration of the last pass",
                                  registry=self.registry)
        self.leader = Gauge("shipmate_leader", "1 if this agent acts for the cluster",
                            registry=self.registry)
        self.shadow_desired = Gauge("shipmate_shadow_desired_instances",
                                    "the count a policy in shadow mode would set", labels,
                                    registry=self.registry)
        self.last_pass = 0.0
        self._services: dict[str, ServiceGauges] = {}

    def service(self, service: str) -> ServiceGauges:
        """``service``'s gauges, their label children looked up once."""
        gauges = self._services.get(service)
        if gauges is None:
            gauges = self._services[service] = ServiceGauges(
                self.desired.labels(service), self.running.labels(service),
                self.healthy.labels(service))
        return gauges

    def shadow(self, service: str, count: int | None) -> None:
        """Show a shadow policy's count (None: the service has no shadow policy)."""
        if count is not None:
            self.shadow_desired.labels(service).set(count)
        else:
            with contextlib.suppress(KeyError):  # never had one
                self.shadow_desired.remove(service)


class _Quiet(WSGIRequestHandler):
    timeout = 10  # seconds an idle client may hold its connection (and its thread)

    def log_message(self, *args: object) -> None:
        pass


class _ThreadingServer(ThreadingWSGIServer):
    """Each request on its own thread: an idle or slow client blocks nobody else."""

    daemon_threads = True


def serve(address: str, metrics: Metrics, stale_after: float,
          status: Callable[[], dict[str, Any]] | None = None) -> WSGIServer:
    """Serve /metrics, /healthz and /status on ``host:port`` from a daemon thread.

    /healthz answers 200 while passes complete (or the agent is a standby), 503
    when none completed for ``stale_after`` seconds. /status answers ``status()``
    as JSON (the scaler's last readings: ``shipmate status`` shows them).
    """
    host, port = address.rsplit(":", 1)
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/status" and status is not None:
            body = json.dumps(status()).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if environ.get("PATH_INFO") == "/healthz":
            age = time.time() - metrics.last_pass
            ok = age < stale_after
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [f"{'ok' if ok else 'stale'}: last pass {age:.1f}s ago\n".encode()]
        return prometheus(environ, start_response)

    server = make_server(host or "127.0.0.1", int(port), app, server_class=_ThreadingServer,
                         handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
