"""Fault injection for the leadership tests: a pausable, resettable HTTP proxy on loopback.

Each agent under test reaches etcd and the Docker engine through its own
:class:`Proxy`, so every request is attributed to the agent that sent it. The
proxy forwards bytes untouched and, on the side, parses the HTTP/1.1 requests
(and, for non-streaming answers, the responses) it carries, recording each as
a :class:`Seen`: when it was sent, method, path, and for etcd writes whether it
changed the store (``put``; ``txn`` that succeeded; ``deleterange`` that
deleted) and at which revision.

Faults: :meth:`Proxy.pause` stops forwarding in both directions while keeping
connections open (a silent partition: the agent's requests hang until their
timeouts); :meth:`Proxy.resume` heals it; :meth:`Proxy.reset` closes every
connection with a TCP reset. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass

ETCD_WRITES = ("/v3/kv/put", "/v3/kv/txn", "/v3/kv/deleterange")
DOCKER_ACTIONS = ("/create", "/start", "/stop", "/kill", "/restart")


@dataclass
class Seen:
    """One request through a proxy."""

    at: float  # time.monotonic() when its first byte was forwarded
    method: str
    path: str
    status: int | None = None
    wrote: bool = False  # an etcd write that changed the store
    revision: int | None = None

    @property
    def docker_action(self) -> bool:
        """A request that starts, stops or removes a container."""
        path = self.path.split("?")[0]
        return (self.method == "POST" and path.endswith(DOCKER_ACTIONS)) or (
            self.method == "DELETE" and "/containers/" in path)


class _Parser:
    """Incremental HTTP/1.1 message parser over one direction of a connection."""

    def __init__(self, on_message) -> None:
        self.buf = b""
        self.on_message = on_message
        self.streaming = False  # a chunked (watch) or unknown-length body: stop parsing

    def feed(self, data: bytes) -> None:
        if self.streaming:
            return
        self.buf += data
        while not self.streaming:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                size = int(headers["content-length"])
            elif head[0].startswith("HTTP/") and headers.get("transfer-encoding") == "chunked":
                self.streaming = True
                self.on_message(head[0], b"")
                return
            else:
                size = 0
            if len(self.buf) < head_end + 4 + size:
                return
            body = self.buf[head_end + 4:head_end + 4 + size]
            self.buf = self.buf[head_end + 4 + size:]
            self.on_message(head[0], body)


class Proxy:
    """A TCP proxy from 127.0.0.1:``port`` to ``target`` ((host, port) or a unix socket path)."""

    def __init__(self, target: tuple[str, int] | str) -> None:
        self.target = target
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._conns: list[socket.socket] = []
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -------------------------------------------------------------- faults
    def pause(self) -> None:
        """Stop forwarding (connections stay open, bytes wait)."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def reset(self) -> None:
        """Close every connection with a TCP reset."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        with contextlib.suppress(OSError):
            self._server.close()
        self.reset()

    # -------------------------------------------------------------- records
    def writes(self, after: float = 0.0) -> list[Seen]:
        """etcd writes that changed the store, sent after ``after`` (monotonic)."""
        with self._lock:
            return [s for s in self.seen if s.wrote and s.at > after]

    def docker_actions(self, after: float = 0.0) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.docker_action and s.at > after]

    # -------------------------------------------------------------- pumping
    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
        else:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        return upstream

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = self._connect()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            pending: list[Seen] = []
            requests = _Parser(lambda line, body, p=pending: self._request(line, body, p))
            responses = _Parser(lambda line, body, p=pending: self._response(line, body, p))
            for src, dst, parser in ((client, upstream, requests), (upstream, client, responses)):
                threading.Thread(target=self._pump, args=(src, dst, parser), daemon=True,
                                 name="proxy-pump").start()

    def _request(self, line: str, body: bytes, pending: list[Seen]) -> None:
        method, _, rest = line.partition(" ")
        seen = Seen(time.monotonic(), method, rest.rsplit(" ", 1)[0])
        with self._lock:
            self.seen.append(seen)
            pending.append(seen)

    def _response(self, line: str, body: bytes, pending: list[Seen]) -> None:
        with self._lock:
            if not pending:
                return
            seen = pending.pop(0)
        parts = line.split(" ")
        seen.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        if seen.path not in ETCD_WRITES or seen.status != 200:
            return
        try:
            reply = json.loads(body or b"{}")
        except ValueError:
            return
        changed = {"/v3/kv/put": True, "/v3/kv/txn": bool(reply.get("succeeded")),
                   "/v3/kv/deleterange": int(reply.get("deleted", 0) or 0) > 0}[seen.path]
        if changed:
            seen.wrote = True
            seen.revision = int((reply.get("header") or {}).get("revision", 0))

    def _pump(self, src: socket.socket, dst: socket.socket, parser: _Parser) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._open.wait()
                if self._closed:
                    break
                parser.feed(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class Proxies:
    """One proxy per endpoint of a cluster, faulted together (an agent cut off from all)."""

    def __init__(self, ports: list[int]) -> None:
        self.proxies = [Proxy(("127.0.0.1", port)) for port in ports]

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.proxies]

    @property
    def seen(self) -> list[Seen]:
        return sorted((s for p in self.proxies for s in p.seen), key=lambda s: s.at)

    def writes(self, after: float = 0.0) -> list[Seen]:
        return sorted((s for p in self.proxies for s in p.writes(after)), key=lambda s: s.at)

    def pause(self) -> None:
        for proxy in self.proxies:
            proxy.pause()

    def resume(self) -> None:
        for proxy in self.proxies:
            proxy.resume()

    def reset(self) -> None:
        for proxy in self.proxies:
            proxy.reset()

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
