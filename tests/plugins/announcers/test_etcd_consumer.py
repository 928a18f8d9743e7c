"""What a load balancer fed by the announcements sees: a real haproxy, rendered from etcd by
a watcher as confd does (tests/discovery.py), every request through it counted.

The servers are busybox httpd in Docker containers; with ``init: true`` they exit at once
on SIGTERM, so nothing but the drain protects the requests sent their way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.discovery import Service
from tests.helpers import eventually, port_block
from tests.services import Dockerd

V2 = Dockerd.WEB_V2


@pytest.fixture
def web(etcd, dockerd, busybox_images, haproxy_server, tmp_path
        ) -> Iterator[Callable[..., Service]]:
    """``web(count=, deploy=, init=, ...)``: the service running, announced and in haproxy."""
    made: list[Service] = []

    def make(count: int, redispatch: bool = False, **kwargs: Any) -> Service:
        kwargs.setdefault("port", port_block(2 * count + 12))
        service = Service(etcd=etcd, dockerd=dockerd, haproxy=haproxy_server(redispatch),
                          tmp=tmp_path, count=count, **kwargs)
        made.append(service)
        service.start_agent()
        service.wait_settled(what=f"{count} instances announced and in haproxy")
        return service

    yield make
    for service in made:
        service.close()


class RunningCount(threading.Thread):
    """(time, running containers) every 50 ms."""

    def __init__(self, service: Service) -> None:
        super().__init__(daemon=True)
        self.service, self.samples = service, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic(), len(self.service.running())))
            time.sleep(0.05)

    def first(self, below: int) -> float:
        return next(at for at, n in self.samples if n < below)


def test_a_scale_down_to_one_fails_no_request_and_drains_first(web):
    service = web(3)
    counter = RunningCount(service)
    counter.start()
    try:
        measured = service.measure(lambda: service.scale(1),
                                   lambda: service.wait_settled(1, what="scaled down to 1"))
    finally:
        counter.done.set()
        counter.join(5)
    assert measured.failed == 0, str(measured)
    assert not measured.went_empty, str(measured)
    # withdrawn from haproxy's list, then 2 s of drain, then the stop
    withdrawn = next(at for at, servers in measured.timeline if len(servers) < 3)
    assert counter.first(below=3) - withdrawn >= 1.5, (counter.samples, measured.timeline)


@pytest.mark.parametrize(("count", "order"), [(1, "start-first"), (1, "stop-first"),
                                              (3, "start-first"), (3, "stop-first")])
def test_a_rolling_deploy_fails_no_request(web, count, order):
    service = web(count, deploy=f"{{type: rolling, order: {order}}}")
    measured = service.measure(lambda: service.request_deploy(V2),
                               lambda: service.wait_settled(image=V2, what="deployed v2"))
    assert measured.failed == 0, str(measured)
    assert not measured.went_empty, str(measured)
    assert measured.gap == 0.0, str(measured)


def test_a_blue_green_deploy_fails_no_request(web):
    base = port_block(30)
    service = web(2, port=base, deploy=f"{{type: blue-green, ports: [{base}, {base + 10}], "
                                       "bake: 1s}")
    measured = service.measure(lambda: service.request_deploy(V2),
                               lambda: service.wait_settled(image=V2, what="deployed green"))
    assert measured.failed == 0, str(measured)
    assert not measured.went_empty, str(measured)
    assert {int(s.rsplit(":", 1)[1]) for s in service.haproxy.servers} == {base + 10, base + 11}


def test_an_instance_killed_behind_the_agents_back_leaves_discovery_at_once(web):
    # a load balancer that retries a refused connection elsewhere, as one should run
    service = web(3, redispatch=True)
    (victim, address), *_ = sorted(service.announced().items())

    def kill() -> None:
        service.dockerd.client().api.kill(victim)  # SIGKILL, not through the agent

    measured = service.measure(kill, lambda: (
        eventually(lambda: victim not in service.announced(), timeout=10,
                   what="the dead instance de-announced"),
        service.wait_settled(what="3 instances again")))
    # nothing fails but, at most, the one request in flight when SIGKILL landed
    assert measured.failed <= 1, str(measured)
    assert not measured.went_empty, str(measured)
    # gone from haproxy's list within a few seconds of the kill (the engine's event wakes a pass)
    killed_at = measured.traffic.results[0].at + 0.5
    left = next(at for at, servers in measured.timeline if address not in servers)
    assert left - killed_at < 5, str(measured)


@pytest.mark.parametrize("how", ["scale-down", "deploy"])
def test_a_stop_longer_than_the_ttl_is_not_announced_again(web, how):
    # busybox httpd as PID 1 ignores SIGTERM: each stop takes the whole 8 s grace, 4 ttls
    service = web(2, init=False, ttl="2s", grace="8s",
                  deploy="{type: rolling, order: start-first}")
    before = dict(service.announced())

    def act() -> None:
        service.scale(1) if how == "scale-down" else service.request_deploy(V2)

    def settle() -> None:
        if how == "scale-down":
            service.wait_settled(1, timeout=60, what="scaled down to 1")
        else:
            service.wait_settled(image=V2, timeout=90, what="deployed v2")

    measured = service.measure(act, settle)
    assert measured.failed == 0, str(measured)
    assert not measured.went_empty, str(measured)
    withdrawn = 0
    for name in before:  # each old one: withdrawn once, and never back
        present = [name in names for _, names in measured.names]
        if False in present:
            withdrawn += 1
            assert True not in present[present.index(False):], (name, measured.names)
    assert withdrawn == (1 if how == "scale-down" else 2), measured.names
