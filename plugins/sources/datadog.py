"""The ``datadog`` source: a Datadog metric query turned into a count.

Every poll queries the last ``window`` of ``query`` through the ``datadog``
library (``api.Metric.query``), aggregates the non-null points of the one
series it returns (``avg``, ``max``, ``min``, ``sum`` or ``last``) and reads
``value / target`` instances (the policy rounds up). Keys come from the
environment, ``DD_API_KEY`` and ``DD_APP_KEY``, never from the YAML, and never
appear in messages.

Every way the query can fail is a :class:`~agent.SourceError` saying which:
an HTTP error status, an error body, a timeout, no series, only null points,
more than one series, or a newest point older than ``expiry``.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from typing import Any, Literal

from pydantic import Field

from agent import (
    Duration,
    Source,
    SourceConfig,
    SourceError,
    Timeout,
    format_duration,
    hookimpl,
)

DEFAULT_HOST = "https://api.datadoghq.com"
# The datadog library keeps its settings (keys, host, timeout) in module
# globals: one lock makes each query use its own.
_LOCK = threading.Lock()


class DatadogConfig(SourceConfig):
    query: str = Field(min_length=1)
    "a Datadog metric query, e.g. avg:nginx.net.request_per_s{service:web}"
    target: float = Field(gt=0)
    "the value one instance should carry: count = ceil(value / target)"
    window: Duration = 300.0
    "how far back each query looks"
    aggregation: Literal["avg", "max", "min", "sum", "last"] = "avg"
    "how the points of the window become one value"
    api_host: str = Field(DEFAULT_HOST, pattern=r"^https?://")
    "Datadog's API address (another site: https://api.datadoghq.eu)"
    timeout: Timeout = 10.0
    "how long one query may take"


def _status(message: str) -> str:
    found = re.search(r"response code: (\d{3})", message)
    return found.group(1) if found else "an error"


class DatadogSource(Source):
    """Reads a Datadog metric query."""

    type_name = "datadog"
    requires = {"datadog": "shipmate[datadog]"}
    Config = DatadogConfig

    def _query(self, start: int, end: int) -> Any:
        from datadog import api, initialize
        from datadog.api.exceptions import (
            ApiError,
            ClientError,
            DatadogException,
            HttpBackoff,
            HTTPError,
            HttpTimeout,
        )

        c = self.config
        keys = {name: os.environ.get(name, "").strip() for name in ("DD_API_KEY", "DD_APP_KEY")}
        missing = [name for name, value in keys.items() if not value]
        if missing:
            raise SourceError(f"datadog: {' and '.join(missing)} not set in the environment")
        try:
            with _LOCK:
                initialize(api_key=keys["DD_API_KEY"], app_key=keys["DD_APP_KEY"],
                           api_host=c.api_host, host_name="shipmate", timeout=c.timeout,
                           mute=False, return_raw_response=False)
                return api.Metric.query(start=start, end=end, query=c.query)
        except HttpTimeout:
            raise SourceError(f"datadog did not answer within "
                              f"{format_duration(c.timeout)}") from None
        except HttpBackoff as exc:
            raise SourceError(f"datadog: the client is backing off after repeated timeouts: "
                              f"{self._clean(str(exc), keys)}") from None
        except HTTPError as exc:
            raise SourceError(f"datadog answered {_status(str(exc))}") from None
        except ApiError as exc:
            raise SourceError(f"datadog refused the query: "
                              f"{self._clean(_errors(exc.args[0]), keys)}") from None
        except ClientError as exc:
            raise SourceError(f"datadog cannot be reached at {c.api_host}: "
                              f"{self._clean(str(exc), keys)}") from None
        except (DatadogException, ValueError) as exc:
            raise SourceError(f"datadog: {self._clean(str(exc), keys)}"[:300]) from None

    @staticmethod
    def _clean(text: str, keys: dict[str, str]) -> str:
        for value in keys.values():
            if value:
                text = text.replace(value, "***")
        return text.strip()

    def read(self) -> float:
        c = self.config
        now = time.time()
        answer = self._query(int(now - c.window), int(math.ceil(now)))
        if not isinstance(answer, dict):
            raise SourceError(f"datadog answered {type(answer).__name__}, not a JSON object")
        if answer.get("errors"):
            raise SourceError(f"datadog refused the query: {_errors(answer)}")
        if answer.get("status") not in (None, "ok"):
            raise SourceError(f"datadog query failed: {answer.get('error') or answer['status']}")
        series = answer.get("series") or []
        if not series:
            raise SourceError(f"datadog returned no series for {c.query!r} in the last "
                              f"{format_duration(c.window)}")
        if len(series) > 1:
            raise SourceError(f"datadog returned {len(series)} series for {c.query!r}; a count "
                              "needs one (aggregate them in the query, e.g. sum:... without by)")
        points = []
        for point in series[0].get("pointlist") or []:
            if (isinstance(point, list | tuple) and len(point) == 2
                    and isinstance(point[0], int | float) and isinstance(point[1], int | float)
                    and math.isfinite(point[1])):
                points.append((float(point[0]) / 1000.0, float(point[1])))
        if not points:
            raise SourceError(f"datadog returned only null points for {c.query!r} in the last "
                              f"{format_duration(c.window)}")
        points.sort()
        newest = points[-1][0]
        expiry = c.expiry or 3 * c.interval
        if now - newest > expiry:
            raise SourceError(f"datadog's newest point for {c.query!r} is "
                              f"{format_duration(now - newest)} old (expiry "
                              f"{format_duration(expiry)})")
        values = [v for _, v in points]
        value = {"avg": lambda: sum(values) / len(values), "max": lambda: max(values),
                 "min": lambda: min(values), "sum": lambda: sum(values),
                 "last": lambda: values[-1]}[c.aggregation]()
        return value / c.target


    def from_raw(self, value: float) -> float:
        return value / self.config.target

    def history(self, start: float, end: float, step: float) -> list[tuple[float, float]]:
        """The query's points from ``start`` to ``end`` (one query, Datadog's own rollup)."""
        answer = self._query(int(start), int(math.ceil(end)))
        if not isinstance(answer, dict) or answer.get("errors"):
            raise SourceError(f"datadog refused the query: "
                              f"{_errors(answer) if isinstance(answer, dict) else answer}")
        series = answer.get("series") or []
        if len(series) != 1:
            raise SourceError(f"datadog returned {len(series)} series for "
                              f"{self.config.query!r}; a history needs one")
        return sorted((float(t) / 1000.0, float(v)) for t, v in series[0].get("pointlist") or []
                      if isinstance(t, int | float) and isinstance(v, int | float)
                      and math.isfinite(v))


def _errors(body: Any) -> str:
    errors = body.get("errors") if isinstance(body, dict) else body
    if isinstance(errors, list):
        return "; ".join(str(e) for e in errors) or "no reason given"
    return str(errors)


@hookimpl
def shipmate_source_types() -> list[type[Source]]:
    return [DatadogSource]
