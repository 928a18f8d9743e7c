"""The ``etcd2`` backend: etcd's v2 API (what CoreOS-era clusters speak), with python-etcd.

v2 is a tree of directories, not a flat key space, so:

- a key must start with ``/``; a key cannot also be a directory (etcd refuses
  ``/a/b`` as a value once ``/a/b/c`` exists, and the reverse);
- a prefix read reads the deepest directory that contains the prefix
  recursively (one request) and keeps the keys that start with the prefix; an
  absent directory is an empty result. Hidden keys (a segment starting with
  ``_``) are not listed by v2 and so not returned. v2 cannot page a read, so
  its timeout grows with what the last read of that directory returned;
- the revision of a key is its ``modifiedIndex``; ``create`` is
  ``prevExist=false``, ``replace`` and ``delete`` use ``prevIndex``.

Leases are emulated with per-key TTLs: an :class:`Etcd2Lease` remembers the keys
written with it (and the index it last saw on each) and gives them its ttl;
``refresh`` re-sets each key's TTL without changing its value (v2's
``refresh=true`` write, which does not wake watchers but does move the key's
``modifiedIndex``: a caller must re-read before a compare-and-set on a key it
refreshed); ``revoke`` deletes them. A key rewritten by someone else since is
no longer the lease's (as in v3).

A watch long-polls ``?wait=true&recursive=true&waitIndex=N`` on the directory in
a daemon thread. When etcd's 1000-event history no longer holds ``N`` (error 401,
"index outdated and cleared") or after etcd was unreachable, it re-reads the
current index, calls the callback with ``[]`` (re-read state) and goes on.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import SplitResult, quote

import etcd
import urllib3

from agent.store.base import Entry, Fence, Lease, Store, StoreError, Watch, WatchEvent
from agent.store.endpoints import (
    StoreRefused,
    TLSSettings,
    never_sent,
    parse_endpoint,
    plaintext_mixup,
    plaintext_to_tls,
    tls_problem,
    url_credentials,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

WATCH_IDLE = 60.0  # seconds a long poll may wait before it is re-issued
FIRST_READ = 4  # the first prefix read of a directory may take this many timeouts (no paging)
READ_RATE = 1_000_000  # bytes a second a prefix read's timeout allows beyond the base timeout
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0

_FAILURES = (etcd.EtcdException, urllib3.exceptions.HTTPError, http.client.HTTPException,
             OSError, ValueError, KeyError)
_DELETES = {"delete", "expire", "compareAndDelete"}


def directory_of(prefix: str) -> str:
    """The deepest v2 directory that holds every key starting with ``prefix``."""
    head = prefix[: prefix.rfind("/")] if "/" in prefix else ""
    return head.rstrip("/") or "/"


def _path(key: str) -> str:
    """``key`` as python-etcd must get it: checked, and URL-quoted (python-etcd does not)."""
    if not key.startswith("/") or key.endswith("/") or "//" in key:
        raise StoreError(f"etcd2: keys must be paths like /a/b, not {key!r}")
    return quote(key, safe="/")


def _transport(exc: BaseException) -> bool:
    """True if the endpoint did not answer (rather than answering with an error)."""
    return isinstance(exc, (etcd.EtcdConnectionFailed, etcd.EtcdLeaderElectionInProgress,
                            urllib3.exceptions.HTTPError, http.client.HTTPException, OSError))


def _refusal(exc: BaseException, shown: str) -> str | None:
    """The message for a failure that retrying will not cure (TLS, plaintext, credentials)."""
    problem = tls_problem(exc, shown)
    if problem is None and _transport(exc):
        problem = plaintext_mixup(exc, shown)
    if problem is None and isinstance(exc, etcd.EtcdException):
        problem = plaintext_to_tls(" ".join(str(a) for a in exc.args), shown)
        payload = exc.payload if isinstance(getattr(exc, "payload", None), dict) else {}
        if problem is None and payload.get("errorCode") == 110:  # v2's "The request requires
            problem = f"{shown}: etcd refused the credentials ({payload.get('message')})"
    if problem is None and isinstance(exc, etcd.EtcdException) and "401" in str(exc.args[:1]):
        problem = f"{shown}: etcd refused the credentials (401)"
    return problem


def _reason(exc: BaseException) -> str:
    """A short, secret-free description of a failure."""
    if isinstance(exc, etcd.EtcdConnectionFailed):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, urllib3.exceptions.TimeoutError) and not never_sent(exc):
            return "timed out"
        return "cannot connect" if never_sent(exc) else "connection lost"
    if isinstance(exc, etcd.EtcdException):
        payload = exc.payload if isinstance(getattr(exc, "payload", None), dict) else {}
        code = payload.get("errorCode")
        message = payload.get("message") or (exc.args[0] if exc.args else "error")
        return f"{message} (error {code})" if code else str(message)[:200]
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class _Http:
    """Wraps python-etcd's urllib3 pool: counts requests, turns off urllib3's hidden retries
    (a replayed ``prevExist=false`` PUT would report a race it won), and remembers the
    response in flight so a watch can interrupt its long poll."""

    def __init__(self, pool: urllib3.PoolManager, store: Etcd2Store) -> None:
        self._pool = pool
        self._store = weakref.ref(store)
        self.response: Any = None
        self.cancelled = False

    def cancel(self) -> None:
        """Abort the request in flight, and any request made from now on."""
        self.cancelled = True  # set before reading self.response: see _send
        self._shutdown(self.response)

    @staticmethod
    def _shutdown(response: Any) -> None:
        if response is not None:
            with contextlib.suppress(Exception):  # finished, or already released to the pool
                response.shutdown()

    def _send(self, send: Callable[..., Any], method: str, url: str, **kwargs: Any) -> Any:
        store = self._store()
        if store is not None:
            with store._count_lock:
                store.round_trips += 1
        self.response = send(method, url, retries=False, **kwargs)
        if self.cancelled:  # cancel() ran while the request was being sent
            self._shutdown(self.response)
        return self.response

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._send(self._pool.request, method, url, **kwargs)

    def request_encode_body(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._send(self._pool.request_encode_body, method, url, **kwargs)

    def urlopen(self, method: str, url: str, **kwargs: Any) -> Any:
        return self._send(self._pool.urlopen, method, url, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class Etcd2Lease(Lease):
    """A lease emulated with per-key TTLs (see the module docstring)."""

    def __init__(self, store: Etcd2Store, ttl: float) -> None:
        self.store, self.ttl = store, ttl
        self.seconds = max(1, math.ceil(ttl))
        self.keys: dict[str, int] = {}  # key -> the modifiedIndex this lease last wrote or saw
        self.expires = time.monotonic() + self.seconds
        self.revoked = False
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise StoreError if the lease can no longer give keys a TTL."""
        if self.revoked or time.monotonic() > self.expires:
            raise StoreError("etcd2 lease has expired")

    def refresh(self) -> None:
        """Re-set the TTL of each key; StoreError if the lease or all its keys expired."""
        self.check()
        with self._lock:
            keys = dict(self.keys)
        started = time.monotonic()
        alive = 0
        for key, index in keys.items():
            path = _path(key)
            try:
                # not replayed on another endpoint: a refresh that did land moved the index
                result = self.store._call(
                    lambda c, p=path, i=index: c.refresh(p, self.seconds, prevIndex=i),
                    idempotent=False)
            except _Gone:
                self.store._forget(key, self)
                continue
            alive += 1
            with self._lock:
                if key in self.keys:
                    self.keys[key] = result.modifiedIndex
        if keys and not alive:
            self.revoked = True
            raise StoreError("etcd2 lease has expired: all of its keys are gone")
        self.expires = started + self.seconds

    def revoke(self) -> None:
        """Delete every key of the lease (those still as it left them)."""
        self.revoked = True
        with self._lock:
            keys, self.keys = dict(self.keys), {}
        for key, index in keys.items():
            path = _path(key)
            with contextlib.suppress(_Gone):
                self.store._call(lambda c, p=path, i=index: c.delete(p, prevIndex=i),
                                 idempotent=True)
            self.store._forget(key, self)


