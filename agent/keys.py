"""The store keys, a contract with ops (they read and write them with etcdctl)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FIELDS = ("desired", "override", "release", "deploy", "policy", "problems", "history")


@dataclass(frozen=True)
class Keys:
    """Key names under ``<prefix>/<cluster>``."""

    root: str

    @property
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
        if not key.startswith(self.services):
            return None
        parts = key[len(self.services):].split("/")
        return (parts[0], parts[1]) if len(parts) == 2 and parts[1] in FIELDS else None


def parse_count(raw: str | None) -> int | None:
    """A count as written in the store, or None if absent or not a non-negative integer.

    A bad value (``abc``, ``-1``, ``3.5``) is "unknown", never zero.
    """
    if raw is None:
        return None
    text = raw.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def parse_object(text: str) -> dict[str, Any]:
    """``text`` as a JSON object, or {} if it is not one (a hand-edited key, say)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
