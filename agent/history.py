"""History: the last releases and scaling decisions of a service, kept in the store.

``<prefix>/<cluster>/services/<service>/history`` holds one JSON object::

    {"releases": [{"version", "image", "port", "command", "env", "shape", "spec",
                   "changed", "when", "by", "agent", "result", "reason", "deploy"}, ...],
     "scaling":  [{"when", "from", "to", "reason"}, ...]}

newest last, each list bounded (:data:`LIMIT`): appending drops the oldest, so the
key never grows. Writes are compare-and-set, retried a few times; history is a
record for people, so a write that keeps losing its race is logged and given up,
never a reason to fail a deploy or a scaling decision. A release entry holds
what :mod:`agent.releases` records (secrets excluded), so ``shipmate rollback
--to VERSION`` can bring back any release listed here.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from agent.keys import Keys, parse_object
from agent.releases import Release
from agent.store import Store, StoreError

log = logging.getLogger("shipmate.history")
LIMIT = 20
"entries kept per list"


def read_history(store: Store, keys: Keys, service: str) -> dict[str, list[dict[str, Any]]]:
    """``{"releases": [...], "scaling": [...]}`` of ``service``, oldest first (empty if none)."""
    entry = store.get(keys.service(service, "history"))
    data = parse_object(entry.value) if entry else {}
    return {name: [e for e in data.get(name) or [] if isinstance(e, dict)]
            for name in ("releases", "scaling")}


_UNREAD: Any = object()


def append(store: Store, keys: Keys, service: str, kind: str, record: dict[str, Any],
           limit: int = LIMIT, *, current: Any = _UNREAD) -> bool:
    """Append ``record`` to the ``kind`` list ("releases" or "scaling"); False if given up.

    ``current`` is the history key as the caller just read it (None: absent), which saves
    a read; the write is a compare-and-set on it all the same (a stale one is read again).
    """
    key = keys.service(service, "history")
    for attempt in range(5):
        try:
            entry = current if attempt == 0 and current is not _UNREAD else store.get(key)
            data = parse_object(entry.value) if entry else {}
            items = [e for e in data.get(kind) or [] if isinstance(e, dict)]
            data[kind] = [*items, record][-limit:]
            value = json.dumps(data, separators=(",", ":"))
            if (store.replace(key, value, entry.revision) if entry else store.create(key, value)):
                return True
        except StoreError as exc:
            log.warning("%s: history not written: %s", service, exc)
            return False
    log.warning("%s: history not written: the key kept changing", service)
    return False


def changes(old: Release | None, new: Release) -> str:
    """What changed from ``old`` to ``new``, in a few words ("image a -> b, env GREETING")."""
    if old is None:
        return "first release"
    if old.version == new.version:
        return "nothing"
    out = []
    if old.image != new.image:
        out.append(f"image {old.image or '-'} -> {new.image or '-'}")
    if old.port != new.port:
        out.append(f"port {old.port} -> {new.port}")
    if old.command is not None and new.command is not None and old.command != new.command:
        out.append("command")
    if old.env is not None and new.env is not None:
        keys = sorted(k for k in old.env.keys() | new.env.keys()
                      if old.env.get(k) != new.env.get(k))
        if keys:
            out.append("env " + ", ".join(keys))
    if (old.shape or {}) != (new.shape or {}):
        keys = sorted(k for k in (old.shape or {}).keys() | (new.shape or {}).keys()
                      if (old.shape or {}).get(k) != (new.shape or {}).get(k))
        out.append("actuator " + ", ".join(keys))
    return ", ".join(out) or "spec"


def find_release(store: Store, keys: Keys, service: str, version: str | None
                 ) -> dict[str, Any] | None:
    """The recorded release to roll back to: ``version`` from the release's ``previous`` or
    the history, or (``version`` None) the release before the current one."""
    entry = store.get(keys.service(service, "release"))
    current = parse_object(entry.value) if entry else {}
    previous = current.get("previous") if isinstance(current.get("previous"), dict) else None
    if version is None:
        if previous and previous.get("version") != current.get("version"):
            return previous
        # the previous one was lost (or equals the current): the newest other one in history
        for item in reversed(read_history(store, keys, service)["releases"]):
            if item.get("version") != current.get("version") and item.get("result") != (
                    "rolled-back"):
                return item
        return None
    candidates = [previous] if previous else []
    candidates += list(reversed(read_history(store, keys, service)["releases"]))
    for item in candidates:
        if item and (item.get("version") == version or (
                len(version) >= 4 and str(item.get("version", "")).startswith(version))):
            return item
    return None
