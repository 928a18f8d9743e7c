"""Orphans: withdrawn once, dead records removed, stopped after the grace with ``stop``."""

from __future__ import annotations

import os
import signal

import pytest

from agent.keys import Keys
from agent.kinds import Context
from agent.orphans import Orphans, default_announcer, find_orphans
from agent.reconcile import Reconciler
from agent.runtime import Builder
from tests.helpers import alive, eventually, kill_recorded, process_records

SERVICE = """
  {name}:
    command: [sleep, "300"]
    port: {port}
    source: {{type: static, count: 1}}
"""
CONFIG = """
agent: {{cluster: orph}}
defaults:
  actuator: {{type: process}}
  announce: {{type: etcd, ttl: 30s}}
services:
"""


@pytest.fixture
def world(tmp_path, load_test_config, shipmate_plugins, embedded_store):
    """An api instance started and announced, then api removed from the config."""
    both = load_test_config(CONFIG.format() + SERVICE.format(name="web", port=20001)
                            + SERVICE.format(name="api", port=20002))
    context = Context(cluster="orph", store=embedded_store, state_dir=tmp_path)
    builder = Builder(shipmate_plugins, context)
    services = builder.services(both)
    api = services["api"]
    instance = api.actuator.start(api.spec(0, api.yaml_release))
    api.announcer.sync({"api": [instance]})
    key = api.announcer.key(instance)
    assert embedded_store.get(key) is not None
    web_only = load_test_config(CONFIG.format() + SERVICE.format(name="web", port=20001))
    services = builder.services(web_only)
    reconciler = Reconciler(services=services, store=embedded_store, keys=Keys("/shipmate/orph"))
    yield reconciler, services, builder, key, instance
    builder.close()
    kill_recorded(tmp_path)


def test_withdrawn_at_once_kept_running_and_stopped_after_the_grace(world, embedded_store):
    reconciler, services, builder, key, instance = world
    now = [1000.0]
    orphans = Orphans(default=lambda: default_announcer(builder), clock=lambda: now[0],
                      grace=60)
    reconciler.observe(check_health=False)
    assert list(reconciler.unowned) == [instance.name]
    assert orphans.handle(reconciler.unowned, services, policy="stop") == []
    assert embedded_store.get(key) is None
    pid = instance.ref["pid"]
    assert alive(pid)  # within the grace it keeps running

    now[0] += 61
    reconciler.observe(check_health=False)
    assert orphans.handle(reconciler.unowned, services, policy="stop") == []
    eventually(lambda: not alive(pid), timeout=15, what="the orphan stopped")
    assert not [r for r in process_records(builder.context.state_dir)
                if r["service"] == "api"]


def test_keep_leaves_it_running_and_removes_a_dead_record(world, embedded_store):
    reconciler, services, builder, key, instance = world
    orphans = Orphans(default=lambda: default_announcer(builder), grace=0)
    reconciler.observe(check_health=False)
    orphans.handle(reconciler.unowned, services, policy="keep")
    assert embedded_store.get(key) is None and alive(instance.ref["pid"])
    os.killpg(instance.ref["pid"], signal.SIGKILL)
    eventually(lambda: not alive(instance.ref["pid"]), timeout=10)
    reconciler.observe(check_health=False)
    assert not next(iter(reconciler.unowned.values())).running
    orphans.handle(reconciler.unowned, services, policy="keep")
    assert find_orphans([services["web"].actuator], services) == []


def test_find_orphans_names_one_service_only(world):
    _, services, _, _, instance = world
    actuators = [rt.actuator for rt in services.values()]
    assert [o.instance.name for o in find_orphans(actuators, services)] == [instance.name]
    assert find_orphans(actuators, services, "other") == []
