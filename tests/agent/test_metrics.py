"""/metrics and /healthz: served on their own threads."""

from __future__ import annotations

import socket
import time

from agent.metrics import Metrics, serve
from tests.services import free_port, http_get


def test_an_idle_client_blocks_nobody():
    metrics = Metrics()
    metrics.last_pass = time.time()
    address = f"127.0.0.1:{free_port()}"
    server = serve(address, metrics, stale_after=30)
    idle = []
    try:
        for _ in range(3):  # connected, never sending a byte
            idle.append(socket.create_connection(("127.0.0.1", int(address.split(":")[1]))))
        status, body = http_get(f"http://{address}/healthz", timeout=5)
        assert status == 200 and body.startswith(b"ok")
        status, body = http_get(f"http://{address}/metrics", timeout=5)
        assert status == 200 and b"shipmate_passes_total" in body
    finally:
        for conn in idle:
            conn.close()
        server.shutdown()
        server.server_close()
