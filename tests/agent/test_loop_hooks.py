"""The loop's plugin hooks, on real processes and the embedded store: a veto holds an
action (and status names the plugin), and the leadership, override, health and
crash-loop events fire once per change."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import hookimpl
from agent.cli import main
from agent.config import load_config
from agent.keys import Keys
from agent.kinds import Context
from agent.leader import Leadership
from agent.loop import Loop, Settings
from agent.plugins import load_plugins
from agent.runtime import Builder
from tests.helpers import alive, eventually, kill_recorded, port_block, process_records


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def hooked(write_config, embedded_store, tmp_path):
    """``hooked(yaml, plugin)`` -> (a Loop whose events and vetoes go to ``plugin``
    through the plugin manager, the config file's path)."""
    made: list[tuple[Loop, Builder]] = []

    def make(text: str, plugin: object, ttl: float = 15.0) -> tuple[Loop, Path]:
        path = write_config(text)
        plugins = load_plugins(extra=[("test-plugin", plugin)])
        config = load_config(path, plugins)
        builder = Builder(plugins, Context(config.agent.cluster, embedded_store, tmp_path))
        keys = Keys(config.key_prefix)
        loop = Loop(store=embedded_store, keys=keys, services=builder.services(config),
                    leadership=Leadership(embedded_store, keys.leader, ttl=ttl),
                    settings=Settings.from_config(config.agent), clock=Clock(),
                    emit=plugins.call_event, allow=plugins.allow_action)
        made.append((loop, builder))
        loop.turn()
        for name in loop.services:
            loop.poll_now(name)
        loop.pass_wanted = True
        return loop, path

    yield make
    for loop, builder in made:
        loop.close()
        loop.leadership.resign()
        builder.close()
    kill_recorded(tmp_path)


def settle(loop: Loop) -> None:
    loop.turn()
    while True:
        eventually(lambda: loop.actuation.pending == 0, 30, "the actions to end")
        if not loop.pass_wanted:
            return
        loop.turn()


def live(tmp_path: Path) -> list[dict]:
    return [r for r in process_records(tmp_path)
            if isinstance(r.get("pid"), int) and r["pid"] > 0 and alive(r["pid"])]


SLEEPERS = """
agent: {cluster: hooks, store: {path: state.db}}
services:
  web:
    command: [sleep, "300"]
    source: {type: static, count: 2}
    actuator: {type: process}
"""


class Freeze:
    """Holds every stop while ``frozen``; a real plugin would read a calendar."""

    def __init__(self) -> None:
        self.frozen = True
        self.asked: list[str] = []

    @hookimpl
    def shipmate_allow_action(self, action):
        self.asked.append(f"{action.verb} {action.service} {action.slot}")
        if self.frozen and action.verb == "stop":
            return "change freeze until 18:00"
        return None


def status(path: Path) -> dict:
    result = CliRunner().invoke(main, ["status", "-c", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["services"][0]


def test_a_held_scale_down_is_not_run_and_status_names_the_plugin(hooked, embedded_store,
                                                                   tmp_path):
    freeze = Freeze()
    loop, path = hooked(SLEEPERS, freeze)
    settle(loop)
    assert len(live(tmp_path)) == 2  # starts are allowed
    embedded_store.put(loop.keys.service("web", "override"), "1")
    passes = loop.passes
    for _ in range(3):  # held at every pass, and asked again at each
        loop.pass_wanted = True
        settle(loop)
    assert len(live(tmp_path)) == 2
    assert freeze.asked.count("stop web 1") == loop.passes - passes >= 3
    web = status(path)
    assert web["held"] == [{"verb": "stop", "slot": 1, "plugin": "test-plugin",
                            "reason": "change freeze until 18:00"}]
    assert ("stop of slot 1 (scale down to 1) held by plugin 'test-plugin': "
            "change freeze until 18:00") in web["problems"]
    freeze.frozen = False
    loop.pass_wanted = True
    settle(loop)
    eventually(lambda: len(live(tmp_path)) == 1, 30, "the stop once the freeze ends")
    loop.pass_wanted = True
    settle(loop)
    assert status(path)["held"] == []


def test_a_broken_veto_holds_stops_and_lets_starts_go(hooked, embedded_store, tmp_path):
    def broken(action):
        raise RuntimeError("calendar unreachable")

    loop, path = hooked(SLEEPERS, types.SimpleNamespace(
        shipmate_allow_action=hookimpl(broken)))
    settle(loop)
    assert len(live(tmp_path)) == 2  # crash recovery and scale-ups never wait on it
    embedded_store.put(loop.keys.service("web", "override"), "0")
    loop.pass_wanted = True
    settle(loop)
    assert len(live(tmp_path)) == 2
    held = status(path)["held"]
    assert [h["slot"] for h in held] == [1, 0]
    assert held[0]["reason"] == "failed: RuntimeError: calendar unreachable"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    @hookimpl
    def shipmate_leadership_gained(self, term):
        self.events.append(("gained", term))

    @hookimpl
    def shipmate_leadership_lost(self, term, reason):
        self.events.append(("lost", term, reason))

    @hookimpl
    def shipmate_override_changed(self, service, old, new):
        self.events.append(("override", service, old, new))

    @hookimpl
    def shipmate_health_changed(self, instance, healthy):
        self.events.append(("health", instance.slot, healthy))

    @hookimpl
    def shipmate_crash_loop(self, service, slot, restarts, last_exit, next_try_in):
        self.events.append(("crash-loop", service, slot, restarts, last_exit, next_try_in))

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]


def test_leadership_events_when_won_lost_to_another_and_stopped(hooked, embedded_store):
    recorder = Recorder()
    loop, _ = hooked(SLEEPERS, recorder, ttl=3.0)
    assert recorder.of("gained") == [("gained", 1)]
    loop.turn()
    assert recorder.of("gained") == [("gained", 1)] and recorder.of("lost") == []
    embedded_store.put(loop.keys.leader, json.dumps({"host": "elsewhere", "token": "x"}))
    eventually(lambda: not loop.leadership.is_leader, 20, "the keepalive to see the takeover")
    loop.turn()
    assert recorder.of("lost") == [("lost", 1, "the leader key no longer names this agent")]
    embedded_store.delete(loop.keys.leader)
    loop.next_campaign = 0.0
    loop.turn()
    assert recorder.of("gained") == [("gained", 1), ("gained", 2)]
    loop.close()
    assert recorder.of("lost")[-1] == ("lost", 2, "the agent stopped")


def test_override_events_on_set_change_and_clear_only(hooked, embedded_store):
    recorder = Recorder()
    loop, _ = hooked(SLEEPERS.replace("count: 2", "count: 0"), recorder)
    key = loop.keys.service("web", "override")
    steps = [("put", "1"), ("none", None), ("put", "3"), ("delete", None)]
    for what, value in steps:
        if what == "put":
            embedded_store.put(key, value)
        elif what == "delete":
            embedded_store.delete(key)
        loop.pass_wanted = True
        settle(loop)
    assert recorder.of("override") == [("override", "web", None, 1),
                                       ("override", "web", 1, 3),
                                       ("override", "web", 3, None)]


def test_health_events_when_an_instance_passes_then_fails(hooked, tmp_path):
    port = port_block(1)
    www = tmp_path / "www"
    www.mkdir()
    (www / "ok").write_text("ok")
    recorder = Recorder()
    loop, _ = hooked(f"""
        agent: {{cluster: hooks, store: {{path: state.db}}}}
        services:
          web:
            command: [python3, -m, http.server, "{{port}}", --bind, 127.0.0.1,
                      --directory, "{www}"]
            port: {port}
            health: {{http: /ok, timeout: 2s}}
            source: {{type: static, count: 1}}
            actuator: {{type: process}}
        """, recorder)

    def passes() -> list[tuple]:
        loop.pass_wanted = True
        settle(loop)
        return recorder.of("health")

    eventually(lambda: passes() == [("health", 0, True)], 30, "the instance to pass")
    (www / "ok").unlink()
    eventually(lambda: passes() == [("health", 0, True), ("health", 0, False)], 30,
               "the instance to fail")
    passes()
    assert len(recorder.of("health")) == 2  # once per change, not once per pass


def test_a_crash_loop_is_one_event_at_its_start(hooked):
    recorder = Recorder()
    loop, _ = hooked("""
        agent: {cluster: hooks, store: {path: state.db}}
        services:
          crash:
            command: [sh, -c, "exit 3"]
            source: {type: static, count: 1}
            actuator: {type: process}
        """, recorder)
    for _ in range(3):  # three exits, each restarted after its backoff
        settle(loop)
        eventually(lambda: all(not i.running for i in loop.services["crash"].actuator.list()),
                   20, "the instance to exit")
        loop.run_pass()
        settle(loop)
        loop.clock.now += 600
    assert loop.restarts.slots[("crash", 0)].failures >= 2
    assert recorder.of("crash-loop") == [
        ("crash-loop", "crash", 0, 1, "exited (exit code 3)", 1.0)]
