"""The ``etcd`` backend: etcd's v3 API through its grpc-gateway (JSON over HTTP), with etcd3gw.

Keys and values travel base64-encoded as UTF-8 bytes (etcd3gw's own string
encoding is latin-1, which would not match what ``etcdctl`` writes, so this
module hands it bytes). Compare-and-set operations are real etcd transactions:
``create`` compares ``create_revision == 0``, ``replace`` and ``delete`` compare
``mod_revision``. Leases are etcd leases; ``refresh`` is one keep-alive.

A prefix read is paged: ranges of ``page_size`` keys (etcd's ``limit``), each
continuing after the last key read, all at the revision of the first page (so the
whole read is one consistent snapshot, as if it were one request). Each page's
timeout grows with the size of the page before it, so a read of 50 MB never
times out for being large, only for a store that stopped answering.

Endpoints are tried in turn: reads, lease keep-alives and any request that never
reached a server move on to the next endpoint; a write whose fate is unknown
raises :class:`StoreError` instead of being retried elsewhere (a replayed
``create`` would report a lost race it actually won).

A watch is one long-lived streaming ``POST /v3/watch`` read in a daemon thread.
etcd3gw's own ``Watcher`` hides stream failures, so the stream is read here: it
resumes from the next revision after an idle timeout, and after any failure it
reconnects with a backoff and calls the callback with ``[]`` (re-read state),
also when history was compacted or the store went backwards (a new data dir).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import (
    ConnectionFailedError,
    ConnectionTimeoutError,
    Etcd3Exception,
    InternalServerError,
    PreconditionFailedError,
)
from etcd3gw.lease import Lease as GwLease
from urllib3.exceptions import ReadTimeoutError

from agent.store.base import (
    Entry,
    Fence,
    Lease,
    NotLeading,
    Store,
    StoreError,
    Watch,
    WatchEvent,
)
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

API_PATH = "/v3/"  # etcd >= 3.4; saves etcd3gw a /version request per endpoint
WATCH_IDLE = 60.0  # seconds without a message before a watch re-opens its stream
PAGE_SIZE = 1000  # keys per range request of a prefix read (etcd's ``limit``)
TXN_KEYS = 100  # keys per transaction of create_many (etcd's --max-txn-ops is 128 by default)
READ_RATE = 1_000_000  # bytes a second a page's timeout allows beyond the base timeout
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0

# Errors that mean "no answer from this endpoint" (as opposed to etcd answering with an error).
_TRANSPORT = (ConnectionFailedError, ConnectionTimeoutError, requests.ConnectionError,
              requests.Timeout)
# etcd3gw's own mapping of HTTP statuses to its exceptions (as its ``post`` raises them)
_BY_CODE = {500: InternalServerError, 503: ConnectionFailedError, 408: ConnectionTimeoutError,
            504: ConnectionTimeoutError, 412: PreconditionFailedError}
_FAILURES = (Etcd3Exception, requests.RequestException, ValueError, KeyError)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")


def _b64_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: str | None) -> str:
    return base64.b64decode(data or "").decode("utf-8", "surrogateescape")


def range_end(prefix: str) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's prefix range end)."""
    raw = bytearray(prefix.encode("utf-8", "surrogateescape"))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # every key
    raw[-1] += 1
    return bytes(raw)


def _refusal(exc: BaseException, shown: str) -> str | None:
    """The message for a failure that retrying will not cure (TLS, plaintext mix-ups)."""
    if isinstance(exc, StoreRefused):
        return str(exc)
    problem = tls_problem(exc, shown)
    if problem is None and isinstance(exc, _TRANSPORT):
        problem = plaintext_mixup(exc, shown)
    if problem is None and isinstance(exc, Etcd3Exception):
        problem = plaintext_to_tls(exc.detail_text, shown)
        message = _etcd_message(exc.detail_text)
        if "user name is empty" in message:
            problem = (f"{shown}: etcd requires authentication: set agent.store.username "
                       "and password")
        elif "permission denied" in message:
            problem = f"{shown}: etcd refused: {message} (the user's role lacks this key range)"
    return problem


