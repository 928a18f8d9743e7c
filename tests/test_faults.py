"""Jepsen-style leadership faults: two agents on a real etcd and a real Docker engine.

Each agent is a real ``shipmate run`` process reaching etcd and the engine
through its own :class:`tests.faults.Proxy`, so every request is attributed.
Faults: SIGSTOP of the leader past its lease, a silent partition of the
leader from etcd, connection resets, kill -9 in the middle of a rolling
deploy. What is checked is checked from the outside: the proxies' records of
writes that changed etcd and of container actions, the leader key, the
announcements, and probes of every port every 200 ms. Each test is bounded
(its waits have deadlines; the faults are a few, not a loop).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import Proxies, Proxy
from tests.helpers import eventually, port_block
from tests.plugins.actuators.test_docker import containers, remove_cluster
from tests.services import Dockerd, free_port

TTL = 3.0  # agent.leader_ttl: short, so that the faults below take seconds

AGENT = """
agent:
  cluster: {cluster}
  interval: 5s
  leader_ttl: {ttl}s
  grace: 1s
  http: "127.0.0.1:{http}"
  store: {{backend: etcd, endpoints: {etcd}, timeout: 2s}}
  state_dir: {state}
services:
  web:
    image: {image}
    command: {command}
    port: {port}
    health: {{http: /, timeout: 1s}}
    source: {{type: static, count: {count}, interval: 2s}}
    actuator: {{type: docker, host: "tcp://127.0.0.1:{docker}"}}
    announce: {{type: etcd, ttl: 4s, key: "/services/{cluster}/{{instance}}"}}
    deploy: {{type: rolling, batch: 1, health_timeout: 20s}}
"""


class Agent:
    """One ``shipmate run`` behind its own proxies to etcd and to the engine."""

    def __init__(self, tmp: Path, name: str, etcd, dockerd: Dockerd, cluster: str, port: int,
                 count: int) -> None:
        members = getattr(etcd, "members", [etcd])
        self.etcd = Proxies([m.port for m in members])
        self.docker = Proxy(dockerd.host.removeprefix("unix://"))
        self.config = tmp / f"{name}.yaml"
        self.http = free_port()
        self.config.write_text(AGENT.format(
            cluster=cluster, ttl=TTL, http=self.http, etcd=json.dumps(self.etcd.urls),
            state=tmp / name, image=Dockerd.WEB_V1, command=Dockerd.WEB_COMMAND, port=port,
            count=count, docker=self.docker.port))
        self.log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c",
                                         str(self.config)], stderr=self.log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def leading(self) -> float | None:
        """``shipmate_leader`` from the agent's /metrics (None if it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics",
                                        timeout=2) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        line = next(line for line in text.splitlines() if line.startswith("shipmate_leader "))
        return float(line.split()[1])

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.etcd.close()
        self.docker.close()
        self.log.close()


def _world(etcd, dockerd: Dockerd, tmp_path: Path) -> Iterator[dict]:
    cluster = f"f{uuid.uuid4().hex[:8]}"
    agents: list[Agent] = []

    def start(name: str, port: int, count: int) -> Agent:
        agent = Agent(tmp_path, name, etcd, dockerd, cluster, port, count)
        agents.append(agent)
        return agent

    yield {"cluster": cluster, "start": start, "etcd": etcd, "dockerd": dockerd}
    for agent in agents:
        agent.stop()
    remove_cluster(dockerd, cluster)
    etcd.etcdctl("del", "--prefix", f"/shipmate/{cluster}/")
    etcd.etcdctl("del", "--prefix", f"/services/{cluster}/")


@pytest.fixture(params=["etcd", "etcd_cluster"], ids=["1 member", "3 members"])
def world(request, dockerd, busybox_images, tmp_path) -> Iterator[dict]:
    """Agents on one etcd member or on a 3-member cluster (each agent proxied to all)."""
    yield from _world(request.getfixturevalue(request.param), dockerd, tmp_path)


