"""Leadership: one acting agent per cluster, held on a lease and fenced.

The acting agent's id sits at ``<prefix>/<cluster>/leader`` on a lease. Taking
it is a compare-and-set, so two agents never both win it. Holding it is not
enough to act: the agent acts only while it is *sure* it still leads,

    now < last confirmed refresh + ttl - margin        (a monotonic clock)

where a refresh counts from the moment it was *sent* (the lease at the store
cannot have been renewed before that), and a refresh never outlives the lease:
it is abandoned at the deadline, whatever the store's own timeouts. That is
client-go's renew deadline. Unlike client-go, the store checks too: every
write made for the leader goes through :class:`FencedStore`, which refuses it
once the deadline has passed and otherwise sends it fenced on the leader key's
lease, so a deposed agent's write fails at etcd (v3) or inside the embedded
store's transaction whatever its clock says (:class:`agent.store.Fence`).

A paused leader (SIGSTOP) that continues finds its deadline passed and acts on
nothing; the loop drops any plan made before (each win starts a new ``term``).
A standby waits on a watch of the leader key and campaigns when it is deleted
(a clean stop) or its lease ends (a dead leader), and every third of the lease
in any case. A restarted agent takes over at once from its own dead
predecessor (same host, boot and pid namespace; pid gone).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.store import Entry, Fence, Lease, NotLeading, Store, StoreError, Watch, WatchEvent

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
    """Whether ``pid`` is a live process (a zombie is dead: it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] not in "ZX"


