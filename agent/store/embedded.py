"""The embedded store: etcd's semantics in one local SQLite file.

One machine needs no etcd: the agent and the CLI (another process) share the
file. SQLite's WAL mode and ``BEGIN IMMEDIATE`` make every operation one atomic
transaction across processes. A single counter in the file is the revision;
every change is also appended to an ``events`` table (trimmed), which watchers
poll, so a write by the CLI wakes the agent within the poll interval.

Expiry is lazy: every transaction first deletes the keys of expired leases
(recording their deletion as events), so an expired key is never read.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.store.base import Entry, Fence, Lease, NotLeading, Store, StoreError, Watch, WatchEvent

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 0), rev INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES (0, 0);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, rev INTEGER NOT NULL, lease INTEGER
);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ttl REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (rev INTEGER PRIMARY KEY, key TEXT NOT NULL, value TEXT);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease);
"""
log = logging.getLogger(__name__)

EVENTS_KEPT = 10_000
WATCH_POLL = 0.05


def prefix_end(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"


class EmbeddedLease(Lease):
    def __init__(self, store: EmbeddedStore, lease_id: int, ttl: float) -> None:
        self.store, self.id, self.ttl = store, lease_id, ttl

    def refresh(self) -> None:
        with self.store._tx() as db:
            n = db.execute(
                "UPDATE leases SET expires = ? WHERE id = ?", (time.time() + self.ttl, self.id)
            ).rowcount
        if not n:
            raise StoreError(f"lease {self.id} has expired")

    def revoke(self) -> None:
        with self.store._tx() as db:
            self.store._drop_leases(db, [self.id])


class EmbeddedWatch(Watch):
    def __init__(self, store: EmbeddedStore, prefix: str, callback) -> None:
        self._stop = threading.Event()
        # the start revision is read here, not in the thread: a write made right after
        # watch() returns must be seen
        db = store._connect()
        try:
            last = db.execute("SELECT rev FROM meta").fetchone()[0]
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"embedded store {store.path}: {exc}") from exc
        self._thread = threading.Thread(
            target=self._run, args=(store, prefix, callback, db, last), name="embedded-watch",
            daemon=True,
        )
        self._thread.start()

    def _run(self, store: EmbeddedStore, prefix: str, callback, db: sqlite3.Connection,
             last: int) -> None:
        while not self._stop.wait(WATCH_POLL):
            try:
                # plain reads while nothing happens; a write transaction only to expire leases
                # (so their keys' deletions become events)
                if db.execute("SELECT 1 FROM leases WHERE expires < ? LIMIT 1",
                              (time.time(),)).fetchone():
                    with store._tx(db):
                        pass
                head = db.execute("SELECT rev FROM meta").fetchone()[0]
                if head == last:
                    continue
                rows = db.execute(
                    "SELECT rev, key, value FROM events WHERE rev > ? AND key >= ? AND key < ?"
                    " ORDER BY rev", (last, prefix, prefix_end(prefix))).fetchall()
                oldest = db.execute("SELECT MIN(rev) FROM events").fetchone()[0]
            except (StoreError, sqlite3.Error):
                continue
            if head < last or (oldest is not None and oldest > last + 1):
                # the file was replaced, or events this watch had not seen were trimmed
                last = head
                self._deliver(callback, [])
                continue
            last = max([head, *(rev for rev, _, _ in rows)])
            if rows:
                self._deliver(callback, [WatchEvent(key, value) for _, key, value in rows])
        db.close()

    def _deliver(self, callback, events: list[WatchEvent]) -> None:
        if self._stop.is_set():
            return
        try:
            callback(events)
        except Exception:  # a failing callback must not end the watch
            log.exception("embedded watch callback failed")

    def cancel(self) -> None:
        self._stop.set()


