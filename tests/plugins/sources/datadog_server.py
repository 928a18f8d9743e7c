"""A local stand-in for Datadog's metric query API (the SaaS cannot be reached here).

It answers ``GET /api/v1/query?from=S&to=E&query=Q`` the way Datadog documents
it: ``DD-API-KEY`` and ``DD-APPLICATION-KEY`` headers are required (403
``{"errors": ["Forbidden"]}`` otherwise), ``from``/``to``/``query`` are required
(400 ``{"errors": [...]}``), and a success is ``{"status": "ok", "res_type":
"time_series", "series": [{"metric", "pointlist": [[ms, value|null], ...],
...}], "from_date", "to_date", "query", ...}``.

A test says what comes next with :meth:`DatadogStandIn.answer`: a value (a
series of points ending now), explicit points, several series, no series, an
error status, or a hang. Every request is recorded in ``served`` as
``(time, kind)``.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_KEY = "test-api-key-0123456789abcdef"
APP_KEY = "test-app-key-fedcba9876543210"


def series(query: str, points: list[tuple[float, float | None]], start: int,
           end: int) -> dict[str, Any]:
    """One series as Datadog returns it; ``points`` are (seconds, value or None)."""
    metric = query.split(":", 1)[-1].split("{", 1)[0]
    return {
        "metric": metric, "display_name": metric, "aggr": query.split(":", 1)[0],
        "scope": "*", "tag_set": [], "expression": query, "unit": None,
        "pointlist": [[t * 1000.0, v] for t, v in points],
        "start": start * 1000, "end": end * 1000, "interval": 1,
        "length": len(points), "query_index": 0,
    }


class DatadogStandIn:
    """The stand-in server on a free loopback port; ``url`` is its ``api_host``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served: list[tuple[float, str]] = []
        self.requests: list[dict[str, Any]] = []
        self._next: dict[str, Any] = {"kind": "empty"}
        self._closing = threading.Event()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                stand_in._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- control
    def answer(self, kind: str, **details: Any) -> None:
        """What to answer from now on.

        - ``value``: ``value=450`` gives a series of ``n`` points (default 5) a
          second apart, the newest ``age`` seconds old (default 0);
        - ``points``: ``points=[(seconds_ago, value or None), ...]``;
        - ``multi``: ``values=[1, 2]`` gives one series per value;
        - ``empty``: ``"series": []``;
        - ``error``: ``status=503`` (and ``errors=[...]``);
        - ``status_error``: 200 with ``{"status": "error", "error": ...}``;
        - ``hang``: ``seconds=5`` before answering a value.
        """
        with self.lock:
            self._next = {"kind": kind, **details}

    def count(self, kind: str, since: float = 0.0) -> int:
        """How many requests were answered with ``kind`` since ``since``."""
        with self.lock:
            return sum(1 for t, k in self.served if k == kind and t >= since)

    def first(self, kind: str) -> float | None:
        """When ``kind`` was first answered."""
        with self.lock:
            return next((t for t, k in self.served if k == kind), None)

    def close(self) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---------------------------------------------------------------- serving
    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(req.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        with self.lock:
            spec = dict(self._next)
            self.requests.append({"path": url.path, "params": params,
                                  "headers": {k.lower(): v for k, v in req.headers.items()}})
        if url.path != "/api/v1/query":
            return self._send(req, 404, {"errors": ["Not found"]}, "not-found")
        if (req.headers.get("DD-API-KEY") != API_KEY
                or req.headers.get("DD-APPLICATION-KEY") != APP_KEY):
            return self._send(req, 403, {"errors": ["Forbidden"]}, "forbidden")
        missing = [p for p in ("from", "to", "query") if p not in params]
        if missing:
            return self._send(req, 400, {"errors": [f"The parameter '{missing[0]}' is required"]},
                              "bad-request")
        start, end, query = int(params["from"]), int(params["to"]), params["query"]
        kind = spec["kind"]
        now = time.time()
        if kind == "hang":
            self._closing.wait(spec.get("seconds", 5.0))
            kind, spec = "value", {"value": spec.get("value", 1.0)}
        if kind == "error":
            status = spec.get("status", 500)
            errors = spec.get("errors", ["Internal Server Error"])
            return self._send(req, status, {"errors": errors}, f"error-{status}")
        if kind == "status_error":
            return self._send(req, 200, {"status": "error", "res_type": "time_series",
                                         "series": [], "error": spec["error"]}, kind)
        if kind == "value":
            age, n = spec.get("age", 0.0), spec.get("n", 5)
            lists = [[(now - age - (n - 1 - i), spec["value"]) for i in range(n)]]
        elif kind == "points":
            lists = [[(now - ago, v) for ago, v in spec["points"]]]
        elif kind == "multi":
            lists = [[(now, v)] for v in spec["values"]]
        else:
            lists = []
        body = {
            "status": "ok", "res_type": "time_series", "resp_version": 1, "query": query,
            "message": "", "from_date": start * 1000, "to_date": end * 1000, "group_by": [],
            "series": [series(query, points, start, end) for points in lists],
        }
        label = f"value-{spec['value']:g}" if kind == "value" else kind
        return self._send(req, 200, body, label)

    def _send(self, req: BaseHTTPRequestHandler, status: int, body: Any, label: str) -> None:
        data = json.dumps(body).encode()
        with self.lock:  # recorded before the answer leaves: a client never sees it first
            self.served.append((time.time(), label))
        try:
            req.send_response(status)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data)
        except OSError:
            pass  # the client gave up (a hang past its timeout)