@pytest.fixture
def one_member_world(etcd, dockerd, busybox_images, tmp_path) -> Iterator[dict]:
    yield from _world(etcd, dockerd, tmp_path)


def leader_pid(etcd, cluster: str) -> int | None:
    out = etcd.etcdctl("get", f"/shipmate/{cluster}/leader", "--print-value-only").strip()
    return json.loads(out)["pid"] if out else None


def running(dockerd: Dockerd, cluster: str) -> list[dict]:
    return [c for c in containers(dockerd, cluster) if c["State"] == "running"]


def announced(etcd, cluster: str) -> set[str]:
    out = etcd.etcdctl("get", "--prefix", f"/services/{cluster}/", "--keys-only")
    return {line.rsplit("/", 1)[1] for line in out.split() if line.strip()}


def serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5) as reply:
            return reply.status == 200
    except OSError:
        return False


def two_agents(world: dict, port: int, count: int) -> tuple[Agent, Agent]:
    """A leader running ``count`` healthy instances, and a standby that campaigned."""
    etcd, cluster = world["etcd"], world["cluster"]
    first = world["start"]("a", port, count)
    eventually(lambda: leader_pid(etcd, cluster) == first.pid, 30, "the first agent to lead")
    eventually(lambda: len(announced(etcd, cluster)) == count, 60, f"{count} announced")
    second = world["start"]("b", port, count)
    eventually(lambda: second.leading() == 0 and any(  # it read the leader key: a campaign
        s.path == "/v3/kv/range" for s in second.etcd.seen), 30, "the standby to campaign")
    return first, second


def test_a_leader_paused_past_its_lease_acts_on_nothing_after_it_continues(world):
    etcd, dockerd, cluster = world["etcd"], world["dockerd"], world["cluster"]
    first, second = two_agents(world, port_block(3), 2)
    assert second.docker.docker_actions() == []
    before, t0 = second.cpu(), time.monotonic()
    time.sleep(5)  # a measurement window, not a wait
    standby_cpu = (second.cpu() - before) / (time.monotonic() - t0)
    assert standby_cpu < 0.05, f"a standby used {standby_cpu:.1%} of a core"

    first.process.send_signal(signal.SIGSTOP)
    paused = time.monotonic()
    etcd.etcdctl("put", f"/shipmate/{cluster}/services/web/override", "3")
    eventually(lambda: leader_pid(etcd, cluster) == second.pid, 2 * TTL + 10,
               "the standby to take over")
    took_over = time.monotonic() - paused
    eventually(lambda: len(running(dockerd, cluster)) == 3, 60, "the override applied")
    time.sleep(max(0.0, paused + 3 * TTL - time.monotonic()))
    resumed = time.monotonic()
    first.process.send_signal(signal.SIGCONT)
    eventually(lambda: first.leading() == 0, 30, "the continued agent to look at itself")
    time.sleep(2 * TTL)  # an observation window: a stale plan or keep-alive would act now
    assert first.etcd.writes(after=resumed) == [], "the deposed agent wrote to etcd"
    assert first.docker.docker_actions(after=resumed) == [], "the deposed agent acted"
    assert leader_pid(etcd, cluster) == second.pid
    assert len(running(dockerd, cluster)) == 3
    assert took_over < 2 * TTL


