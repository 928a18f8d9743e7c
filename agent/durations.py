"""Durations as ops write them: ``30s``, ``5m``, ``1h30m``, ``500ms`` or plain seconds."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, WithJsonSchema

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
LONGEST = 366 * 86400.0  # a year: anything longer is a mistake (and .inf is not a duration)
SHORTEST_INTERVAL = 0.1  # a poll or pass more often than this only burns the CPU
PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"


def parse_duration(value: object) -> float:
    """Seconds from ``30s``-style text or a number; ValueError names the bad text."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s or 5m, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number, not {value}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value}")
        return _bounded(float(value))
    if isinstance(value, str) and len(value) < 64:
        text = value.strip()
        if re.fullmatch(PATTERN, text):
            return _bounded(sum(float(n) * UNITS[unit] for n, unit in PART.findall(text)))
    raise ValueError(f"expected a duration like 30s, 5m or 1h30m, got {str(value)[:40]!r}")


def _bounded(seconds: float) -> float:
    if seconds > LONGEST:
        raise ValueError(f"{format_duration(seconds)} is longer than a year")
    return seconds


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


def _interval(seconds: float) -> float:
    if seconds < SHORTEST_INTERVAL:
        raise ValueError(f"an interval must be at least {SHORTEST_INTERVAL * 1000:.0f}ms, "
                         f"not {format_duration(seconds)}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest ``1h2m3s`` text for a number of seconds (for status output)."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    out, rest = "", int(round(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out + (f"{rest}s" if rest or not out else "")


_SCHEMA = {"type": ["string", "number"], "pattern": PATTERN,
           "description": "a duration: 30s, 5m, 1h30m, 500ms or seconds"}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_SCHEMA)]
"""A duration of 0 up to a year (finite)."""
Timeout = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive),
                    WithJsonSchema(_SCHEMA)]
"""A duration longer than 0."""
Interval = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_interval),
                     WithJsonSchema(_SCHEMA)]
"""How often something runs: at least 100ms."""