class _Gone(Exception):
    """The key is absent, or not at the index the operation compared (a lost race)."""


class Etcd2Watch(Watch):
    """A prefix watch: v2 long polls on the prefix's directory, in a daemon thread."""

    def __init__(self, store: Etcd2Store, prefix: str,
                 callback: Callable[[list[WatchEvent]], None]) -> None:
        self._store, self._prefix, self._callback = store, prefix, callback
        self._dir = directory_of(prefix)
        self._stop = threading.Event()
        # its own clients: the pool wrappers then hold this watch's long poll, to interrupt it
        self._clients = store._make_clients()
        try:  # pin the start now, so every change after watch() returns is seen
            self._next: int | None = store._index(self._dir) + 1
            self._resync = False
        except StoreError:  # etcd is down: the thread connects later, then signals a re-read
            self._next, self._resync = None, True
        self._thread = threading.Thread(target=self._run, name=f"etcd2-watch {prefix}",
                                        daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop the thread and abort its long poll; the callback is not called afterwards."""
        self._stop.set()
        for client in self._clients:
            client.http.cancel()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def _deliver(self, events: list[WatchEvent]) -> None:
        if self._stop.is_set():
            return
        try:
            self._callback(events)
        except Exception:
            log.exception("etcd2 watch callback for %s failed", self._prefix)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._poll()
                failures = 0
                continue
            except _Cleared:  # etcd's event history moved past us
                self._next = None
                failures = 0
            except StoreError as exc:
                log.debug("etcd2 watch on %s: %s", self._prefix, exc)
            except Exception:  # never let the thread die
                log.exception("etcd2 watch on %s failed", self._prefix)
            self._resync = True
            failures += 1  # never spin: every retry after a failure waits
            self._stop.wait(min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures - 1, 8)))
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.http.clear()

    def _poll(self) -> None:
        """One long poll; deliver what it brings."""
        if self._next is None or self._resync:
            index = self._store._index(self._dir)
            if self._next is None or index < self._next - 1:  # cleared, or a store gone back
                self._next = index + 1
            self._resync = False
            self._deliver([])
        errors = []
        for i in self._store._order():
            if self._stop.is_set():
                return
            client = self._clients[i]
            try:
                result = client.read(quote(self._dir, safe="/"), wait=True, recursive=True,
                                     waitIndex=self._next, timeout=WATCH_IDLE)
            except etcd.EtcdWatchTimedOut:
                return  # nothing happened: poll again from the same index
            except (etcd.EtcdEventIndexCleared, etcd.EtcdWatcherCleared):
                raise _Cleared() from None
            except _FAILURES as exc:
                if self._stop.is_set():
                    return
                shown = self._store._names[i]
                refusal = _refusal(exc, shown)
                errors.append(f"etcd2 {refusal}" if refusal else f"etcd2 {shown}: {_reason(exc)}")
                continue
            self._store._current = i
            self._next = max(self._next, result.modifiedIndex + 1)
            self._event(result)
            return
        raise StoreError("; ".join(errors))

    def _event(self, result: Any) -> None:
        key = result.key or "/"
        if result.dir:
            # a directory made or removed (etcdctl rm -r): its keys changed under us
            if (key + "/").startswith(self._prefix) or self._prefix.startswith(key + "/"):
                self._deliver([])
            return
        if key.startswith(self._prefix):
            value = None if result.action in _DELETES else result.value
            self._deliver([WatchEvent(key, value)])


class _Cleared(Exception):
    """The wait index fell out of etcd's event history."""


class Etcd2Store(Store):
    """The ``etcd2`` backend: etcd's v2 API at ``endpoints`` (tried in turn).

    v2 has no multi-key transactions: a write's fence is not checked by etcd
    (``fences = False``); the agent relies on its local leadership deadline.
    """

    fences = False

    def __init__(self, endpoints: list[str], timeout: float = 5.0, *, tls: Any = None,
                 username: str | None = None, password: str | None = None) -> None:
        if not endpoints:
            raise StoreError("etcd2: no endpoints configured")
        self.timeout = timeout
        self._tls = TLSSettings(tls, "etcd2")
        self._credentials = (username, password)
        self.round_trips = 0
        self._count_lock = threading.Lock()
        self._urls: list[SplitResult] = []
        self._names: list[str] = []
        for url in endpoints:
            parts, shown = parse_endpoint(url, "etcd2")
            self._urls.append(parts)
            self._names.append(shown)
            if username is None and parts.username:  # credentials written into the URL
                self._credentials = url_credentials(parts)
        self._clients = self._make_clients()
        self._current = 0
        self._read_sizes: dict[str, int] = {}  # directory -> bytes its last prefix read gave
        self._leases: dict[str, Etcd2Lease] = {}  # key -> the lease that last wrote it
        self._leases_lock = threading.Lock()
        self._watches: weakref.WeakSet[Etcd2Watch] = weakref.WeakSet()

    # -- plumbing ---------------------------------------------------------
    def _make_clients(self) -> list[etcd.Client]:
        clients = []
        username, password = self._credentials
        for parts in self._urls:
            host = parts.hostname or ""
            client = etcd.Client(  # python-etcd puts host in URLs as is: bracket IPv6
                host=f"[{host}]" if ":" in host else host, port=parts.port or 2379,
                protocol=parts.scheme,
                read_timeout=self.timeout, allow_reconnect=False,
                username=username, password=password,
            )
            client.http.clear()
            client.http = _Http(self._pool(), self)
            clients.append(client)
        return clients

    def _pool(self) -> urllib3.PoolManager:
        """A urllib3 pool with this store's TLS settings (python-etcd's own cannot skip
        verification or take a key without a cert; its default trusts the system's CAs)."""
        tls = self._tls
        options: dict[str, Any] = {"maxsize": 10}
        if self.timeout > 0:
            options["timeout"] = self.timeout
        if not tls.verify_peer:
            options.update(cert_reqs="CERT_NONE", assert_hostname=False)
        else:
            options["cert_reqs"] = "CERT_REQUIRED"
            if tls.ca:
                options["ca_certs"] = tls.ca
        if tls.cert:
            options["cert_file"] = tls.cert
            if tls.key:
                options["key_file"] = tls.key
        return urllib3.PoolManager(num_pools=10, **options)

    def _order(self) -> list[int]:
        n = len(self._clients)
        return [(self._current + i) % n for i in range(n)]

    def _call(self, fn: Callable[[etcd.Client], T], *, idempotent: bool) -> T:
        """Run ``fn`` against the endpoints in turn.

        A missing key or a failed comparison raises :class:`_Gone`; every other
        library failure becomes StoreError naming the endpoint.
        """
        errors, refused = [], 0
        for index in self._order():
            try:
                result = fn(self._clients[index])
            except (etcd.EtcdKeyNotFound, etcd.EtcdCompareFailed, etcd.EtcdAlreadyExist,
                    etcd.EtcdNotFile) as exc:
                self._current = index
                raise _Gone(exc) from None
            except _FAILURES as exc:
                refusal = _refusal(exc, self._names[index])
                if refusal is not None:
                    errors.append(f"etcd2 {refusal}")
                    refused += 1
                    continue
                error = f"etcd2 {self._names[index]}: {_reason(exc)}"
                if not _transport(exc) or not (idempotent or never_sent(exc)):
                    raise StoreError(error) from None
                errors.append(error)
                continue
            self._current = index
            return result
        kind = StoreRefused if errors and refused == len(errors) else StoreError
        raise kind("; ".join(errors))

    def _index(self, directory: str) -> int:
        """etcd's current index (X-Etcd-Index), read with one request on ``directory``."""
        try:
            return self._call(lambda c: c.read(quote(directory, safe="/")).etcd_index,
                              idempotent=True)
        except _Gone as gone:  # no such directory: the 404 carries the index too
            payload = getattr(gone.args[0], "payload", None) or {}
            if "index" not in payload:
                raise StoreError(f"etcd2: no index in the answer for {directory}") from None
            return int(payload["index"])

    def _lease_write(self, key: str, lease: Lease | None, index: int) -> None:
        """Record which lease (if any) now owns ``key``."""
        with self._leases_lock:
            old = self._leases.pop(key, None)
            if lease is not None:
                self._leases[key] = lease  # type: ignore[assignment]
        if old is not None and old is not lease:
            with old._lock:
                old.keys.pop(key, None)
        if isinstance(lease, Etcd2Lease):
            with lease._lock:
                lease.keys[key] = index

    def _forget(self, key: str, lease: Etcd2Lease | None = None) -> None:
        with self._leases_lock:
            if lease is None or self._leases.get(key) is lease:
                old = self._leases.pop(key, None)
            else:
                old = None
        for owner in {old, lease} - {None}:
            with owner._lock:  # type: ignore[union-attr]
                owner.keys.pop(key, None)  # type: ignore[union-attr]

    @staticmethod
    def _ttl(lease: Lease | None) -> int | None:
        if lease is None:
            return None
        if not isinstance(lease, Etcd2Lease):
            raise TypeError("an etcd2 store takes leases it granted")
        lease.check()
        return lease.seconds

    # -- the contract -----------------------------------------------------
    def get(self, key: str) -> Entry | None:
        """The entry at ``key``, or None (a directory is not an entry)."""
        path = _path(key)
        try:
            result = self._call(lambda c: c.read(path), idempotent=True)
        except _Gone:
            return None
        return None if result.dir else Entry(key, result.value, result.modifiedIndex)

    def get_prefix(self, prefix: str) -> dict[str, Entry]:
        """Every entry under ``prefix``: one recursive read of its directory, filtered."""
        directory = directory_of(prefix)
        # v2 cannot page: the read's timeout grows with what the last read of it returned
        # (the first read of a directory gets FIRST_READ times the timeout)
        size = self._read_sizes.get(directory)
        timeout = (self.timeout * FIRST_READ if size is None
                   else self.timeout + size / READ_RATE) if self.timeout > 0 else None
        try:
            result = self._call(lambda c: c.read(quote(directory, safe="/"), recursive=True,
                                                 timeout=timeout), idempotent=True)
        except _Gone:
            return {}
        entries = {}
        read = 0
        for node in result.leaves:
            if not node.dir and node.key and node.key.startswith(prefix):
                entries[node.key] = Entry(node.key, node.value, node.modifiedIndex)
                read += len(node.key) + len(node.value or "") + 64
        self._read_sizes[directory] = read
        return dict(sorted(entries.items()))

    def put(self, key: str, value: str, *, lease: Lease | None = None,
            fence: Fence | None = None) -> int:
        """Write unconditionally; return the new modifiedIndex."""
        path, ttl = _path(key), self._ttl(lease)
        try:
            result = self._call(lambda c: c.write(path, value, ttl=ttl), idempotent=False)
        except _Gone:  # a directory has that name
            raise StoreError(f"etcd2: {key} is a directory") from None
        self._lease_write(key, lease, result.modifiedIndex)
        return result.modifiedIndex

    def create(self, key: str, value: str, *, lease: Lease | None = None,
               fence: Fence | None = None) -> bool:
        """Write only if ``key`` is absent (``prevExist=false``)."""
        path, ttl = _path(key), self._ttl(lease)
        try:
            result = self._call(lambda c: c.write(path, value, ttl=ttl, prevExist=False),
                                idempotent=False)
        except _Gone:
            return False
        self._lease_write(key, lease, result.modifiedIndex)
        return True

    def replace(self, key: str, value: str, revision: int, *,
                lease: Lease | None = None, fence: Fence | None = None) -> bool:
        """Write only if ``key`` exists at ``revision`` (``prevIndex``)."""
        path, ttl = _path(key), self._ttl(lease)
        if revision <= 0:  # v2 ignores prevIndex=0: it would write unconditionally
            return False
        try:
            result = self._call(lambda c: c.write(path, value, ttl=ttl, prevIndex=revision),
                                idempotent=False)
        except _Gone:
            return False
        self._lease_write(key, lease, result.modifiedIndex)
        return True

    def put_if(self, key: str, value: str, revision: int | None, *,
               fence: Fence | None = None) -> int | None:
        """Write only if ``key`` is at ``revision`` (``prevIndex``; None: ``prevExist=false``);
        the new modifiedIndex."""
        if revision is not None and revision <= 0:
            return None
        path = _path(key)
        condition: dict[str, Any] = ({"prevExist": False} if revision is None
                                     else {"prevIndex": revision})
        try:
            result = self._call(lambda c: c.write(path, value, **condition), idempotent=False)
        except _Gone:
            return None
        self._lease_write(key, None, result.modifiedIndex)
        return result.modifiedIndex

    def delete(self, key: str, revision: int | None = None, *,
               fence: Fence | None = None) -> bool:
        """Delete ``key`` (only at ``revision`` if given, via ``prevIndex``)."""
        if revision is not None and revision <= 0:
            return False
        path = _path(key)
        condition = {} if revision is None else {"prevIndex": revision}
        try:
            self._call(lambda c: c.delete(path, **condition), idempotent=False)
        except _Gone:
            return False
        self._forget(key)
        return True

    def lease(self, ttl: float) -> Lease:
        """A lease of ``ttl`` seconds (rounded up), kept by this process: no request."""
        return Etcd2Lease(self, ttl)

    def watch(self, prefix: str, callback: Callable[[list[WatchEvent]], None]) -> Watch:
        """Watch ``prefix`` from now on, in a background thread (see the module docstring)."""
        watch = Etcd2Watch(self, prefix, callback)
        self._watches.add(watch)
        return watch

    def close(self) -> None:
        """Cancel this store's watches and close its connections."""
        for watch in list(self._watches):
            watch.cancel()
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.http.clear()
