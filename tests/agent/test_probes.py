"""The prober alone: real HTTP probes (agent.health) of real sockets, on its own threads."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from agent.health import probe
from agent.instances import Instance
from agent.probes import Prober
from tests.helpers import eventually, port_block


def check(timeout: float = 1.0, interval: float = 5.0) -> SimpleNamespace:
    """A ``health: {http: /}`` block."""
    return SimpleNamespace(http="/", tcp=False, timeout=timeout, interval=interval)


def web(port: int, slot: int = 0) -> Instance:
    return Instance(name=f"t-web-{slot}-v1", service="web", slot=slot, version="v1",
                    host="127.0.0.1", port=port, cluster="t")


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def prober() -> Iterator[Prober]:
    changes: list[tuple[str, bool, bool | None]] = []
    made = Prober(workers=4, on_change=lambda i, ok, was: changes.append((i.name, ok, was)))
    made.changes = changes  # type: ignore[attr-defined]
    yield made
    made.close()


def serve(port: int) -> http.server.HTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_new_instance_is_seen_healthy_within_a_fraction_of_a_second(prober):
    port = port_block(1)
    instance = web(port)
    every = check(interval=1.0)
    prober.track([(instance, lambda i: probe(i, every), every)])
    eventually(lambda: prober.health(instance.name) is False, 10, "the first (failed) probe")
    time.sleep(2)  # two seconds old and still failing: probed every 100 ms by now
    server = serve(port)
    try:
        listening = time.monotonic()
        eventually(lambda: prober.health(instance.name), 10, "healthy")
        took = time.monotonic() - listening
        assert took < 1.0, f"seen healthy {took:.2f}s after it was"
        assert prober.changes == [(instance.name, False, None), (instance.name, True, False)]
    finally:
        server.shutdown()
        server.server_close()
    # healthy ones are probed every interval (here 1 s): not noticed yet, then noticed
    assert prober.health(instance.name)
    eventually(lambda: prober.health(instance.name) is False, 15, "the failure noticed")
    assert prober.changes[-1] == (instance.name, False, True)


def test_a_hanging_probe_holds_up_no_other_and_fails_after_its_timeout(prober):
    hang = socket.socket()  # accepts connections (the backlog) but never answers
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)
    port = port_block(1)
    server = serve(port)
    try:
        slow = web(hang.getsockname()[1], slot=0)
        fine = [web(port, slot) for slot in range(1, 9)]  # twice the workers
        started = time.monotonic()
        prober.track([(slow, lambda i: probe(i, check(timeout=3)), check(timeout=3))]
                     + [(i, lambda i: probe(i, check()), check()) for i in fine])
        eventually(lambda: all(prober.health(i.name) for i in fine), 10, "the others healthy")
        assert prober.health(slow.name) is None, "the hanging probe cannot have ended yet"
        assert time.monotonic() - started < 4
        eventually(lambda: prober.health(slow.name) is False, 15, "the hanging probe failed")
    finally:
        server.shutdown()
        server.server_close()
        hang.close()


def test_checks_that_ignore_their_timeout_are_given_up_on_and_replaced(prober):
    release = threading.Event()
    port = port_block(1)
    server = serve(port)
    try:
        stuck = [web(10000 + slot, slot) for slot in range(prober.workers)]  # every worker
        fine = web(port, slot=9)
        prober.track([(i, lambda i: release.wait(30), check(timeout=0.5)) for i in stuck])
        eventually(lambda: len(prober._in_flight) == prober.workers, 10, "all workers stuck")
        prober.track([(i, lambda i: release.wait(30), check(timeout=0.5)) for i in stuck]
                     + [(fine, lambda i: probe(i, check()), check())])
        eventually(lambda: all(prober.health(i.name) is False for i in stuck), 10,
                   "the stuck checks counted as failed (0.5 s timeout + 1 s)")
        eventually(lambda: prober.health(fine.name), 10, "the other probed meanwhile")
        assert len([t for t in threading.enumerate() if t.name.startswith("probe-")]) \
            <= prober.max_threads
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_probes_in_flight_and_threads_are_bounded(prober):
    release = threading.Event()
    running, most = [0], [0]
    lock = threading.Lock()

    def blocking(instance: Instance) -> bool:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(20)
        with lock:
            running[0] -= 1
        return True

    instances = [web(10000 + slot, slot) for slot in range(50)]
    prober.track([(i, blocking, None) for i in instances])
    eventually(lambda: running[0] == prober.workers, 10, "every worker busy")
    time.sleep(0.5)
    assert most[0] == prober.workers  # 4 at once, not 50
    release.set()
    eventually(lambda: all(prober.health(i.name) for i in instances), 20, "all probed")
    probe_threads = [t for t in threading.enumerate() if t.name.startswith("probe-")]
    assert len(probe_threads) <= prober.max_threads


def test_a_vanished_instance_is_dropped_and_its_late_result_ignored(prober):
    release = threading.Event()
    instance = web(10000)
    prober.track([(instance, lambda i: release.wait(20), None)])
    eventually(lambda: prober._in_flight, 10, "the probe under way")
    prober.track([])  # the pass no longer lists it
    release.set()
    time.sleep(0.3)
    assert prober.health(instance.name) is None and prober.changes == []


def test_probes_begin_at_most_rate_a_second():
    prober = Prober(workers=4, rate=20)
    try:
        instances = [web(10000 + slot, slot) for slot in range(100)]  # each due every 100 ms
        began = time.monotonic()
        prober.track([(i, lambda i: False, None) for i in instances])
        eventually(lambda: prober.probes >= 10, 10, "the first probes")
        time.sleep(1)
        took = time.monotonic() - began
        assert prober.probes <= 4 + 20 * took + 2, f"{prober.probes} probes in {took:.1f}s"
    finally:
        prober.close()


def test_a_new_instance_is_probed_before_a_backlog_of_healthy_re_probes():
    # 100 healthy instances due every 0.5 s at a rate of 50 probes a second: re-probes
    # are always overdue; a new instance still goes next, not behind them
    prober = Prober(workers=2, rate=50.0)
    try:
        healthy = [Instance(name=f"t-old-{i}-v1", service="old", slot=i, version="v1",
                            host="127.0.0.1", port=None) for i in range(100)]
        every = check(interval=0.5)
        targets = [(i, lambda i: True, every) for i in healthy]
        prober.track(targets)
        eventually(lambda: all(prober.health(i.name) for i in healthy), 60, "all healthy")
        eventually(lambda: prober._heap and prober._heap[0][0] < time.monotonic() - 1.0, 60,
                   "a backlog of overdue re-probes")
        new = Instance(name="t-new-0-v1", service="new", slot=0, version="v1",
                       host="127.0.0.1", port=None)
        before = prober.probes
        prober.track([*targets, (new, lambda i: True, every)])
        eventually(lambda: prober.health(new.name) is not None, 60, "the new one probed")
        assert prober.probes - before <= 10  # not the 50 overdue re-probes first
    finally:
        prober.close()
