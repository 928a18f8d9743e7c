"""The store keys, a contract with ops (they read and write them with etcdctl)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

FIELDS = ("desired", "override", "release", "deploy", "policy", "problems", "history")
_FIELDS = frozenset(FIELDS)
MAX_DIGITS = 12
"""A count of more digits is unknown (int() of thousands of digits is itself a failure)."""


@dataclass(frozen=True)
class Keys:
    """Key names under ``<prefix>/<cluster>``."""

    root: str

    @cached_property
    def services(self) -> str:
        """The prefix of every per-service key: one read gets them all."""
        return f"{self.root}/services/"

    @property
    def leader(self) -> str:
        return f"{self.root}/leader"

    def service(self, service: str, field: str) -> str:
        """``<root>/services/<service>/<field>``, field one of :data:`FIELDS`."""
        return f"{self.services}{service}/{field}"

    def parse(self, key: str) -> tuple[str, str] | None:
        """``(service, field)`` for a per-service key, else None."""
        prefix = self.services
        if not key.startswith(prefix):
            return None
        parts = key[len(prefix):].split("/")
        return (parts[0], parts[1]) if len(parts) == 2 and parts[1] in _FIELDS else None


def parse_count(raw: str | None) -> int | None:
    """A count as written in the store, or None if absent or not a non-negative integer.

    A bad value (``abc``, ``-1``, ``3.5``) is "unknown", never zero.
    """
    if raw is None or len(raw) > 64:
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_DIGITS:
        return None
    return int(text)  # a count above agent.max_instances is held at it by the loop


MAX_VALUE = 256 * 1024
"""The largest store value read as JSON (bytes); the agent writes a few hundred."""
MAX_DEPTH = 16
"""The deepest nesting of a JSON value read from the store."""


def load_json(text: str, max_bytes: int = MAX_VALUE, max_depth: int = MAX_DEPTH) -> Any:
    """``text`` as JSON, size- and depth-limited; ValueError (with what is wrong) otherwise."""
    if not isinstance(text, str):
        raise ValueError("not text")
    if len(text) > max_bytes:
        raise ValueError(f"{len(text)} bytes, at most {max_bytes}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth}") from None
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth}")
            todo += [(child, depth + 1) for child in (
                item.values() if isinstance(item, dict) else item)]
    return value


def parse_object(text: str) -> dict[str, Any]:
    """``text`` as a JSON object, or {} if it is not one (a hand-edited key, say), or is too
    big or too deeply nested (:func:`load_json`)."""
    try:
        value = load_json(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
