"""What the two etcd backends share: reading endpoint URLs, TLS settings and classifying
failures.

A failure is walked through its whole chain of causes (requests, etcd3gw and
python-etcd wrap urllib3's and ssl's errors in their own, sometimes only as a
string in ``reason``), so that a TLS problem is named as one ("TLS handshake with
https://127.0.0.1:2379: certificate verify failed (self-signed certificate in
certificate chain)") instead of "connection lost", and never escapes as anything
but :class:`StoreError`.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from agent.store.base import StoreError, StoreRefused


def parse_endpoint(url: str, backend: str) -> tuple[SplitResult, str]:
    """The parts of an endpoint URL, and how it may appear in errors: no credentials."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        port = parts.port
    except ValueError:
        raise StoreError(f"{backend}: malformed endpoint URL") from None
    host = parts.hostname or ""
    shown = f"{parts.scheme}://" + (f"[{host}]" if ":" in host else host)
    shown += f":{port}" if port else ""
    if parts.scheme not in ("http", "https") or not host:
        raise StoreError(f"{backend}: not an http(s) endpoint: {shown}")
    return parts, shown


def url_credentials(parts: SplitResult) -> tuple[str | None, str | None]:
    """The user name and password written into an endpoint URL, if any."""
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return user, password


def _chain(exc: BaseException) -> Iterator[Any]:
    """Every error in ``exc``'s chain of causes (and the strings libraries put in them)."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        if not isinstance(err, BaseException):
            continue  # urllib3 keeps some reasons as plain strings (ssl.SSLError's is one)
        todo += [err.__context__, err.__cause__, getattr(err, "reason", None),
                 getattr(err, "cause", None),
                 *[a for a in getattr(err, "args", ()) if isinstance(a, BaseException)]]


def never_sent(exc: BaseException) -> bool:
    """True if the request certainly did not reach a server (so replaying it elsewhere is safe).

    A failed TLS handshake counts: no request is sent before the handshake ends.
    """
    import requests

    for err in _chain(exc):
        if isinstance(err, (NewConnectionError, ConnectTimeoutError, requests.ConnectTimeout,
                            ssl.SSLError)):
            return True
    return False


_PLAINTEXT = ("wrong version number", "record layer failure", "unknown protocol",
              "packet length too long", "http request")
_CLOSED = ("eof occurred in violation of protocol", "unexpected eof", "unexpected_eof")
_CLIENT_CERT = ("certificate required", "bad certificate", "alert handshake failure",
                "unknown ca", "certificate expired", "certificate unknown", "access denied")
_NOISE = re.compile(r"\s*\(_ssl\.c:\d+\)|\[[a-z0-9_: ]+\]\s*|['\")]+$")


def _clean(text: str) -> str:
    return _NOISE.sub("", text).strip(" :(")[:160]


def tls_problem(exc: BaseException, shown: str, timeout: float = 2.0) -> str | None:
    """A description of the TLS problem behind ``exc``, or None if it is not one.

    When the server just closed the connection during the handshake, a second,
    plaintext connection asks it ``GET /version`` to tell "this is no TLS server" from
    "it did not accept our client certificate" (nothing else is sent, nothing falls back).
    """
    for err in _chain(exc):
        if isinstance(err, ssl.SSLCertVerificationError):
            detail = _clean(err.verify_message or err.reason or "")
            return f"TLS handshake with {shown}: certificate verify failed ({detail})"
        text = err.lower() if isinstance(err, str) else (
            str(err).lower() if isinstance(err, (ssl.SSLError, OSError)) else "")
        if not text:
            continue
        if "certificate verify failed" in text:
            detail = _clean(text.split("certificate verify failed", 1)[1])
            return (f"TLS handshake with {shown}: certificate verify failed"
                    + (f" ({detail})" if detail else ""))
        if any(marker in text for marker in _PLAINTEXT) and (
                "ssl" in text or "tls" in text or isinstance(err, ssl.SSLError)):
            return f"{shown}: https:// endpoint answered in plaintext (is it an http:// one?)"
        if any(marker in text for marker in _CLIENT_CERT):
            alert = re.search(r"(?:sslv3|tlsv1\d*) alert [a-z ]+", text)
            return (f"TLS handshake with {shown}: the server refused our client certificate "
                    f"or requires one ({alert.group(0).strip() if alert else _clean(text)})")
        if any(marker in text for marker in _CLOSED):
            if _answers_plaintext(shown, timeout):
                return f"{shown}: https:// endpoint answered in plaintext (is it an http:// one?)"
            return (f"TLS handshake with {shown}: the server closed the connection: it "
                    "requires a client certificate signed by a CA it trusts (tls.cert, "
                    "tls.key), or refused ours (expired, or from another CA)")
        if "key values mismatch" in text:
            return f"TLS with {shown}: tls.cert and tls.key do not match (key values mismatch)"
        if isinstance(err, ssl.SSLError):
            return f"TLS handshake with {shown}: {_clean(text)}"
    return None


def _address(shown: str) -> tuple[str, int] | None:
    parts = urlsplit(shown)
    try:
        port = parts.port or 2379
    except ValueError:
        return None
    return (parts.hostname or "", port) if parts.hostname else None


def _answers_plaintext(shown: str, timeout: float) -> bool:
    """True if ``shown``'s server answers a plaintext HTTP request."""
    address = _address(shown)
    if address is None:
        return False
    try:
        with socket.create_connection(address, timeout=timeout) as conn:
            conn.sendall(b"GET /version HTTP/1.0\r\nHost: etcd\r\n\r\n")
            return conn.recv(16).startswith(b"HTTP/")
    except OSError:
        return False


