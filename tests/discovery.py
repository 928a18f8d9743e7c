"""A load balancer fed by the announcements, as users run one, for tests and the benchmark.

- :class:`Consumer` is what confd does in watch mode: it watches the
  announcement prefix in etcd, renders haproxy's backend list from the values
  (``format: hostport``) and reloads haproxy when the list changed.
- :class:`Traffic` sends requests through haproxy without pause (a fresh
  connection each, so each is routed anew) and counts the ones that failed.
- :class:`GapMeter` samples what is announced every 20 ms and probes each
  announced server: the longest run of samples in which no announced server
  answered is the *announced-set gap*.
- :class:`Service` runs one service ``web`` of a cluster of its own: the agent
  as a process (``python -m agent run``), its containers on the real Docker
  engine, its keys in the real etcd.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.deploys import request_deploy
from agent.keys import Keys
from agent.store.etcd3 import Etcd3Store
from tests.helpers import eventually
from tests.services import Dockerd, Etcd, Haproxy, http_get

CONFIG = """
agent:
  cluster: {cluster}
  interval: 2s
  grace: {grace}
  state_dir: {tmp}/state
  store: {{backend: etcd, endpoints: ["{etcd}"], prefix: /shipmate}}
services:
  web:
    image: {image}
    command: {command}
    port: {port}
    health: {{http: /, timeout: 1s}}
    source: {{type: static, count: {count}, interval: 1s}}
    actuator: {{type: docker, host: "{docker}", network: host, init: {init}}}
    announce: {{type: etcd, key: "/{cluster}/services/{{service}}/{{instance}}", ttl: {ttl},
                format: hostport{drain}}}
    deploy: {deploy}