def test_a_silent_partition_never_gives_two_acting_agents_nor_a_ghost(world):
    etcd, dockerd, cluster = world["etcd"], world["dockerd"], world["cluster"]
    first, second = two_agents(world, port_block(3), 2)
    first.etcd.pause()
    cut = time.monotonic()
    eventually(lambda: leader_pid(etcd, cluster) == second.pid, 2 * TTL + 10,
               "the standby to take over")
    taken = min(s.at for s in second.etcd.writes())  # its first write: the leader key
    etcd.etcdctl("put", f"/shipmate/{cluster}/services/web/override", "1")
    eventually(lambda: len(running(dockerd, cluster)) == 1, 60, "the new leader scaled to 1")
    eventually(lambda: len(announced(etcd, cluster)) == 1, 30, "one announced")
    # the cut-off agent stopped acting before the other could start
    assert all(s.at < taken for s in first.docker.docker_actions(after=cut))
    assert all(s.at < taken for s in first.etcd.writes(after=cut))
    for _ in range(2):  # a few resets on the way back
        first.etcd.reset()
        first.docker.reset()
    healed = time.monotonic()
    first.etcd.resume()
    eventually(lambda: first.leading() == 0 and any(s.at > healed for s in first.etcd.seen),
               30, "the healed agent to reach etcd again")
    time.sleep(2 * TTL + 4)  # an observation window longer than the announcements' TTL
    assert first.etcd.writes(after=healed) == []
    assert first.docker.docker_actions(after=healed) == []
    names = {c["Names"][0].lstrip("/") for c in running(dockerd, cluster)}
    assert announced(etcd, cluster) == names  # no ghost of a stopped instance
    assert leader_pid(etcd, cluster) == second.pid


def journal(etcd, cluster: str) -> dict:
    out = etcd.etcdctl("get", f"/shipmate/{cluster}/services/web/deploy",
                       "--print-value-only").strip()
    return json.loads(out) if out else {}


@pytest.mark.parametrize("kill_at", [None, 0, 1, 3])
def test_kill_9_during_a_rolling_deploy_keeps_count_minus_batch_serving(one_member_world,
                                                                       kill_at):
    """The acting agent is killed once ``kill_at`` of the 4 instances run the new release
    (None: as soon as the request is written, before the agent picked it up)."""
    world = one_member_world
    etcd, dockerd, cluster = world["etcd"], world["dockerd"], world["cluster"]
    port = port_block(5)
    first, second = two_agents(world, port, 4)
    eventually(lambda: all(serving(port + i) for i in range(4)), 60, "4 serving")
    least, doubled, done = [4], set(), threading.Event()

    def probe() -> None:
        while not done.is_set():
            least[0] = min(least[0], sum(serving(port + i) for i in range(4)))
            slots = [c["Labels"]["shipmate.slot"] for c in running(dockerd, cluster)]
            doubled.update(slot for slot in slots if slots.count(slot) > 1)
            done.wait(0.2)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        deploy = subprocess.run([sys.executable, "-m", "agent", "deploy", "-c",
                                 str(first.config), "web", "--image", Dockerd.WEB_V2,
                                 "--no-wait"], capture_output=True, text=True, timeout=60)
        assert deploy.returncode == 0, deploy.stderr
        if kill_at is not None:
            eventually(lambda: journal(etcd, cluster).get("phase") == "running" and journal(
                etcd, cluster).get("progress", {}).get("done", -1) >= kill_at, 60,
                f"{kill_at} of 4 replaced")
        first.process.kill()
        release_key = f"/shipmate/{cluster}/services/web/release"

        def finished() -> dict | None:
            out = etcd.etcdctl("get", release_key, "--print-value-only").strip()
            release = json.loads(out) if out else {}
            deploying = etcd.etcdctl("get", f"/shipmate/{cluster}/services/web/deploy",
                                     "--print-value-only").strip()
            return release if (release.get("image") == Dockerd.WEB_V2 and not deploying) \
                else None

        release = eventually(finished, 120, "the deploy to finish under the second agent")
    finally:
        done.set()
        prober.join(5)
    assert release["deploy"]["result"] == "finished" and not release["deploy"]["reason"], \
        release["deploy"]
    assert least[0] >= 3, f"only {least[0]} instances served during the deploy"
    assert not doubled, f"two instances ran on slot(s) {sorted(doubled)}"
    eventually(lambda: leader_pid(etcd, cluster) == second.pid, 2 * TTL + 10, "the takeover")
    assert sorted(c["Image"] for c in running(dockerd, cluster)) == [Dockerd.WEB_V2] * 4
