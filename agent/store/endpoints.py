"""What the two etcd backends share: reading endpoint URLs and classifying failures."""

from __future__ import annotations

from typing import Any
from urllib.parse import SplitResult, urlsplit

from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from agent.store.base import StoreError


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


def never_sent(exc: BaseException) -> bool:
    """True if the request certainly did not reach a server (so replaying it elsewhere is safe).

    Looks through the whole chain of causes, as requests and python-etcd wrap
    urllib3's errors in their own.
    """
    import requests

    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, (NewConnectionError, ConnectTimeoutError, requests.ConnectTimeout)):
            return True
        todo += [err.__context__, err.__cause__, getattr(err, "reason", None),
                 getattr(err, "cause", None),
                 *[a for a in getattr(err, "args", ()) if isinstance(a, BaseException)]]
    return False