"""


class Consumer(threading.Thread):
    """confd for one haproxy: on every change under ``prefix``, read it, render, reload.

    ``timeline`` holds (monotonic time, sorted servers) each time haproxy was reloaded with a
    changed list (``servers``: the list it runs with now); ``names`` the announced instance
    names each time they changed.
    """

    def __init__(self, store: Etcd3Store, prefix: str, haproxy: Haproxy) -> None:
        super().__init__(daemon=True, name="consumer")
        self.store, self.prefix, self.haproxy = store, prefix, haproxy
        self.changed = threading.Event()
        self.done = threading.Event()
        self.servers: list[str] = []
        self.timeline: list[tuple[float, list[str]]] = []
        self.names: list[tuple[float, frozenset[str]]] = []
        self._watch = store.watch(prefix, lambda events: self.changed.set())

    def run(self) -> None:
        while not self.done.is_set():
            self.changed.wait(0.5)  # a poll as well, as confd's -interval
            self.changed.clear()
            try:
                entries = self.store.get_prefix(self.prefix)
            except Exception:  # noqa: BLE001 - etcd away: keep the last rendering, as confd does
                continue
            names = frozenset(key.rsplit("/", 1)[-1] for key in entries)
            if not self.names or self.names[-1][1] != names:
                self.names.append((time.monotonic(), names))
            servers = sorted({entry.value for entry in entries.values()})
            if self.haproxy.set_servers(servers) or not self.timeline:
                self.servers = servers
                self.timeline.append((time.monotonic(), servers))

    def stop(self) -> None:
        self._watch.cancel()
        self.done.set()
        self.changed.set()
        self.join(5)

    def went_empty(self) -> bool:
        """Whether the backend list was ever empty after it first had a server."""
        lists = [servers for _, servers in self.timeline]
        first = next((n for n, servers in enumerate(lists) if servers), None)
        return first is not None and any(not servers for servers in lists[first:])


@dataclass
class Outcome:
    at: float
    ok: bool
    detail: str


class Traffic(threading.Thread):
    """Requests through ``url`` one after the other (``pause`` between), each recorded."""

    def __init__(self, host: str, port: int, pause: float = 0.01) -> None:
        super().__init__(daemon=True, name="traffic")
        self.host, self.port, self.pause = host, port, pause
        self.done = threading.Event()
        self.results: list[Outcome] = []

    def run(self) -> None:
        while not self.done.is_set():
            start = time.monotonic()
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("GET", "/", headers={"Connection": "close"})
                response = conn.getresponse()
                body = response.read()
                conn.close()
                ok, detail = response.status == 200, f"{response.status} {body[:40]!r}"
            except OSError as exc:
                ok, detail = False, repr(exc)
            self.results.append(Outcome(start, ok, detail))
            time.sleep(self.pause)

    def stop(self) -> None:
        self.done.set()
        self.join(15)

    @property
    def failed(self) -> list[Outcome]:
        return [r for r in self.results if not r.ok]

    def summary(self) -> str:
        failed = self.failed
        return (f"{len(failed)} of {len(self.results)} requests failed"
                + (f": {sorted({f.detail for f in failed})}" if failed else ""))


class GapMeter(threading.Thread):
    """Every 20 ms: is any announced server answering? ``gap`` is the longest time it was not."""

    def __init__(self, consumer: Consumer) -> None:
        super().__init__(daemon=True, name="gap-meter")
        self.consumer = consumer
        self.done = threading.Event()
        self.samples: list[tuple[float, bool]] = []

    def run(self) -> None:
        while not self.done.is_set():
            now = time.monotonic()
            self.samples.append((now, any(_answers(s) for s in list(self.consumer.servers))))
            time.sleep(max(0.0, 0.02 - (time.monotonic() - now)))

    def stop(self) -> None:
        self.done.set()
        self.join(5)

    @property
    def gap(self) -> float:
        """Seconds of the longest run of samples with no announced server answering."""
        longest, since = 0.0, None
        for at, ok in self.samples:
            if not ok and since is None:
                since = at
            elif ok and since is not None:
                longest, since = max(longest, at - since), None
        if since is not None and self.samples:
            longest = max(longest, self.samples[-1][0] - since)
        return longest


def _answers(server: str) -> bool:
    try:
        return http_get(f"http://{server}/", timeout=0.3)[0] == 200
    except OSError:
        return False


@dataclass
class Service:
    """One service ``web`` of a cluster of its own, behind a haproxy fed by its announcements."""

    etcd: Etcd
    dockerd: Dockerd
    haproxy: Haproxy
    tmp: Path
    count: int
    port: int
    deploy: str = "{type: rolling}"
    image: str = Dockerd.WEB_V1
    init: bool = True
    grace: str = "10s"
    ttl: str = "10s"
    drain: str | None = None  # None: the default
    name: str = field(default_factory=lambda: f"d{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        self.config = self.tmp / f"{self.name}.yaml"
        drain = "" if self.drain is None else f", drain: {self.drain}"
        self.config.write_text(CONFIG.format(
            cluster=self.name, tmp=self.tmp, etcd=self.etcd.endpoint, image=self.image,
            command=Dockerd.WEB_COMMAND, port=self.port, count=self.count,
            docker=self.dockerd.host, init=str(self.init).lower(), grace=self.grace,
            ttl=self.ttl, drain=drain, deploy=self.deploy))
        self.store = Etcd3Store([self.etcd.endpoint])
        self.keys = Keys(f"/shipmate/{self.name}")
        self.prefix = f"/{self.name}/services/web/"
        self.consumer = Consumer(self.store, self.prefix, self.haproxy)
        self.haproxy.set_servers([])
        self.consumer.start()
        self.agent: subprocess.Popen[bytes] | None = None
        self.log = self.tmp / f"{self.name}-agent.log"

    # ------------------------------------------------------------ the agent
    def start_agent(self, code: Path | None = None) -> None:
        """``python -m agent run``; with ``code``, the agent of that source tree instead."""
        env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
        with open(self.log, "ab") as out:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=code)  # -m looks in the working directory first

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        self.consumer.stop()
        if self.agent is not None and self.agent.poll() is None:
            self.agent.terminate()
            try:
                self.agent.wait(20)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        api = self.dockerd.client().api
        for row in self.containers():
            api.remove_container(row["Id"], force=True)
        for prefix in (f"/shipmate/{self.name}/", self.prefix):
            for key in self.store.get_prefix(prefix):
                self.store.delete(key)
        self.store.close()

    # ------------------------------------------------------------ what runs and is announced
    def containers(self) -> list[dict[str, Any]]:
        return self.dockerd.client().api.containers(
            all=True, filters={"label": f"shipmate.cluster={self.name}"})

    def running(self) -> list[tuple[int, str]]:
        return sorted((int(c["Labels"]["shipmate.slot"]), c["Labels"]["shipmate.version"])
                      for c in self.containers() if c["State"] == "running")

    def announced(self) -> dict[str, str]:
        """Instance name -> host:port, as the store says now."""
        entries = self.store.get_prefix(self.prefix)
        return {key.rsplit("/", 1)[-1]: entry.value for key, entry in entries.items()}

    def release(self) -> dict[str, Any] | None:
        entry = self.store.get(self.keys.service("web", "release"))
        return json.loads(entry.value) if entry else None

    def journal(self) -> dict[str, Any] | None:
        entry = self.store.get(self.keys.service("web", "deploy"))
        return json.loads(entry.value) if entry else None

    def settled(self, count: int | None = None, image: str | None = None) -> bool:
        """``count`` instances run, all announced, all in haproxy, no deploy under way."""
        count = self.count if count is None else count
        release = self.release()
        if release is None or self.journal() is not None:
            return False
        if image is not None and release.get("image") != image:
            return False
        running = self.running()
        return (len(running) == count and {v for _, v in running} == {release["version"]}
                and len(self.announced()) == count and len(self.consumer.servers) == count
                and all(_answers(s) for s in self.consumer.servers))

    def wait_settled(self, count: int | None = None, image: str | None = None,
                     timeout: float = 60, what: str = "the service to settle") -> None:
        def check() -> bool:
            if self.agent is not None and self.agent.poll() is not None:
                raise AssertionError(f"the agent exited with {self.agent.returncode}")
            return self.settled(count, image)

        try:
            eventually(check, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nrunning: {self.running()}\nannounced: "
                                 f"{self.announced()}\njournal: {self.journal()}\n"
                                 f"{self.tail()}") from None

    # ------------------------------------------------------------ what a user does
    def scale(self, count: int) -> None:
        self.store.put(self.keys.service("web", "override"), str(count))

    def request_deploy(self, image: str) -> None:
        request_deploy(self.store, self.keys, "web", image=image, by="test", reason="test")

    def measure(self, act: Callable[[], None], settle: Callable[[], None]) -> Measured:
        """Run traffic and the gap meter around ``act()`` until ``settle()`` returns; then a
        little longer (haproxy and the stopped instances have their say)."""
        traffic = Traffic("127.0.0.1", self.haproxy.port)
        meter = GapMeter(self.consumer)
        timeline_from = len(self.consumer.timeline)
        names_from = len(self.consumer.names)
        traffic.start()
        meter.start()
        started = time.monotonic()
        try:
            time.sleep(0.5)  # a baseline: everything answers before
            act()
            settle()
            time.sleep(1.0)
        finally:
            traffic.stop()
            meter.stop()
        return Measured(traffic=traffic, gap=meter.gap, seconds=time.monotonic() - started,
                        timeline=self.consumer.timeline[max(0, timeline_from - 1):],
                        names=self.consumer.names[max(0, names_from - 1):])


@dataclass
class Measured:
    traffic: Traffic
    gap: float
    seconds: float
    timeline: list[tuple[float, list[str]]]
    names: list[tuple[float, frozenset[str]]]

    @property
    def failed(self) -> int:
        return len(self.traffic.failed)

    @property
    def went_empty(self) -> bool:
        return any(not servers for _, servers in self.timeline)

    def __str__(self) -> str:
        start = self.traffic.results[0].at if self.traffic.results else 0.0
        failed = self.traffic.failed
        when = (f" (at {failed[0].at - start:.2f}s .. {failed[-1].at - start:.2f}s)"
                if failed else "")
        lists = [(round(at - start, 2), len(servers)) for at, servers in self.timeline]
        return (f"{self.traffic.summary()}{when}; announced-set gap {self.gap:.3f}s; "
                f"backend lists (s, servers): {lists}")
