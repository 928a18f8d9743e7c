"""Leadership: one acting agent per cluster, held on a lease in the store.

The acting agent's id sits at ``<prefix>/<cluster>/leader`` on a lease that a
background thread refreshes; others wait. Taking over is a compare-and-set, so
two agents never both win it, and an agent whose key no longer names it (taken
over, or deleted by ops) stops acting at its next refresh. A restarted agent
takes over at once from its own dead predecessor (same host, boot and pid
namespace; pid gone) instead of waiting out the lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import uuid
from pathlib import Path

from agent.store import Lease, Store, StoreError

log = logging.getLogger("shipmate.leader")


def _read(path: str) -> str:
    try:
        return os.readlink(path) if path.startswith("/proc/self/ns") else Path(
            path).read_text().strip()
    except OSError:
        return ""


def agent_id() -> dict[str, object]:
    """Who this agent is: host and pid, plus the boot and pid namespace that make the pid
    meaningful (two containers on one host may share a hostname, never a pid namespace)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": _read("/proc/self/ns/pid")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Leadership:
    """Campaigns for and keeps the leader key; ``is_leader`` says whether to act."""

    def __init__(self, store: Store, key: str, ttl: float = 15.0) -> None:
        self.store, self.key, self.ttl = store, key, ttl
        # the token tells this agent's own key from another Leadership in the same process
        self.me = json.dumps({**agent_id(), "token": uuid.uuid4().hex[:12]})
        self._lease: Lease | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self._lease is not None

    def campaign(self) -> bool:
        """Try once to become (or stay) the leader; True if this agent leads."""
        with self._lock:
            if self._lease is not None:
                return True
            lease = self.store.lease(self.ttl)
            won = self.store.create(self.key, self.me, lease=lease)
            if not won:
                current = self.store.get(self.key)
                # our own key, left by a refresh that failed (the store was away): take it back
                if current is not None and (current.value == self.me
                                            or self._dead_local(current.value)):
                    won = self.store.replace(self.key, self.me, current.revision, lease=lease)
            if not won:
                lease.revoke()
                return False
            self._lease = lease
            log.info("this agent now leads (%s)", self.key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._keepalive, daemon=True,
                                                name="leader-keepalive")
                self._thread.start()
            return True

    def _dead_local(self, value: str) -> bool:
        try:
            other = json.loads(value)
        except ValueError:
            return False
        me = agent_id()
        same_place = isinstance(other, dict) and all(
            other.get(k) == me[k] and me[k] for k in ("host", "boot", "pidns"))
        return same_place and isinstance(other.get("pid"), int) and not _pid_alive(other["pid"])

    def _keepalive(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                if self._lease is None:
                    continue
                try:
                    self._lease.refresh()
                    holder = self.store.get(self.key)
                except StoreError as exc:
                    # Unknown whether the lease survived: stop acting until re-elected.
                    log.warning("lost leadership: %s", exc)
                    self._lease = None
                    continue
                if holder is None or holder.value != self.me:  # taken over, or deleted by ops
                    log.warning("lost leadership: the leader key no longer names this agent")
                    self._lease = None

    def resign(self) -> None:
        """Give the key up at once (clean stop), so another agent can act."""
        self._stop.set()
        with self._lock:
            if self._lease is not None:
                with contextlib.suppress(StoreError):
                    self._lease.revoke()
                self._lease = None
