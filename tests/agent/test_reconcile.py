"""One reconcile pass, with real local processes and the embedded store."""

from __future__ import annotations

import json
import os
import signal

import pytest

from agent.actuation import Actuation, Outcome
from agent.keys import Keys
from agent.kinds import Context
from agent.reconcile import Reconciler
from agent.runtime import Builder
from tests.helpers import alive, eventually, kill_recorded, port_block, process_records

YAML = """
agent: {{cluster: test}}
services:
  web:
    command: [python3, -m, http.server, "{{port}}", --bind, 127.0.0.1]
    port: {port}
    health: {{http: /, timeout: 1s}}
    source: {{type: static, count: 1}}
    actuator: {{type: process}}
    announce: {{type: etcd, ttl: 10s}}
  worker:
    command: [sleep, "300"]
    source: {{type: static, count: 1}}
    actuator: {{type: process}}
"""


@pytest.fixture
def world(load_test_config, embedded_store, shipmate_plugins, tmp_path):
    """A Reconciler over the YAML above; events are recorded in ``world.events``."""

    class World:
        events: list[tuple[str, dict]] = []

        def __init__(self) -> None:
            self.port = port_block(4)
            self.config = load_test_config(YAML.format(port=self.port))
            self.store = embedded_store
            self.keys = Keys(self.config.key_prefix)
            self.builder = Builder(shipmate_plugins, Context("test", embedded_store, tmp_path))
            self.reconciler = self.fresh()

        def fresh(self) -> Reconciler:
            """A new reconciler with new plugin objects: as after an agent restart."""
            self.builder.close()
            self.builder.shared.clear()
            services = self.builder.services(self.config)
            return Reconciler(services=services, store=self.store, keys=self.keys,
                              emit=lambda hook, **kw: self.events.append((hook, kw)), grace=2)

        def set(self, service: str, field: str, value: str | None) -> None:
            key = self.keys.service(service, field)
            self.store.put(key, value) if value is not None else self.store.delete(key)

        def pass_(self):
            """One pass whose actions are all carried out before it returns: the actions
            it took (one per slot: a slot's second action waits for the next pass)."""
            views = self.reconciler.observe()
            outcomes: list[Outcome] = []
            actuation = Actuation(emit=self.reconciler.emit, grace=lambda: 2,
                                  parallelism=lambda: 16, on_done=outcomes.append)
            actions = [a for a in self.reconciler.plan(views)
                       if actuation.submit(self.reconciler.services[a.service], a, set())]
            eventually(lambda: len(outcomes) == len(actions), 30, "the actions to end")
            errors = [o.error for o in outcomes if o.error]
            errors += self.reconciler.announce(views, {a.instance.name for a in actions
                                                       if a.instance is not None})
            assert not errors
            return actions

        def running(self, service: str) -> list[dict]:
            return [r for r in process_records(tmp_path) if r["service"] == service
                    and alive(r["pid"])]

    world = World()
    world.events = []
    yield world
    world.builder.close()
    kill_recorded(tmp_path)


def test_starts_the_desired_count_on_consecutive_ports_and_emits_events(world):
    world.set("web", "desired", "3")
    actions = world.pass_()
    assert sorted(a.slot for a in actions if a.verb == "start") == [0, 1, 2]
    running = world.running("web")
    assert sorted(r["port"] for r in running) == [world.port, world.port + 1, world.port + 2]
    assert [h for h, _ in world.events].count("shipmate_instance_started") == 3
    assert world.pass_() == []  # nothing left to do


def test_unknown_desired_count_stops_nothing(world):
    world.set("worker", "desired", "2")
    world.pass_()
    for bad in (None, "abc", "-1", "2.5", ""):
        world.set("worker", "desired", bad)
        views = world.reconciler.observe()
        assert views["worker"].effective is None
        assert world.reconciler.plan(views) == []
    assert len(world.running("worker")) == 2
    world.set("worker", "desired", "abc")
    assert "not a count: treated as unknown" in world.reconciler.observe()["worker"].problems[0]


def test_override_wins_until_deleted(world):
    world.set("worker", "desired", "1")
    world.set("worker", "override", "3")
    world.pass_()
    assert len(world.running("worker")) == 3
    world.set("worker", "override", None)
    actions = world.pass_()
    assert [(a.verb, a.slot) for a in actions] == [("stop", 2), ("stop", 1)]
    assert len(world.running("worker")) == 1
    stopped = [kw for hook, kw in world.events if hook == "shipmate_instance_stopped"]
    assert [kw["reason"] for kw in stopped] == ["scale down to 1"] * 2


def test_a_deploy_in_progress_pauses_counting(world):
    world.set("worker", "desired", "2")
    world.set("worker", "deploy", json.dumps({"phase": "starting"}))
    assert world.pass_() == []
    assert world.running("worker") == []


def test_an_exited_instance_is_replaced(world):
    world.set("worker", "desired", "2")
    world.pass_()
    victim = world.running("worker")[0]
    os.killpg(victim["pid"], signal.SIGKILL)
    eventually(lambda: not alive(victim["pid"]), what="the kill")
    actions = world.pass_()  # the slot's exited instance is removed first
    assert [(a.verb, a.reason, a.slot) for a in actions] == [("stop", "exited", victim["slot"])]
    actions = world.pass_()  # then the slot is started again
    assert [(a.verb, a.reason, a.slot) for a in actions] == [
        ("start", "scale up to 2", victim["slot"])]
    assert len(world.running("worker")) == 2


def test_a_restarted_agent_adopts_and_starts_no_duplicate(world):
    world.set("worker", "desired", "2")
    world.pass_()
    before = {r["pid"] for r in world.running("worker")}
    world.reconciler = world.fresh()
    assert world.pass_() == []
    assert {r["pid"] for r in world.running("worker")} == before


def test_healthy_instances_are_announced_and_withdrawn_before_stopping(world):
    world.set("web", "desired", "2")
    world.pass_()

    def announced():
        world.pass_()
        return world.store.get_prefix("/services/web/")

    keys = eventually(lambda: len(announced()) == 2 and announced(), timeout=10,
                      what="two announcements")
    values = sorted(json.loads(e.value)["port"] for e in keys.values())
    assert values == [world.port, world.port + 1]
    first = json.loads(next(iter(keys.values())).value)
    assert first["host"] == "127.0.0.1" and first["service"] == "web" and first["version"]
    world.set("web", "desired", "1")
    world.pass_()
    assert [json.loads(e.value)["port"] for e in world.store.get_prefix(
        "/services/web/").values()] == [world.port]


def test_stale_announcements_are_removed(world):
    world.set("web", "desired", "1")
    ghost = "/services/web/test-web-3-0123abcd"  # an instance of this cluster that is gone
    world.store.put(ghost, '{"host": "10.9.9.9", "port": 1}')
    world.store.put("/services/webby/other", "kept: not this service's prefix")
    eventually(lambda: world.pass_() is not None and world.store.get_prefix("/services/web/")
               and ghost not in world.store.get_prefix("/services/web/"),
               timeout=10)
    assert world.store.get("/services/webby/other") is not None
