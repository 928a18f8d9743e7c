"""What the deploy tests share: a cluster of one service on the real Docker engine, its
keys in the real etcd, the agent as a process that can be SIGKILLed, and samplers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.deploys import request_deploy
from agent.keys import Keys
from agent.store.etcd3 import Etcd3Store
from tests.helpers import eventually
from tests.services import Dockerd, Etcd, http_get

V1, V2, BROKEN = Dockerd.WEB_V1, Dockerd.WEB_V2, Dockerd.WEB_BROKEN

CONFIG = """
agent:
  cluster: {cluster}
  interval: 2s
  grace: 1s
  state_dir: {tmp}/state
  store: {{backend: etcd, endpoints: ["{etcd}"], prefix: /shipmate}}
services:
  web:
    image: {image}
    command: {command}
    port: {port}
    health: {{http: /, timeout: 1s}}
    source: {{type: static, count: {count}, interval: 1s}}
    actuator: {{type: docker, host: "{docker}", network: host, init: true}}
    announce: {{type: etcd, ttl: 10s}}
    deploy: {deploy}
"""


def body(port: int) -> str | None:
    """What the instance on ``port`` serves at ``/``, or None if nothing answers."""
    try:
        status, data = http_get(f"http://127.0.0.1:{port}/", timeout=0.5)
    except OSError:
        return None
    return data.decode().strip() if status == 200 else None


class AgentProcess:
    """``python -m agent run -c FILE`` with its output in a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(config)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        """SIGKILL, and reap it: a zombie would still look alive to its successor."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Cluster:
    """One service ``web`` of a cluster of its own, and the means to watch and drive it."""

    def __init__(self, *, etcd: Etcd, dockerd: Dockerd, tmp: Path, count: int, port: int,
                 deploy: str, image: str = V1) -> None:
        self.name = f"t{uuid.uuid4().hex[:8]}"
        self.dockerd, self.count, self.port, self.tmp = dockerd, count, port, tmp
        self.config = tmp / "agent.yaml"
        self.config.write_text(CONFIG.format(cluster=self.name, tmp=tmp, etcd=etcd.endpoint,
                                             image=image, port=port, count=count,
                                             docker=dockerd.host, deploy=deploy,
                                             command=Dockerd.WEB_COMMAND))
        self.store = Etcd3Store([etcd.endpoint])
        self.keys = Keys(f"/shipmate/{self.name}")
        self.agents: list[AgentProcess] = []

    # ------------------------------------------------------------ the agent and the CLI
    def start_agent(self) -> AgentProcess:
        agent = AgentProcess(self.config, self.tmp / f"agent-{len(self.agents)}.log")
        self.agents.append(agent)
        return agent

    def logs(self) -> str:
        return "\n".join(f"--- agent {n}\n{a.tail()}" for n, a in enumerate(self.agents))

    def shipmate(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", *args, "-c", str(self.config)],
                              capture_output=True, text=True, timeout=timeout)

    def request(self, image: str) -> str:
        """Ask for a deploy as ``shipmate deploy --no-wait`` does; return its id."""
        return request_deploy(self.store, self.keys, "web", image=image, by="test",
                              reason="deploy")["id"]

    # ------------------------------------------------------------ what the store says
    def _json(self, field: str) -> dict[str, Any] | None:
        entry = self.store.get(self.keys.service("web", field))
        return json.loads(entry.value) if entry else None

    def journal(self) -> dict[str, Any] | None:
        return self._json("deploy")

    def release(self) -> dict[str, Any] | None:
        return self._json("release")

    def announced(self) -> list[dict[str, Any]]:
        return [json.loads(e.value) for e in self.store.get_prefix("/services/web/").values()
                if e.key.rsplit("/", 1)[-1].startswith(f"{self.name}-")]

    # ------------------------------------------------------------ what runs
    def containers(self) -> list[dict[str, Any]]:
        return self.dockerd.client().api.containers(
            all=True, filters={"label": f"shipmate.cluster={self.name}"})

    def running(self) -> list[tuple[int, str]]:
        """(slot, version) of every running container, sorted."""
        return sorted((int(c["Labels"]["shipmate.slot"]), c["Labels"]["shipmate.version"])
                      for c in self.containers() if c["State"] == "running")

    def serving(self, base: int, count: int | None = None) -> list[str | None]:
        return [body(base + i) for i in range(count or self.count)]

    def settled(self, version: str | None = None) -> bool:
        """No deploy, ``count`` instances of ``version`` (default: the release's) on slots
        0..count-1, each serving, and nothing else running."""
        release = self.release()
        if self.journal() is not None or release is None:
            return False
        version = version or release["version"]
        return (self.running() == [(slot, version) for slot in range(self.count)]
                and None not in self.serving(release["port"]))

    def wait_settled(self, timeout: float = 30, what: str = "the service to settle") -> dict:
        try:
            eventually(self.settled, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\njournal: {self.journal()}\nrunning: "
                                 f"{self.running()}\n{self.logs()}") from None
        release = self.release()
        assert release is not None
        return release

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        for row in self.containers():
            self.dockerd.client().api.remove_container(row["Id"], force=True)
        for key in self.store.get_prefix(f"/shipmate/{self.name}/"):
            self.store.delete(key)
        self.store.close()


class Sampler(threading.Thread):
    """Calls ``measure`` every 50 ms until stopped; ``samples`` keeps the results."""

    def __init__(self, measure: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.measure, self.samples = measure, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(self.measure())
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(10)


class OnJournal:
    """Runs ``do`` once, as soon as the deploy journal satisfies ``when`` (an etcd watch on
    the key, with a poll as a backstop); ``journal`` is what the journal said then."""

    def __init__(self, cluster: Cluster, when: Callable[[dict[str, Any]], bool],
                 do: Callable[[], Any]) -> None:
        self.cluster, self.when, self.do = cluster, when, do
        self.journal: dict[str, Any] | None = None
        self.fired = threading.Event()
        self._lock = threading.Lock()
        key = cluster.keys.service("web", "deploy")
        self._watch = cluster.store.watch(key, lambda events: [
            self._seen(e.value) for e in events if e.key == key and e.value])

    def _seen(self, value: str) -> None:
        journal = json.loads(value)
        with self._lock:
            if not self.fired.is_set() and self.when(journal):
                self.do()
                self.journal = journal
                self.fired.set()

    def wait(self, timeout: float = 30) -> dict[str, Any]:
        """Wait until it fired (polling the key too); return the journal it fired on."""
        deadline = time.monotonic() + timeout
        while not self.fired.wait(0.02):
            entry = self.cluster.journal()
            if entry is not None:
                self._seen(json.dumps(entry))
            if time.monotonic() > deadline:
                raise AssertionError(f"the journal never matched; last: {entry}\n"
                                     f"{self.cluster.logs()}")
        self._watch.cancel()
        assert self.journal is not None
        return self.journal


def kill_at(cluster: Cluster, agent: AgentProcess,
            when: Callable[[dict[str, Any]], bool]) -> OnJournal:
    """SIGKILL ``agent`` as soon as the journal satisfies ``when``."""
    return OnJournal(cluster, when, agent.kill)
