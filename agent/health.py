"""The default health check: an HTTP path or a TCP connect on the instance's port."""

from __future__ import annotations

import http.client
import socket
from typing import Any

from agent.instances import Instance


def probe(instance: Instance, check: Any) -> bool:
    """True if ``instance`` passes ``check`` (a HealthConfig); no check means running is healthy.

    HTTP passes on a 2xx or 3xx answer to GET ``check.http``; TCP on a completed
    connect. Both give up after ``check.timeout`` seconds.
    """
    if check is None or (not check.http and not check.tcp):
        return instance.running
    if not instance.running or instance.port is None:
        return False
    try:
        if check.http:
            conn = http.client.HTTPConnection(instance.host, instance.port, timeout=check.timeout)
            try:
                conn.request("GET", check.http, headers={"User-Agent": "shipmate-health"})
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        with socket.create_connection((instance.host, instance.port), timeout=check.timeout):
            return True
    except (OSError, http.client.HTTPException):
        return False
