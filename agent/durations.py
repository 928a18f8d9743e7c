"""Durations as ops write them: ``30s``, ``5m``, ``1h30m``, ``500ms`` or plain seconds."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
PATTERN = r"^(\d+(\.\d+)?(ms|s|m|h|d))+$"


def parse_duration(value: object) -> float:
    """Seconds from ``30s``-style text or a number; ValueError names the bad text."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s or 5m, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value}")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(PATTERN, text):
            return sum(float(n) * UNITS[unit] for n, unit in PART.findall(text))
    raise ValueError(f"expected a duration like 30s, 5m or 1h30m, got {value!r}")


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


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": ["string", "number"], "pattern": PATTERN,
                    "description": "a duration: 30s, 5m, 1h30m, 500ms or seconds"}),
]