def _reason(exc: BaseException) -> str:
    """A short, secret-free description of a failure."""
    if isinstance(exc, (ConnectionTimeoutError, requests.Timeout)):
        return "timed out"
    if isinstance(exc, (ConnectionFailedError, requests.ConnectionError)):
        if isinstance(exc, ConnectionFailedError) and exc.args:  # etcd answered 503
            return f"unavailable: {_etcd_message(exc.detail_text)}"
        return "cannot connect" if never_sent(exc) else "connection lost"
    if isinstance(exc, Etcd3Exception):
        status = " ".join(str(a) for a in exc.args)
        return f"{status or 'error'}: {_etcd_message(exc.detail_text)}".strip()
    if isinstance(exc, requests.RequestException):
        return "connection lost"  # e.g. a stream cut mid-chunk
    if isinstance(exc, ValueError):
        return "malformed response"
    return type(exc).__name__


def _etcd_message(text: str | None) -> str:
    try:
        body = json.loads(text or "")
        return str(body.get("message") or body.get("error") or "")[:200]
    except (ValueError, AttributeError):
        return (text or "")[:200]


_TOKEN_REJECTED = ("invalid auth token", "user name is empty", "auth token")


class _Auth:
    """etcd v3 authentication as its gateway expects it: ``POST /v3/auth/authenticate`` with
    the name and password gives a token, sent as the ``Authorization`` header of every
    request; a token etcd no longer accepts (it expires, 5 minutes by default) is renewed
    once and the request sent again (a rejected request did nothing)."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self._password = username, password
        self.token: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<etcd auth for {self.username}>"

    def login(self, session: _CountingSession, url: str, stale: str | None = None) -> str:
        with self._lock:
            if self.token is not None and self.token != stale:
                return self.token  # another thread renewed it meanwhile
            base = url[: url.index(API_PATH) + len(API_PATH)] if API_PATH in url else url
            reply = session.send_raw("POST", base + "auth/authenticate",
                                     json={"name": self.username, "password": self._password})
            if reply.status_code != 200:
                shown = session.shown(url)
                raise StoreRefused(f"etcd {shown}: authentication as {self.username!r} "
                                   f"failed: {_etcd_message(reply.text) or reply.status_code}")
            token = reply.json().get("token")
            if not token:
                raise StoreRefused(f"etcd {session.shown(url)}: authentication gave no token")
            self.token = str(token)
            return self.token


def _token_rejected(response: requests.Response) -> bool:
    if response.status_code in (200, 404):
        return False
    try:
        text = response.text.lower()
    except Exception:  # noqa: BLE001 - a broken body is the caller's error to report
        return False
    return any(marker in text for marker in _TOKEN_REJECTED)


class _CountingSession(requests.Session):
    """A requests session that counts every HTTP request it sends in its store's round_trips,
    with the store's TLS settings and its authentication token."""

    def __init__(self, store: Etcd3Store) -> None:
        super().__init__()
        self.trust_env = False  # loopback etcd must never go through an http_proxy
        self._store = weakref.ref(store)
        self.verify = store._tls.verify
        self.cert = store._tls.client_cert
        self._auth = store._auth

    def shown(self, url: str) -> str:
        try:
            return parse_endpoint(url, "etcd")[1]
        except StoreError:
            return "etcd"

    def send_raw(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        store = self._store()
        if store is not None:
            with store._count_lock:
                store.round_trips += 1
            kwargs.setdefault("timeout", store.timeout)
        return super().request(method, url, **kwargs)

    def request(self, method: str, url: str, *args: Any,  # type: ignore[override]
                **kwargs: Any) -> requests.Response:
        auth = self._auth
        if auth is None:
            return self.send_raw(method, url, *args, **kwargs)
        headers = dict(kwargs.pop("headers", None) or {})
        token = auth.token or auth.login(self, url)
        headers["Authorization"] = token
        response = self.send_raw(method, url, *args, headers=headers, **kwargs)
        if _token_rejected(response):
            response.close()
            headers["Authorization"] = auth.login(self, url, stale=token)
            response = self.send_raw(method, url, *args, headers=headers, **kwargs)
        return response


class Etcd3Lease(Lease):
    """An etcd v3 lease; ``refresh`` sends one keep-alive."""

    def __init__(self, store: Etcd3Store, lease_id: int, ttl: float) -> None:
        self.store, self.id, self.ttl = store, lease_id, ttl

    def refresh(self) -> None:
        """Keep the lease alive for another ttl; StoreError if it already expired."""
        ttl = self.store._call(lambda c: GwLease(self.id, c).refresh(), idempotent=True)
        if ttl <= 0:
            raise StoreError(f"lease {self.id:x} has expired")

    def revoke(self) -> None:
        """Revoke the lease (its keys are deleted); a lease that already expired is fine."""
        try:
            self.store._call(lambda c: GwLease(self.id, c).revoke(), idempotent=True)
        except StoreError as exc:
            if "lease not found" not in str(exc):
                raise


class Etcd3Watch(Watch):
    """A prefix watch: a streaming ``/v3/watch`` request read by a daemon thread."""

    def __init__(self, store: Etcd3Store, prefix: str,
                 callback: Callable[[list[WatchEvent]], None]) -> None:
        self._store, self._prefix, self._callback = store, prefix, callback
        self._stop = threading.Event()
        self._response: requests.Response | None = None
        self._session = _CountingSession(store)
        self._healthy = False  # the current stream was accepted by etcd
        try:  # pin the start now, so every change after watch() returns is seen
            self._next: int | None = store._head() + 1
            self._resync = False
        except StoreError:  # etcd is down: the thread connects later, then signals a re-read
            self._next, self._resync = None, True
        self._thread = threading.Thread(target=self._run, name=f"etcd3-watch {prefix}",
                                        daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop the thread and close its stream; the callback is not called afterwards."""
        self._stop.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):  # already closed or released
                response.raw.shutdown()  # unblocks the reading thread at once
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    # -- the thread -------------------------------------------------------
    def _deliver(self, events: list[WatchEvent]) -> None:
        if self._stop.is_set():
            return
        try:
            self._callback(events)
        except Exception:
            log.exception("etcd watch callback for %s failed", self._prefix)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._connect()
                continue  # an idle stream timed out: reopen where it stopped, nothing was lost
            except _Resync:  # history compacted: start over from the head, after a re-read
                self._next = None
            except StoreError as exc:
                log.debug("etcd watch on %s: %s", self._prefix, exc)
            except Exception:  # never let the thread die
                log.exception("etcd watch on %s failed", self._prefix)
            self._resync = True
            if self._healthy:
                failures, self._healthy = 0, False
            failures += 1  # never spin: every reconnect after a failure waits
            self._stop.wait(min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures - 1, 8)))
        self._session.close()

    def _connect(self) -> None:
        """Open a stream on the first endpoint that takes it and read it; return on idle timeout."""
        head = self._store._head()
        if self._next is None or head < self._next - 1:  # first contact, or a store gone backwards
            self._next, self._resync = head + 1, True
        errors = []
        for index in self._store._order():
            if self._stop.is_set():
                return
            try:
                self._stream(index)
                return
            except _ReadIdle:
                return
            except StoreRefused as exc:
                errors.append(str(exc))
            except _FAILURES as exc:
                shown = self._store._names[index]
                refusal = _refusal(exc, shown)
                errors.append(f"etcd {refusal}" if refusal else f"etcd {shown}: {_reason(exc)}")
        raise StoreError("; ".join(errors) or "cancelled")

    def _stream(self, index: int) -> None:
        """Read one watch stream from endpoint ``index``; raise when it fails or ends."""
        client = self._store._clients[index]
        request = {"create_request": {
            "key": _b64(self._prefix or "\0"), "range_end": _b64_bytes(range_end(self._prefix)),
            "start_revision": self._next,
        }}
        response = self._session.post(client.get_url("/watch"), json=request, stream=True,
                                      timeout=(self._store.timeout, WATCH_IDLE))
        self._response = response
        try:
            if self._stop.is_set():
                return
            if response.status_code != 200:
                raise Etcd3Exception(response.text, response.reason)
            buffer = b""
            for chunk in response.iter_content(chunk_size=None):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._message(json.loads(line))
        except requests.ConnectionError as exc:
            if _is_read_timeout(exc) and not self._stop.is_set():
                raise _ReadIdle() from None
            raise
        finally:
            self._response = None
            response.close()
        if not self._stop.is_set():
            raise requests.ConnectionError("the watch stream ended")

    def _message(self, message: dict[str, Any]) -> None:
        if "error" in message:
            raise Etcd3Exception(json.dumps(message["error"]), "watch error")
        result = message.get("result", {})
        if result.get("canceled") or int(result.get("compact_revision", 0)):
            raise _Resync()  # compacted (or cancelled by etcd)
        if result.get("created"):
            self._healthy = True
            if self._resync:
                self._resync = False
                self._deliver([])
            return
        batch = []
        for event in result.get("events") or []:  # none: a progress notification
            kv = event.get("kv", {})
            value = None if event.get("type") == "DELETE" else _unb64(kv.get("value"))
            batch.append(WatchEvent(_unb64(kv.get("key")), value))
            self._next = max(self._next or 0, int(kv.get("mod_revision", 0)) + 1)
        if batch:
            self._deliver(batch)


def _range(client: Etcd3Client, payload: dict[str, Any], timeout: float
           ) -> tuple[dict[str, Any], int]:
    """One ``/kv/range`` request with its own timeout (etcd3gw's ``post`` takes the client's);
    the reply and its size in bytes. Errors are raised as etcd3gw's ``post`` raises them."""
    try:
        response = client.session.post(client.get_url("/kv/range"), json=payload,
                                       timeout=timeout)
    except requests.exceptions.Timeout as exc:
        raise ConnectionTimeoutError(str(exc)) from None
    except requests.exceptions.ConnectionError as exc:
        raise ConnectionFailedError(str(exc)) from None
    if response.status_code in _BY_CODE:
        raise _BY_CODE[response.status_code](response.text, response.reason)
    if response.status_code != requests.codes["ok"]:
        raise Etcd3Exception(response.text, response.reason)
    return response.json(), len(response.content)


class _Resync(Exception):
    """The watch lost history: re-read everything and start over from the head."""


class _ReadIdle(Exception):
    """No message within WATCH_IDLE: reopen the stream where it stopped."""


def _is_read_timeout(exc: BaseException) -> bool:
    return any(isinstance(a, ReadTimeoutError) for a in exc.args) or isinstance(
        exc.__context__, ReadTimeoutError)


class Etcd3Store(Store):
    """The ``etcd`` backend: etcd's v3 API over HTTP at ``endpoints`` (tried in turn)."""

    def __init__(self, endpoints: list[str], timeout: float = 5.0, *, tls: Any = None,
                 username: str | None = None, password: str | None = None,
                 page_size: int = PAGE_SIZE) -> None:
        if not endpoints:
            raise StoreError("etcd: no endpoints configured")
        self.timeout = timeout
        self.page_size = max(1, page_size)
        "keys per range request of :meth:`get_prefix` (a larger prefix takes several pages)"
        self.round_trips = 0
        self._count_lock = threading.Lock()
        self._tls = TLSSettings(tls, "etcd")
        self._names: list[str] = []
        self._clients: list[Etcd3Client] = []
        parsed = [parse_endpoint(url, "etcd") for url in endpoints]
        if username is None:  # credentials written into an endpoint URL
            username, password = next(
                (url_credentials(p) for p, _ in parsed if p.username), (None, None))
        self._auth = _Auth(username, password or "") if username else None
        for parts, shown in parsed:
            self._names.append(shown)
            self._clients.append(Etcd3Client(
                host=parts.hostname, port=parts.port or 2379, protocol=parts.scheme,
                timeout=timeout, api_path=API_PATH, session=_CountingSession(self)))
        self._current = 0
        self._watches: weakref.WeakSet[Etcd3Watch] = weakref.WeakSet()

    # -- plumbing ---------------------------------------------------------
    def _order(self) -> list[int]:
        n = len(self._clients)
        return [(self._current + i) % n for i in range(n)]

    def _call(self, fn: Callable[[Etcd3Client], T], *, idempotent: bool) -> T:
        """Run ``fn`` against the endpoints in turn; every library failure becomes StoreError."""
        errors, refused = [], 0
        for index in self._order():
            try:
                result = fn(self._clients[index])
            except StoreRefused as exc:  # authentication failed: the next endpoint may differ
                errors.append(str(exc))
                refused += 1
                continue
            except _FAILURES as exc:
                refusal = _refusal(exc, self._names[index])
                if refusal is not None:  # TLS: no request reached etcd
                    errors.append(f"etcd {refusal}")
                    refused += 1
                    continue
                error = f"etcd {self._names[index]}: {_reason(exc)}"
                if not isinstance(exc, _TRANSPORT) or not (idempotent or never_sent(exc)):
                    raise StoreError(error) from None
                errors.append(error)
                continue
            self._current = index
            return result
        kind = StoreRefused if refused == len(errors) else StoreError
        raise kind("; ".join(errors))

    def _post(self, path: str, payload: dict[str, Any], *, idempotent: bool) -> dict[str, Any]:
        return self._call(lambda c: c.post(c.get_url(path), json=payload), idempotent=idempotent)

    def _head(self) -> int:
        """The store's current revision (one small range request)."""
        reply = self._post("/kv/range", {"key": _b64("\0"), "count_only": True, "limit": 1},
                           idempotent=True)
        return int(reply["header"]["revision"])

    @staticmethod
    def _entry(kv: dict[str, Any]) -> Entry:
        return Entry(_unb64(kv["key"]), _unb64(kv.get("value")), int(kv["mod_revision"]))

    @staticmethod
    def _lease_id(lease: Lease | None) -> dict[str, Any]:
        return {} if lease is None else {"lease": lease.id}  # type: ignore[attr-defined]

    def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
             fence: Fence | None = None) -> bool:
        return bool(self._txn_reply(compare, success, fence).get("succeeded"))

    def _txn_reply(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                   fence: Fence | None = None) -> dict[str, Any]:
        """One transaction; with a fence, also compare the fence key's lease, and tell a
        refused fence (NotLeading) from a lost compare-and-set (not succeeded)."""
        failure: list[dict[str, Any]] = []
        if fence is not None:
            k = _b64(fence.key)
            compare = [*compare, {"key": k, "target": "LEASE", "result": "EQUAL",
                                  "lease": str(fence.lease.id)}]  # type: ignore[attr-defined]
            failure = [{"request_range": {"key": k}}]
        txn = {"compare": compare, "success": success, "failure": failure}
        reply = self._call(lambda c: c.transaction(txn), idempotent=False)
        if fence is not None and not reply.get("succeeded"):
            responses = reply.get("responses") or [{}]
            kvs = (responses[0].get("response_range") or {}).get("kvs") or []
            held = kvs and int(kvs[0].get("lease", 0)) == fence.lease.id  # type: ignore
            if not held:
                raise NotLeading(f"{fence.key} is no longer held by this agent: write refused")
        return reply

    # -- the contract -----------------------------------------------------
    def get(self, key: str) -> Entry | None:
        """The entry at ``key``, or None."""
        reply = self._post("/kv/range", {"key": _b64(key)}, idempotent=True)
        kvs = reply.get("kvs") or []
        return self._entry(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> dict[str, Entry]:
        """Every entry under ``prefix``: pages of ``page_size`` keys, all read at the
        revision of the first page (one consistent snapshot)."""
        out: dict[str, Entry] = {}
        for kv in self._pages(prefix, keys_only=False):
            entry = self._entry(kv)
            out[entry.key] = entry
        return out

    def get_revisions(self, prefix: str) -> dict[str, int]:
        """Keys and revisions only (``keys_only``: no value is sent), paged as above."""
        return {_unb64(kv["key"]): int(kv["mod_revision"])
                for kv in self._pages(prefix, keys_only=True)}

    def _pages(self, prefix: str, *, keys_only: bool) -> Iterator[dict[str, Any]]:
        end = _b64_bytes(range_end(prefix))
        payload: dict[str, Any] = {"key": _b64(prefix or "\0"), "range_end": end,
                                   "limit": self.page_size}
        if keys_only:
            payload["keys_only"] = True
        timeout = self.timeout
        while True:
            reply, size = self._call(lambda c, p=payload, t=timeout: _range(c, p, t),
                                     idempotent=True)
            kvs = reply.get("kvs") or []
            yield from kvs
            if not reply.get("more") or not kvs:
                return
            # the next page: after the last key, at the first page's revision
            last = base64.b64decode(kvs[-1]["key"])
            payload = {**payload, "key": _b64_bytes(last + b"\0"),
                       "revision": payload.get("revision") or int(reply["header"]["revision"])}
            timeout = self.timeout + size / READ_RATE  # a large page: the next may be too

    def put(self, key: str, value: str, *, lease: Lease | None = None,
            fence: Fence | None = None) -> int:
        """Write unconditionally (but for the fence); return the new revision."""
        payload = {"key": _b64(key), "value": _b64(value), **self._lease_id(lease)}
        if fence is not None:
            reply = self._txn_reply([], [{"request_put": payload}], fence)
            return int(reply["header"]["revision"])
        reply = self._post("/kv/put", payload, idempotent=False)
        return int(reply["header"]["revision"])

    def create(self, key: str, value: str, *, lease: Lease | None = None,
               fence: Fence | None = None) -> bool:
        """Write only if ``key`` is absent (a transaction on create_revision == 0)."""
        k = _b64(key)
        return self._txn(
            [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
            [{"request_put": {"key": k, "value": _b64(value), **self._lease_id(lease)}}],
            fence,
        )

    def create_many(self, items: dict[str, str], *, fence: Fence | None = None) -> set[str]:
        """Create each absent key of ``items``: transactions of :data:`TXN_KEYS` keys, each
        comparing every key's create_revision to 0. A batch where some key exists is
        read (one request) and sent again without the keys that exist."""
        created: set[str] = set()
        pairs = list(items.items())
        for start in range(0, len(pairs), TXN_KEYS):
            batch = pairs[start:start + TXN_KEYS]
            for _ in range(5):  # a key created meanwhile by another writer: read again
                if not batch:
                    break
                compare = [{"key": _b64(k), "target": "CREATE", "result": "EQUAL",
                            "create_revision": 0} for k, _ in batch]
                success = [{"request_put": {"key": _b64(k), "value": _b64(v)}}
                           for k, v in batch]
                if self._txn(compare, success, fence):
                    created |= {k for k, _ in batch}
                    break
                there = self._existing([k for k, _ in batch])
                batch = [(k, v) for k, v in batch if k not in there]
            else:
                created |= {k for k, v in batch if self.create(k, v, fence=fence)}
        return created

    def _existing(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` exist (one transaction of reads)."""
        reads = [{"request_range": {"key": _b64(k), "keys_only": True}} for k in keys]
        reply = self._call(lambda c: c.transaction({"compare": [], "success": reads,
                                                    "failure": []}), idempotent=True)
        responses = reply.get("responses") or []
        return {k for k, r in zip(keys, responses, strict=False)
                if (r.get("response_range") or {}).get("kvs")}

    def replace(self, key: str, value: str, revision: int, *,
                lease: Lease | None = None, fence: Fence | None = None) -> bool:
        """Write only if ``key`` exists at ``revision`` (a transaction on mod_revision)."""
        if revision <= 0:
            return False
        k = _b64(key)
        return self._txn(
            [{"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": revision}],
            [{"request_put": {"key": k, "value": _b64(value), **self._lease_id(lease)}}],
            fence,
        )

    def put_if(self, key: str, value: str, revision: int | None, *,
               fence: Fence | None = None) -> int | None:
        """Write only if ``key`` is at ``revision`` (None: absent); one transaction whose
        header carries the new revision."""
        written = self.put_all_if([(key, value, revision)], fence=fence)
        return written[0] if written else None

    def put_all_if(self, writes: list[tuple[str, str, int | None]], *,
                   fence: Fence | None = None) -> list[int] | None:
        """Every write in one transaction (etcd's ``--max-txn-ops``, 128 by default, bounds
        how many); they all get the transaction's revision."""
        if any(revision is not None and revision <= 0 for _, _, revision in writes):
            return None
        compare, success = [], []
        for key, value, revision in writes:
            k = _b64(key)
            compare.append(
                {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": 0}
                if revision is None else
                {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": revision})
            success.append({"request_put": {"key": k, "value": _b64(value)}})
        reply = self._txn_reply(compare, success, fence)
        if not reply.get("succeeded"):
            return None
        return [int(reply["header"]["revision"])] * len(writes)

    def delete(self, key: str, revision: int | None = None, *,
               fence: Fence | None = None) -> bool:
        """Delete ``key`` (only at ``revision`` if given); False if absent or changed."""
        k = _b64(key)
        if revision is None and fence is None:
            reply = self._post("/kv/deleterange", {"key": k}, idempotent=False)
            return int(reply.get("deleted", 0)) > 0
        if revision is not None and revision <= 0:
            return False
        compare = [] if revision is None else [
            {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": revision}]
        reply = self._txn_reply(compare, [{"request_delete_range": {"key": k}}], fence)
        if not reply.get("succeeded"):
            return False
        responses = reply.get("responses") or [{}]
        return int((responses[0].get("response_delete_range") or {}).get("deleted", 0)) > 0

    def lease_left(self, key: str) -> float | None:
        """Seconds left on the lease ``key`` is written on (one range, one time-to-live)."""
        reply = self._post("/kv/range", {"key": _b64(key)}, idempotent=True)
        kvs = reply.get("kvs") or []
        lease_id = int(kvs[0].get("lease", 0)) if kvs else 0
        if not lease_id:
            return None
        ttl = self._post("/lease/timetolive", {"ID": str(lease_id)}, idempotent=True)
        left = int(ttl.get("TTL", -1))
        return float(left) if left >= 0 else None

    def lease(self, ttl: float) -> Lease:
        """Grant an etcd lease of ``ttl`` seconds (rounded up; etcd may enforce a minimum)."""
        seconds = max(1, math.ceil(ttl))
        # a replayed grant only leaks an empty lease, which expires by itself
        granted = self._call(lambda c: c.lease(seconds), idempotent=True)
        return Etcd3Lease(self, granted.id, float(seconds))

    def watch(self, prefix: str, callback: Callable[[list[WatchEvent]], None]) -> Watch:
        """Watch ``prefix`` from now on, in a background thread (see the module docstring)."""
        watch = Etcd3Watch(self, prefix, callback)
        self._watches.add(watch)
        return watch

    def close(self) -> None:
        """Cancel this store's watches and close its connections."""
        for watch in list(self._watches):
            watch.cancel()
        for client in self._clients:
            client.session.close()