class EmbeddedStore(Store):
    """The ``embedded`` backend: a SQLite file at ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:  # private: folders the agent creates are 0700, the database 0600
            for folder in reversed([p for p in (self.path.parent, *self.path.parent.parents)
                                    if not p.exists()]):
                folder.mkdir(mode=0o700, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreError(f"cannot create embedded store {self.path}: {exc}") from exc
        self.round_trips = 0
        self._lock = threading.Lock()
        self._db = self._connect()
        try:
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"embedded store {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open embedded store {self.path}: {exc}") from exc
        return db

    @contextmanager
    def _tx(self, db: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        own = db is None
        if own:
            self._lock.acquire()
            db = self._db
            self.round_trips += 1
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                self._expire(db)
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"embedded store {self.path}: {exc}") from exc
        finally:
            if own:
                self._lock.release()

    def _expire(self, db: sqlite3.Connection) -> None:
        expired = [r[0] for r in db.execute("SELECT id FROM leases WHERE expires < ?",
                                            (time.time(),))]
        if expired:
            self._drop_leases(db, expired)

    def _drop_leases(self, db: sqlite3.Connection, ids: list[int]) -> None:
        marks = ",".join("?" * len(ids))
        for (key,) in db.execute(f"SELECT key FROM kv WHERE lease IN ({marks})", ids).fetchall():
            self._write(db, key, None)
        db.execute(f"DELETE FROM leases WHERE id IN ({marks})", ids)

    def _write(self, db: sqlite3.Connection, key: str, value: str | None,
               lease: Lease | None = None) -> int:
        rev = db.execute("UPDATE meta SET rev = rev + 1 RETURNING rev").fetchone()[0]
        if value is None:
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
        else:
            lease_id = None
            if lease is not None:
                lease_id = lease.id  # type: ignore[attr-defined]
                if not db.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone():
                    raise StoreError(f"lease {lease_id} has expired")
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (key, value, rev, lease_id))
        db.execute("INSERT INTO events VALUES (?, ?, ?)", (rev, key, value))
        if rev % 1000 == 0:
            db.execute("DELETE FROM events WHERE rev <= ?", (rev - EVENTS_KEPT,))
        return rev

    def _revision(self, db: sqlite3.Connection, key: str) -> int | None:
        row = db.execute("SELECT rev FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def get(self, key: str) -> Entry | None:
        with self._tx() as db:
            row = db.execute("SELECT key, value, rev FROM kv WHERE key = ?", (key,)).fetchone()
        return Entry(*row) if row else None

    def get_prefix(self, prefix: str) -> dict[str, Entry]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT key, value, rev FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix_end(prefix)),
            ).fetchall()
        return {row[0]: Entry(*row) for row in rows}

    def get_revisions(self, prefix: str) -> dict[str, int]:
        with self._tx() as db:
            rows = db.execute("SELECT key, rev FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                              (prefix, prefix_end(prefix))).fetchall()
        return dict(rows)

    def _fenced(self, db: sqlite3.Connection, fence: Fence | None) -> None:
        if fence is None:
            return
        row = db.execute("SELECT lease FROM kv WHERE key = ?", (fence.key,)).fetchone()
        if row is None or row[0] != fence.lease.id:  # type: ignore[attr-defined]
            raise NotLeading(f"{fence.key} is no longer held by this agent: write refused")

    def put(self, key: str, value: str, *, lease: Lease | None = None,
            fence: Fence | None = None) -> int:
        with self._tx() as db:
            self._fenced(db, fence)
            return self._write(db, key, value, lease)

    def create(self, key: str, value: str, *, lease: Lease | None = None,
               fence: Fence | None = None) -> bool:
        with self._tx() as db:
            self._fenced(db, fence)
            if self._revision(db, key) is not None:
                return False
            self._write(db, key, value, lease)
            return True

    def create_many(self, items: dict[str, str], *, fence: Fence | None = None) -> set[str]:
        """Create each absent key of ``items``, all in one SQLite transaction."""
        created = set()
        with self._tx() as db:
            self._fenced(db, fence)
            for key, value in items.items():
                if self._revision(db, key) is None:
                    self._write(db, key, value)
                    created.add(key)
        return created

    def replace(self, key: str, value: str, revision: int, *,
                lease: Lease | None = None, fence: Fence | None = None) -> bool:
        with self._tx() as db:
            self._fenced(db, fence)
            if self._revision(db, key) != revision:
                return False
            self._write(db, key, value, lease)
            return True

    def put_if(self, key: str, value: str, revision: int | None, *,
               fence: Fence | None = None) -> int | None:
        with self._tx() as db:
            self._fenced(db, fence)
            if self._revision(db, key) != revision:
                return None
            return self._write(db, key, value)

    def put_all_if(self, writes: list[tuple[str, str, int | None]], *,
                   fence: Fence | None = None) -> list[int] | None:
        with self._tx() as db:
            self._fenced(db, fence)
            if any(self._revision(db, key) != revision for key, _, revision in writes):
                return None
            return [self._write(db, key, value) for key, value, _ in writes]

    def delete(self, key: str, revision: int | None = None, *,
               fence: Fence | None = None) -> bool:
        with self._tx() as db:
            self._fenced(db, fence)
            current = self._revision(db, key)
            if current is None or (revision is not None and current != revision):
                return False
            self._write(db, key, None)
            return True

    def lease_left(self, key: str) -> float | None:
        with self._tx() as db:
            row = db.execute("SELECT l.expires FROM kv JOIN leases l ON kv.lease = l.id "
                             "WHERE kv.key = ?", (key,)).fetchone()
        return max(0.0, row[0] - time.time()) if row else None

    def lease(self, ttl: float) -> Lease:
        with self._tx() as db:
            lease_id = db.execute(
                "INSERT INTO leases (ttl, expires) VALUES (?, ?)", (ttl, time.time() + ttl)
            ).lastrowid
        return EmbeddedLease(self, lease_id, ttl)

    def watch(self, prefix: str, callback: Callable[[list[WatchEvent]], None]) -> Watch:
        return EmbeddedWatch(self, prefix, callback)

    def close(self) -> None:
        with self._lock:
            self._db.close()
