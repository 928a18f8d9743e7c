"""The running agent: watches, reloads, stopping, leadership, health endpoint."""

from __future__ import annotations

import threading
import urllib.request

import pytest

from agent.keys import Keys
from agent.runtime import Agent
from tests.helpers import alive, eventually, kill_recorded, process_records
from tests.services import free_port

CONFIG = """
agent:
  cluster: rt
  interval: 30s
  http: 127.0.0.1:{http}
services:
  worker:
    command: [sleep, "300"]
    source: {{type: static, count: {count}, interval: 1s}}
    actuator: {{type: process}}
"""


@pytest.fixture(autouse=True)
def _kill_processes(tmp_path):
    """The agents stop before this (run_agent); their processes are killed here."""
    yield
    kill_recorded(tmp_path)


@pytest.fixture
def agent_factory(run_agent):
    def start(count: int = 1, http: int | None = None) -> Agent:
        return run_agent(CONFIG.format(count=count, http=http or free_port()))

    return start


def running(tmp_path) -> list[dict]:
    return [r for r in process_records(tmp_path) if alive(r["pid"])]


def test_an_override_acts_at_once_not_at_the_next_interval(agent_factory, tmp_path):
    agent = agent_factory(count=1)
    eventually(lambda: len(running(tmp_path)) == 1, what="the first instance")
    agent.store.put(Keys("/shipmate/rt").service("worker", "override"), "3")
    # the interval is 30 s: only the store watch can start them this soon (it takes well
    # under a second on an idle machine; the deadline leaves room for a loaded one)
    eventually(lambda: len(running(tmp_path)) == 3, timeout=10, what="scale to 3 at once")


def test_stopping_leaves_instances_running_and_frees_leadership(agent_factory, tmp_path):
    agent = agent_factory(count=2)
    eventually(lambda: len(running(tmp_path)) == 2)
    pids = {r["pid"] for r in running(tmp_path)}
    agent.stop()
    eventually(lambda: not agent.leadership.is_leader, what="the first agent to resign")
    assert {r["pid"] for r in running(tmp_path)} == pids
    second = agent_factory(count=2)
    # well before the 15 s leader lease would run out: the key was given up, not left
    eventually(lambda: second.leadership.is_leader, timeout=10,
               what="the next agent leads at once")
    eventually(lambda: second.metrics.passes._value.get() >= 1)
    assert {r["pid"] for r in running(tmp_path)} == pids  # adopted, no duplicate


def test_reload_applies_a_new_count_and_keeps_the_old_config_on_errors(agent_factory,
                                                                       tmp_path, write_config,
                                                                       caplog):
    agent = agent_factory(count=1)
    eventually(lambda: len(running(tmp_path)) == 1)
    write_config(CONFIG.format(count=2, http=free_port()))
    agent.request_reload()
    eventually(lambda: len(running(tmp_path)) == 2, what="reload to 2")
    write_config(CONFIG.format(count=3, http=free_port()).replace("actuator:", "actuatr:"))
    agent.request_reload()
    eventually(lambda: "reload failed, keeping the running config" in caplog.text)
    assert len(running(tmp_path)) == 2


def test_a_second_agent_waits_while_the_first_leads(agent_factory, write_config, tmp_path):
    first = agent_factory(count=1)
    eventually(lambda: first.leadership.is_leader)
    eventually(lambda: len(running(tmp_path)) == 1)
    second = Agent(write_config(CONFIG.format(count=3, http=free_port())))
    campaigns: list[bool] = []  # what each of the second agent's campaigns won
    campaign = second.leadership.campaign

    def counted() -> bool:
        won = campaign()
        campaigns.append(won)
        return won

    second.leadership.campaign = counted  # type: ignore[method-assign]
    thread = threading.Thread(target=second.run, daemon=True)
    thread.start()
    try:
        # a standby's turn: it campaigns, loses, and marks itself a healthy standby
        eventually(lambda: campaigns and second.metrics.last_pass > 0, timeout=30,
                   what="the second agent's first campaign and turn")
        assert campaigns[0] is False and not second.leadership.is_leader
        assert second.metrics.leader._value.get() == 0
        assert second.metrics.passes._value.get() == 0  # a standby passes nothing
        assert len(running(tmp_path)) == 1  # its count of 3 is not acted on
    finally:
        second.stop()
        thread.join(15)


def test_healthz_and_metrics(agent_factory, tmp_path):
    port = free_port()
    agent_factory(count=2, http=port)
    eventually(lambda: len(running(tmp_path)) == 2)

    def metrics() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()

    eventually(lambda: 'shipmate_running_instances{service="worker"} 2.0' in metrics())
    assert 'shipmate_desired_instances{service="worker"} 2.0' in metrics()
    assert "shipmate_passes_total" in metrics()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read().decode()
    assert body.startswith("ok")


def test_losing_etcd_freezes_changes_and_stops_nothing(etcd, write_config, tmp_path):
    path = write_config(f"""
        agent:
          cluster: frozen
          interval: 1s
          resync: 1s  # every pass compares the store's revisions: each one fails while away
          store: {{backend: etcd, endpoints: ["{etcd.endpoint}"], timeout: 1s}}
        services:
          worker:
            command: [sleep, "300"]
            source: {{type: static, count: 2, interval: 1s}}
            actuator: {{type: process}}
        """)
    agent = Agent(path)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: len(running(tmp_path)) == 2, timeout=10)
        pids = {r["pid"] for r in running(tmp_path)}
        etcd.stop()
        try:
            errors = agent.metrics.errors.labels("store")
            before = errors._value.get()
            eventually(lambda: errors._value.get() >= before + 3, timeout=15,
                       what="passes failing on the store")
            assert {r["pid"] for r in running(tmp_path)} == pids
        finally:
            etcd.start()
        etcd.etcdctl("put", "/shipmate/frozen/services/worker/override", "3")
        eventually(lambda: len(running(tmp_path)) == 3, timeout=20, what="changes resume")
        assert pids < {r["pid"] for r in running(tmp_path)}
    finally:
        agent.stop()
        thread.join(10)
        kill_recorded(tmp_path)


def test_an_agent_whose_leader_key_is_taken_stops_acting(embedded_store):
    from agent.leader import Leadership

    first = Leadership(embedded_store, "/t/leader", ttl=1.5)
    assert first.campaign()
    embedded_store.put("/t/leader", '{"host": "elsewhere", "pid": 1}')  # ops hand it over
    eventually(lambda: not first.is_leader, timeout=15, what="the agent to step down")
    first.resign()


def test_a_dead_predecessor_on_this_host_is_replaced_at_once(embedded_store):
    import json

    from agent.leader import Leadership, agent_id

    dead = {**agent_id(), "pid": 2**22 + 12345}  # no such pid
    embedded_store.create("/t/leader", json.dumps(dead), lease=embedded_store.lease(60))
    successor = Leadership(embedded_store, "/t/leader")
    assert successor.campaign()
    elsewhere = {**dead, "pidns": "pid:[1]"}  # same host name, another container
    embedded_store.put("/t/leader2", json.dumps(elsewhere))
    assert not Leadership(embedded_store, "/t/leader2").campaign()
    successor.resign()