def _bounded(call: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """Run ``call`` on a daemon thread; ``(True, result)`` if it returned within
    ``timeout``, ``(False, exception or None)`` otherwise (a late answer is ignored)."""
    box: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append((True, call()))
        except Exception as exc:  # noqa: BLE001 - handed back to the caller
            box.append((False, exc))
        done.set()

    threading.Thread(target=run, daemon=True, name="leader-call").start()
    if not done.wait(max(0.0, timeout)):
        return False, None
    return box[0]


class Leadership:
    """Campaigns for and keeps the leader key; ``is_leader`` says whether to act now."""

    def __init__(self, store: Store, key: str, ttl: float = 15.0, *,
                 margin: float | None = None, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.store, self.key, self.ttl, self.clock = store, key, ttl, clock
        self.margin = margin if margin is not None else max(1.0, ttl / 5)
        self.on_change = on_change
        self.token = uuid.uuid4().hex[:12]  # tells our key from another Leadership's
        self.term = 0
        "counts the times this agent won: a plan is good only for the term it was made in"
        self.value = ""
        self.lost_why: str | None = None
        "why this agent last lost the key (None while it leads or never lost it)"
        self._lease: Lease | None = None
        self._confirmed = float("-inf")  # when the last refresh that worked was sent
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Watch | None = None

    # ---------------------------------------------------------------- state
    @property
    def deadline(self) -> float:
        """The monotonic time until which this agent is sure it leads."""
        return self._confirmed + self.ttl - self.margin

    @property
    def is_leader(self) -> bool:
        return self._lease is not None and self.clock() < self.deadline

    def valid(self, term: int) -> bool:
        """Whether this agent still leads, in the same term (a plan of ``term`` holds)."""
        return term == self.term and self.is_leader

    def fence(self) -> Fence:
        """The fence of a write made for the leader; NotLeading once the deadline passed."""
        lease = self._lease
        if lease is None or self.clock() >= self.deadline:
            raise NotLeading(f"this agent no longer leads ({self.key}): nothing written")
        return Fence(self.key, lease)

    def _ours(self, value: str) -> bool:
        try:
            return json.loads(value).get("token") == self.token
        except (ValueError, AttributeError):
            return False

    # ---------------------------------------------------------------- winning
    def campaign(self) -> bool:
        """Try once to become (or stay) the leader; True if this agent leads."""
        with self._lock:
            if self.is_leader:
                return True
            self._lease = None
            current = self.store.get(self.key)
            if current is not None and not (self._ours(current.value)
                                            or self._dead_local(current.value)):
                return False  # held by another: no lease to grant and revoke
            sent = self.clock()
            lease = self.store.lease(self.ttl)
            value = json.dumps({**agent_id(), "token": self.token, "since": time.time(),
                                "ttl": self.ttl})
            won = self.store.create(self.key, value, lease=lease)
            if not won:
                current = self.store.get(self.key)
                # our own key, left by a refresh that failed (the store was away): take it back
                if current is not None and (self._ours(current.value)
                                            or self._dead_local(current.value)):
                    won = self.store.replace(self.key, value, current.revision, lease=lease)
            if not won:
                lease.revoke()
                return False
            self._lease, self._confirmed, self.value = lease, sent, value
            self.lost_why = None
            self.term += 1
            log.info("this agent now leads (%s)", self.key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._keepalive, daemon=True,
                                                name="leader-keepalive")
                self._thread.start()
        self._changed(True)
        return True

    def _dead_local(self, value: str) -> bool:
        try:
            other = json.loads(value) if len(value) < 65536 else None
        except (ValueError, RecursionError):  # a hand-written leader key: not ours
            return False
        me = agent_id()
        same_place = isinstance(other, dict) and all(
            other.get(k) == me[k] and me[k] for k in ("host", "boot", "pidns"))
        pid = other.get("pid") if isinstance(other, dict) else None
        return (same_place and isinstance(pid, int) and not isinstance(pid, bool)
                and pid > 0 and not _pid_alive(pid))

    def _changed(self, leading: bool) -> None:
        if self.on_change is not None:
            self.on_change(leading)

    # ---------------------------------------------------------------- keeping
    def _keepalive(self) -> None:
        wait = self.ttl / 3
        while not self._stop.wait(wait):
            wait = self.ttl / 3
            lease = self._lease
            if lease is None:
                continue
            sent = self.clock()
            left = self.deadline - sent
            if left <= 0:
                self._lose(lease, "no refresh got through before the deadline")
                continue

            def refresh(lease: Lease = lease) -> Entry | None:
                lease.refresh()
                return self.store.get(self.key)

            ok, result = _bounded(refresh, left)  # a refresh never outlives the lease
            if ok and result is not None and result.value == self.value:
                if self._lease is lease:
                    self._confirmed = sent
            elif ok:  # taken over, or deleted by ops
                self._lose(lease, "the leader key no longer names this agent")
            elif isinstance(result, StoreError) and "expired" in str(result):
                self._lose(lease, f"the lease expired: {result}")
            else:  # unknown whether the lease survived: try again soon, until the deadline
                log.warning("leadership refresh failed: %s", result or "no answer in time")
                wait = min(self.ttl / 10, max(0.1, self.deadline - self.clock()))

    def _lose(self, lease: Lease, why: str) -> None:
        with self._lock:
            if self._lease is not lease:
                return
            self._lease = None
            self.lost_why = why
        log.warning("lost leadership: %s", why)
        self._changed(False)

    def watch(self, on_vacant: Callable[[], None]) -> None:
        """Call ``on_vacant`` (from a background thread) when the leader key is deleted or
        expires, so a standby campaigns at once instead of at its next turn."""

        def seen(events: list[WatchEvent]) -> None:
            if not events or any(e.key == self.key and e.value is None for e in events):
                on_vacant()

        self._watch = self.store.watch(self.key, seen)

    def holder(self) -> dict[str, Any] | None:
        """Who leads (the leader key's JSON), with ``lease_left`` where the store knows it."""
        entry = self.store.get(self.key)
        if entry is None:
            return None
        try:
            value = json.loads(entry.value)
        except ValueError:
            return {"invalid": entry.value[:80]}
        if not isinstance(value, dict):
            return {"invalid": entry.value[:80]}
        return {**value, "lease_left": self.store.lease_left(self.key)}

    def resign(self, timeout: float = 2.0, *, revoke: bool = True) -> None:
        """Stop acting. With ``revoke``, give the key up at once (a clean stop) so another
        agent can act; without (a start of ours may still be under way), or if the store
        does not answer within ``timeout``, the lease expires on its own."""
        self._stop.set()
        if self._watch is not None:
            self._watch.cancel()
        with self._lock:
            lease, self._lease = self._lease, None
        if lease is not None and revoke:
            _bounded(lease.revoke, timeout)


class FencedLease(Lease):
    """A lease whose refresh is refused once this agent no longer leads (announcements of
    a deposed agent are not kept alive)."""

    def __init__(self, inner: Lease, leadership: Leadership) -> None:
        self.inner, self.leadership, self.ttl = inner, leadership, inner.ttl
        self.id = getattr(inner, "id", None)

    def refresh(self) -> None:
        self.leadership.fence()
        self.inner.refresh()

    def revoke(self) -> None:
        self.inner.revoke()


class FencedStore(Store):
    """The store as the acting agent writes it: every write checks the local deadline
    and is fenced on the leader key; reads go straight through."""

    def __init__(self, store: Store, leadership: Leadership) -> None:
        self.inner, self.leadership = store, leadership
        self.fences = store.fences

    @property
    def round_trips(self) -> int:  # type: ignore[override]
        return self.inner.round_trips

    @staticmethod
    def _lease(lease: Lease | None) -> Lease | None:
        return lease.inner if isinstance(lease, FencedLease) else lease

    def get(self, key: str) -> Entry | None:
        return self.inner.get(key)

    def get_prefix(self, prefix: str) -> dict[str, Entry]:
        return self.inner.get_prefix(prefix)

    def put(self, key: str, value: str, *, lease: Lease | None = None,
            fence: Fence | None = None) -> int:
        return self.inner.put(key, value, lease=self._lease(lease),
                              fence=fence or self.leadership.fence())

    def create(self, key: str, value: str, *, lease: Lease | None = None,
               fence: Fence | None = None) -> bool:
        return self.inner.create(key, value, lease=self._lease(lease),
                                 fence=fence or self.leadership.fence())

    def create_many(self, items: dict[str, str], *, fence: Fence | None = None) -> set[str]:
        return self.inner.create_many(items, fence=fence or self.leadership.fence())

    def replace(self, key: str, value: str, revision: int, *, lease: Lease | None = None,
                fence: Fence | None = None) -> bool:
        return self.inner.replace(key, value, revision, lease=self._lease(lease),
                                  fence=fence or self.leadership.fence())

    def delete(self, key: str, revision: int | None = None, *,
               fence: Fence | None = None) -> bool:
        return self.inner.delete(key, revision, fence=fence or self.leadership.fence())

    def put_if(self, key: str, value: str, revision: int | None, *,
               fence: Fence | None = None) -> int | None:
        return self.inner.put_if(key, value, revision, fence=fence or self.leadership.fence())

    def put_all_if(self, writes: list[tuple[str, str, int | None]], *,
                   fence: Fence | None = None) -> list[int] | None:
        return self.inner.put_all_if(writes, fence=fence or self.leadership.fence())

    def lease(self, ttl: float) -> Lease:
        self.leadership.fence()
        return FencedLease(self.inner.lease(ttl), self.leadership)

    def lease_left(self, key: str) -> float | None:
        return self.inner.lease_left(key)

    def watch(self, prefix: str, callback: Callable[[list[WatchEvent]], None]) -> Watch:
        return self.inner.watch(prefix, callback)

    def close(self) -> None:
        self.inner.close()
