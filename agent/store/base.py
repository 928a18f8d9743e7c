"""The store contract: one interface, three backends (embedded, etcd v3, etcd v2).

Semantics every backend keeps (the contract suite in tests/agent/store checks them):

- Keys and values are strings. Every write gets a ``revision`` that grows across the
  whole store (etcd's mod_revision on v3, modifiedIndex on v2, a counter in the
  embedded file), so a caller can compare-and-set against what it read.
- ``create`` succeeds only if the key is absent; ``replace`` only if the key's
  revision still equals the one given; ``delete`` with a revision likewise.
  They return False on a lost race and never raise for it. ``put_if`` is either
  (by its revision, None: absent) and returns the new revision, or None;
  ``put_all_if`` does several in one transaction (etcd v2: one after another).
- A :class:`Lease` gives keys a time to live. Keys written with a lease vanish
  when it expires unless ``refresh`` is called in time; ``revoke`` removes them at
  once. (etcd v3 has real leases; v2 and the embedded store keep the same promise
  with per-key TTLs.)
- ``watch`` calls back, from a background thread, with the changes under a
  prefix. It is a wake-up signal: a watcher must tolerate missed or repeated
  events and re-read state, because etcd may compact history and drop watches.
- Any failure to reach the backend raises :class:`StoreError`, never a library's
  own exception, so callers can freeze instead of acting on a half answer.
- A write given a :class:`Fence` succeeds only while the fence's key is held on
  the fence's lease, checked by the store in the same transaction as the write
  (etcd v3: a compare on the key's lease; embedded: inside its SQLite
  transaction); otherwise it raises :class:`NotLeading` and changes nothing.
  Backends without multi-key transactions (etcd v2) say so with
  ``fences = False`` and ignore the fence: callers rely on their own deadline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass


class StoreError(Exception):
    """The store could not be reached or answered with an error."""


class NotLeading(StoreError):
    """A fenced write was refused: the fence's key is no longer held on its lease (or the
    caller's own deadline passed before it was sent). Nothing was written."""


class StoreRefused(StoreError):
    """The store answered, but will never accept us as configured: a TLS or authentication
    problem. Retrying does not help; ``shipmate run`` exits 1 when it meets one at start."""


@dataclass(frozen=True)
class Entry:
    """One key as read from the store."""

    key: str
    value: str
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    """A change seen by a watch: ``value`` is None when the key was deleted or expired."""

    key: str
    value: str | None


class Lease(ABC):
    """A time to live shared by the keys written with it."""

    ttl: float

    @abstractmethod
    def refresh(self) -> None:
        """Extend the lease by its ttl from now. Raises StoreError if it already expired."""

    @abstractmethod
    def revoke(self) -> None:
        """End the lease now, deleting its keys."""


@dataclass(frozen=True)
class Fence:
    """Makes a write conditional on ``key`` being held on ``lease`` (the leader key)."""

    key: str
    lease: Lease


class Watch(ABC):
    """A running watch; ``cancel`` stops it."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop watching; the callback is not called afterwards."""


class Store(ABC):
    """A consistent key-value store with compare-and-set, leases and watches.

    ``round_trips`` counts requests sent to the backend, for benchmarks.
    """

    round_trips: int = 0
    fences: bool = True
    "whether fenced writes are checked by the store itself (False: the fence is ignored)"

    @abstractmethod
    def get(self, key: str) -> Entry | None:
        """The entry at ``key``, or None if absent."""

    @abstractmethod
    def get_prefix(self, prefix: str) -> dict[str, Entry]:
        """Every entry whose key starts with ``prefix``, as one consistent read: one
        request (etcd v3: one per ``page_size`` keys, all at one revision)."""

    def get_revisions(self, prefix: str) -> dict[str, int]:
        """Every key under ``prefix`` with its revision, no values, as one consistent read
        (a resync that compares revisions transfers no values: etcd v3's ``keys_only``)."""
        return {key: entry.revision for key, entry in self.get_prefix(prefix).items()}

    @abstractmethod
    def put(self, key: str, value: str, *, lease: Lease | None = None,
            fence: Fence | None = None) -> int:
        """Write unconditionally (but for the fence); return the new revision."""

    @abstractmethod
    def create(self, key: str, value: str, *, lease: Lease | None = None,
               fence: Fence | None = None) -> bool:
        """Write only if ``key`` is absent; False if it exists."""

    def create_many(self, items: dict[str, str], *, fence: Fence | None = None) -> set[str]:
        """Create each key of ``items`` that is absent; the keys created. Backends with
        transactions batch them (etcd v3: one transaction per 100 keys; embedded: one
        SQLite transaction), so a start-up that records 10,000 keys is not 10,000 round
        trips; a key that exists is left as it is (as :meth:`create` leaves it)."""
        return {key for key, value in items.items() if self.create(key, value, fence=fence)}

    @abstractmethod
    def replace(
        self, key: str, value: str, revision: int, *, lease: Lease | None = None,
        fence: Fence | None = None,
    ) -> bool:
        """Write only if ``key`` exists at ``revision``; False otherwise."""

    @abstractmethod
    def delete(self, key: str, revision: int | None = None, *,
               fence: Fence | None = None) -> bool:
        """Delete ``key`` (only at ``revision`` if given); False if absent or changed."""

    def put_if(self, key: str, value: str, revision: int | None, *,
               fence: Fence | None = None) -> int | None:
        """Write only if ``key`` is at ``revision`` (None: only if absent), in one request;
        the new revision (so the next compare-and-set needs no read), or None on a lost race.

        This default costs a second request (a read); the backends answer in one.
        """
        ok = (self.create(key, value, fence=fence) if revision is None
              else self.replace(key, value, revision, fence=fence))
        if not ok:
            return None
        entry = self.get(key)
        return entry.revision if entry is not None and entry.value == value else 0

    def put_all_if(self, writes: list[tuple[str, str, int | None]], *,
                   fence: Fence | None = None) -> list[int] | None:
        """Write each ``(key, value, revision)`` only if every key is at its revision (None:
        absent): one transaction, all or nothing, on backends with transactions. The new
        revisions (one per write), or None on a lost race.

        This default, for backends without multi-key transactions (etcd v2), writes
        one key after another with :meth:`put_if`: a lost race stops there, with the
        keys before it written.
        """
        revisions = []
        for key, value, revision in writes:
            written = self.put_if(key, value, revision, fence=fence)
            if written is None:
                return None
            revisions.append(written)
        return revisions

    def lease_left(self, key: str) -> float | None:
        """Seconds until the lease ``key`` is written on ends (None: no lease, or unknown)."""
        return None

    @abstractmethod
    def lease(self, ttl: float) -> Lease:
        """Grant a lease of ``ttl`` seconds."""

    @abstractmethod
    def watch(self, prefix: str, callback: Callable[[list[WatchEvent]], None]) -> Watch:
        """Call ``callback`` from a background thread with changes under ``prefix``."""

    def close(self) -> None:  # noqa: B027 - optional for backends with nothing to release
        """Release connections and threads."""