def _speaks_tls(shown: str, timeout: float) -> bool:
    """True if ``shown``'s server completes a TLS handshake (certificate not checked: this
    only names the problem, nothing is sent over it)."""
    address = _address(shown)
    if address is None:
        return False
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection(address, timeout=timeout) as conn, \
                context.wrap_socket(conn, server_hostname=address[0]):
            return True
    except ssl.SSLError as exc:  # it speaks TLS but wants more (a client certificate)
        return "alert" in str(exc).lower()
    except OSError:
        return False


def plaintext_mixup(exc: BaseException, shown: str, timeout: float = 2.0) -> str | None:
    """For an endpoint whose connection was dropped: the message if an ``http://`` one
    really speaks TLS, or an ``https://`` one plaintext; else None."""
    if any(isinstance(err, ConnectionRefusedError) for err in _chain(exc)):
        return None
    dropped = any(isinstance(err, (ConnectionError, http.client.HTTPException))
                  or "connection aborted" in str(err).lower()
                  for err in _chain(exc))
    if not dropped:
        return None
    if shown.startswith("http://") and _speaks_tls(shown, timeout):
        return f"{shown}: this endpoint speaks TLS: use https:// (and agent.store.tls)"
    if shown.startswith("https://") and _answers_plaintext(shown, timeout):
        return f"{shown}: https:// endpoint answered in plaintext (is it an http:// one?)"
    return None


TLS_EXPECTED = "client sent an http request to an https server"


def plaintext_to_tls(body: str | bytes | None, shown: str) -> str | None:
    """The message for an ``http://`` endpoint that is really a TLS one, judged by its answer."""
    if body is None:
        return None
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    if TLS_EXPECTED in text.lower():
        return f"{shown}: this endpoint speaks TLS: use https:// (and agent.store.tls)"
    return None


class TLSSettings:
    """TLS files for a client, checked to be readable: ``verify`` (True, False or a CA
    bundle path, as requests takes it) and ``cert`` (None, or (cert, key) / a combined file)."""

    def __init__(self, tls: Any, backend: str) -> None:
        self.ca = _readable(getattr(tls, "ca", None), "tls.ca", backend)
        self.cert = _readable(getattr(tls, "cert", None), "tls.cert", backend)
        self.key = _readable(getattr(tls, "key", None), "tls.key", backend)
        self.verify_peer: bool = bool(getattr(tls, "verify", True))

    @property
    def verify(self) -> bool | str:
        """What requests' ``verify`` takes."""
        if not self.verify_peer:
            return False
        return self.ca or True

    @property
    def client_cert(self) -> str | tuple[str, str] | None:
        """What requests' ``cert`` takes."""
        if self.cert is None:
            return None
        return (self.cert, self.key) if self.key else self.cert


def _readable(path: Any, name: str, backend: str) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise StoreRefused(f"{backend}: {name} {path}: cannot read: "
                           f"{exc.strerror or exc}") from None
    return str(path)
