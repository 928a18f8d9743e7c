"""A small client of Datadog's events API (``POST /api/v1/events``), with a sender thread.

Hooks must return quickly, so :meth:`EventsClient.submit` only queues an event;
one thread posts them in order. A full queue drops the newest event (logged);
:meth:`EventsClient.close` sends what is queued, waiting at most ``timeout``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger("shipmate.datadog-events")
TITLE_MAX = 100  # Datadog shows at most this much of a title
TEXT_MAX = 4000  # and of a text ("events are limited to 4000 characters")
_STOP = object()


class DatadogError(Exception):
    """Datadog refused or did not answer; the message says which (never the key)."""


class EventsClient:
    """Posts events to ``api_url`` with ``api_key``; ``tags`` go on every event."""

    def __init__(self, api_url: str, api_key: str, *, tags: list[str], timeout: float,
                 queue_size: int = 1000) -> None:
        self.url = api_url.rstrip("/") + "/api/v1/events"
        self._key, self.tags, self.timeout = api_key, tags, timeout
        self._queue: queue.Queue[Any] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.failed = 0

    def post(self, title: str, text: str, *, alert_type: str = "info",
             tags: list[str] | None = None, aggregation_key: str | None = None) -> dict:
        """Post one event now; return Datadog's answer (``{"status": "ok", "event": ...}``).

        :raises DatadogError: on any status but 202, or no answer within ``timeout``.
        """
        body: dict[str, Any] = {"title": title[:TITLE_MAX], "text": text[:TEXT_MAX],
                                "alert_type": alert_type, "tags": [*self.tags, *(tags or [])]}
        if aggregation_key:
            body["aggregation_key"] = aggregation_key[:100]
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "DD-API-KEY": self._key})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer, status = response.read(), response.status
        except urllib.error.HTTPError as exc:
            raise DatadogError(f"{self.url} answered {exc.code}: "
                               f"{exc.read()[:200].decode(errors='replace')}") from None
        except (OSError, ValueError) as exc:
            raise DatadogError(f"{self.url}: {exc}") from None
        if status != 202:
            raise DatadogError(f"{self.url} answered {status}, not 202")
        try:
            return json.loads(answer)
        except ValueError:
            raise DatadogError(f"{self.url} answered 202 without JSON") from None

    # ---------------------------------------------------------------- background
    def start(self) -> None:
        self._thread = threading.Thread(target=self._send, daemon=True,
                                        name="datadog-events")
        self._thread.start()

    def submit(self, title: str, text: str, **options: Any) -> None:
        """Queue an event for the sender thread (never blocks)."""
        try:
            self._queue.put_nowait((title, text, options))
        except queue.Full:
            self.failed += 1
            log.warning("datadog-events: %d events wait already; dropped %r",
                        self._queue.maxsize, title)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (at most ``timeout`` seconds), then stop the thread."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):  # a sender stuck that long: give up on it
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        self._thread = None

    def _send(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            title, text, options = item
            try:
                self.post(title, text, **options)
                self.sent += 1
            except DatadogError as exc:
                self.failed += 1
                log.warning("datadog-events: event %r not posted: %s", title, exc)
