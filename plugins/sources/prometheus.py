"""The ``prometheus`` source: an instant PromQL query turned into a count.

Every poll asks Prometheus's HTTP API (``GET /api/v1/query``) for the value of
``query`` now and reads ``value / target`` instances (the policy rounds up).
The query must give one number: a scalar, or an instant vector with exactly
one series (wrap it in ``sum(...)`` or ``max(...)`` otherwise). No series,
NaN, an error status or no answer within ``timeout`` is a
:class:`~agent.SourceError` saying which. Prometheus itself drops series that
stopped being scraped (its staleness handling), so an old value reads as no
series, not as a number.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pydantic import Field

from agent import (
    Source,
    SourceConfig,
    SourceError,
    Timeout,
    format_duration,
    hookimpl,
)


class PrometheusConfig(SourceConfig):
    url: str = Field(pattern=r"^https?://[^@/]+(/.*)?$")
    "the Prometheus server, e.g. http://prometheus:9090 (no credentials in the URL)"
    query: str = Field(min_length=1)
    "a PromQL expression that gives one number, e.g. sum(rate(http_requests_total[1m]))"
    target: float = Field(gt=0)
    "the value one instance should carry: count = ceil(value / target)"
    timeout: Timeout = 10.0
    "how long one query may take"


MAX_ANSWER = 1024 * 1024  # bytes: an instant query for one series is a few hundred


class _TooSlow(Exception):
    pass


class _TooBig(Exception):
    pass


def _read(resp: Any, deadline: float) -> bytes:
    """The body, read in pieces: at most MAX_ANSWER bytes, and done by ``deadline``
    (a server that trickles bytes cannot hold a poll longer than its timeout)."""
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise _TooSlow()
        chunk = resp.read1(16384) if hasattr(resp, "read1") else resp.read(16384)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_ANSWER:
            raise _TooBig()
        chunks.append(chunk)


class PrometheusSource(Source):
    """Reads an instant PromQL query."""

    type_name = "prometheus"
    Config = PrometheusConfig

    def _get(self, path: str = "query", **extra: str) -> tuple[int, Any]:
        c = self.config
        params = urllib.parse.urlencode({"query": c.query, "timeout": f"{c.timeout:g}s",
                                         **extra})
        url = f"{c.url.rstrip('/')}/api/v1/{path}?{params}"
        deadline = time.monotonic() + c.timeout  # for the whole call, not each socket read
        try:
            with urllib.request.urlopen(url, timeout=c.timeout) as resp:  # noqa: S310 - http(s) only
                status, body = resp.status, _read(resp, deadline)
        except urllib.error.HTTPError as exc:
            status, body = exc.code, _read(exc, deadline)
        except _TooSlow:
            raise SourceError(f"prometheus did not answer within {format_duration(c.timeout)} "
                              f"({c.url})") from None
        except _TooBig:
            raise SourceError(f"prometheus answered with more than {MAX_ANSWER // 1024} KiB "
                              f"({c.url})") from None
        except TimeoutError:
            raise SourceError(f"prometheus did not answer within {format_duration(c.timeout)} "
                              f"({c.url})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise SourceError(f"prometheus did not answer within "
                                  f"{format_duration(c.timeout)} ({c.url})") from None
            raise SourceError(f"prometheus cannot be reached at {c.url}: {reason}") from None
        try:
            return status, json.loads(body)
        except ValueError:
            raise SourceError(f"prometheus answered {status} without JSON "
                              f"({body[:80]!r})") from None

    def read(self) -> float:
        c = self.config
        status, doc = self._get()
        if not isinstance(doc, dict) or doc.get("status") != "success":
            doc = doc if isinstance(doc, dict) else {}
            kind = doc.get("errorType") or "error"
            raise SourceError(f"prometheus answered {status} ({kind}): "
                              f"{doc.get('error') or 'no reason given'}")
        data = doc.get("data") or {}
        kind, result = data.get("resultType"), data.get("result")
        if kind == "scalar":
            sample = result
        elif kind == "vector":
            if not result:
                raise SourceError(f"prometheus returned no series for {c.query!r}")
            if len(result) > 1:
                raise SourceError(f"prometheus returned {len(result)} series for {c.query!r}; "
                                  "a count needs one (wrap the query in sum(...) or max(...))")
            sample = result[0].get("value")
        else:
            raise SourceError(f"prometheus returned a {kind} for {c.query!r}; a count needs an "
                              "instant vector or a scalar")
        try:  # the API gives a sample's value as text: "15", "NaN", "+Inf"
            if not isinstance(sample[1], str) or len(sample[1]) > 64:
                raise TypeError
            value = float(sample[1])
        except (TypeError, ValueError, IndexError, KeyError):
            raise SourceError("prometheus returned a sample without a value: "
                              f"{str(sample)[:80]}") from None
        if not math.isfinite(value):
            raise SourceError(f"prometheus returned {sample[1]} for {c.query!r}")
        return value / c.target


    def from_raw(self, value: float) -> float:
        return value / self.config.target

    def history(self, start: float, end: float, step: float) -> list[tuple[float, float]]:
        """The query over ``start`` to ``end`` at ``step`` (``/api/v1/query_range``)."""
        c = self.config
        status, doc = self._get("query_range", start=f"{start:.3f}", end=f"{end:.3f}",
                                step=f"{max(step, 1.0):g}s")
        if not isinstance(doc, dict) or doc.get("status") != "success":
            doc = doc if isinstance(doc, dict) else {}
            raise SourceError(f"prometheus answered {status} ({doc.get('errorType') or 'error'})"
                              f": {doc.get('error') or 'no reason given'}")
        result = (doc.get("data") or {}).get("result") or []
        if len(result) != 1:
            raise SourceError(f"prometheus returned {len(result)} series for {c.query!r}; a "
                              "history needs one (wrap the query in sum(...) or max(...))")
        out = []
        for t, v in result[0].get("values") or []:
            try:
                value = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                out.append((float(t), value))
        return out


@hookimpl
def shipmate_source_types() -> list[type[Source]]:
    return [PrometheusSource]
