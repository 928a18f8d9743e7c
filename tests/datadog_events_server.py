"""A local stand-in for Datadog's events API (``POST /api/v1/events``).

It answers the way Datadog documents it: the ``DD-API-KEY`` header is required
(403 ``{"errors": ["Forbidden"]}`` otherwise); the body is a JSON object with
string ``title`` and ``text`` (400 ``{"errors": [...]}`` otherwise), an optional
``alert_type`` among Datadog's and ``tags`` as a list of strings; a success is
202 ``{"status": "ok", "event": {"id", "id_str", "title", "text", "date_happened",
"tags", "url", ...}}``. Every accepted event is kept in ``events``.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_KEY = "test-events-key-0123456789abcdef"
ALERT_TYPES = {"error", "warning", "info", "success", "user_update", "recommendation",
               "snapshot"}


class DatadogEventsStandIn:
    """The stand-in on a free loopback port; ``url`` is its ``api_url``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.refused: list[int] = []  # statuses of refused requests
        ids = itertools.count(7_000_000_000_000_000_000)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, answer = stand_in._answer(self.path, self.headers, body, next(ids))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def _answer(self, path: str, headers: Any, body: bytes, event_id: int
                ) -> tuple[int, dict[str, Any]]:
        status, answer = self._check(path, headers, body)
        if status != 202:
            with self.lock:
                self.refused.append(status)
            return status, answer
        event = json.loads(body)
        shown = {"id": event_id, "id_str": str(event_id), "title": event["title"],
                 "text": event["text"], "date_happened": int(time.time()),
                 "tags": event.get("tags") or [], "priority": None, "handle": None,
                 "related_event_id": None,
                 "url": f"https://app.datadoghq.com/event/event?id={event_id}"}
        with self.lock:
            self.events.append({**event, "api_key": headers.get("DD-API-KEY")})
        return 202, {"status": "ok", "event": shown}

    @staticmethod
    def _check(path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        if path.split("?")[0] != "/api/v1/events":
            return 404, {"errors": ["Not found"]}
        if headers.get("DD-API-KEY") != API_KEY:
            return 403, {"errors": ["Forbidden"]}
        try:
            event = json.loads(body)
        except ValueError:
            return 400, {"errors": ["Invalid JSON"]}
        if not isinstance(event, dict):
            return 400, {"errors": ["Event must be an object"]}
        for key in ("title", "text"):
            if not isinstance(event.get(key), str):
                return 400, {"errors": [f"'{key}' is required and must be a string"]}
        if event.get("alert_type", "info") not in ALERT_TYPES:
            return 400, {"errors": [f"invalid alert_type {event['alert_type']!r}"]}
        tags = event.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            return 400, {"errors": ["'tags' must be a list of strings"]}
        return 202, {}

    def titles(self) -> list[str]:
        with self.lock:
            return [e["title"] for e in self.events]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
