"""The loop, driven turn by turn with a fake clock: real processes, the embedded store."""

from __future__ import annotations

import json
import logging
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from agent import Actuator, Instance, InstanceSpec, hookimpl
from agent.config import load_config
from agent.deploys import request_deploy
from agent.keys import Keys
from agent.kinds import Context
from agent.leader import Leadership
from agent.loop import Loop, Settings
from agent.plugins import load_plugins
from agent.restarts import describe
from agent.runtime import Builder
from agent.store import StoreError
from tests.helpers import alive, eventually, kill_recorded, port_block, process_records


class Clock:
    """Monotonic time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_loop(load_test_config, embedded_store, shipmate_plugins, tmp_path):
    """``make_loop(yaml)`` -> a Loop over the YAML, with a fake clock at ``loop.clock``."""
    made: list[tuple[Loop, Builder]] = []

    def make(text: str, **settings) -> Loop:
        config = load_test_config(text)
        builder = Builder(shipmate_plugins, Context(config.agent.cluster, embedded_store,
                                                    tmp_path))
        keys = Keys(config.key_prefix)
        loop = Loop(store=embedded_store, keys=keys, services=builder.services(config),
                    leadership=Leadership(embedded_store, keys.leader),
                    settings=Settings.from_config(config.agent, **settings), clock=Clock())
        made.append((loop, builder))
        loop.turn()  # campaigns; its polls run on their own threads: run them here instead
        for name in loop.services:
            loop.poll_now(name)
        loop.pass_wanted = True  # as the store watch would
        return loop

    yield make
    for loop, builder in made:
        loop.close()
        loop.leadership.resign()
        builder.close()
    kill_recorded(tmp_path)


def settle(loop: Loop) -> None:
    """Turn, then follow the wake-ups of finished actions until none is under way (what the
    running loop does, with the fake clock standing still)."""
    loop.turn()
    while True:
        eventually(lambda: loop.actuation.pending == 0, 30, "the actions to end")
        if not loop.pass_wanted:
            return
        loop.turn()


def live(tmp_path, service: str) -> list[dict]:
    return [r for r in process_records(tmp_path) if r["service"] == service
            and isinstance(r.get("pid"), int) and r["pid"] > 0 and alive(r["pid"])]


CRASHING = """
agent: {cluster: loop}
services:
  crash:
    command: [sh, -c, "echo cannot find the thing >&2; exit 127"]
    source: {type: static, count: 1}
    actuator: {type: process}
"""


def test_a_crashing_slot_backs_off_and_status_says_so(make_loop, embedded_store, caplog):
    loop = make_loop(CRASHING)
    starts = []
    loop.emit = lambda hook, **kw: starts.append(kw) if hook == "shipmate_instance_started" \
        else None
    caplog.set_level(logging.WARNING, "shipmate.restarts")
    end = loop.clock.now + 40
    while loop.clock.now < end:
        settle(loop)
        before = len(starts)
        # let the started process exit for real before the next pass looks
        eventually(lambda: all(not i.running for i in loop.services["crash"].actuator.list()),
                   20, "the instance to exit")
        loop.run_pass()
        settle(loop)
        loop.clock.now += max(loop.timeout(), 0.5)
        assert len(starts) - before <= 1
    assert 4 <= len(starts) <= 7, f"{len(starts)} starts in 40 s"
    record = json.loads(embedded_store.get(loop.keys.service("crash", "problems")).value)
    words = [describe(p, record["problems"][0]["last_at"]) for p in record["problems"]]
    assert any("crash-looping" in w and "exit code 127" in w for w in words), words
    lines = [r for r in caplog.records if r.name == "shipmate.restarts"]
    assert len(lines) == len(starts)  # one line per attempt
    assert "cannot find the thing" in lines[-1].getMessage()
    assert loop.metrics.restarts.labels("crash")._value.get() == len(starts)


def test_an_instance_the_agent_is_stopping_is_no_crash(make_loop):
    """A TERM's exit (code 143) seen while the agent's own stop of that slot is under way
    counts no restart; the same exit on a free slot does."""
    from agent.reconcile import ServiceView

    loop = make_loop(CRASHING.replace("count: 1", "count: 0"))

    def exited(slot: int) -> dict[str, ServiceView]:
        gone = Instance(name=f"crash-{slot}", service="crash", slot=slot, version="v1",
                        host="127.0.0.1", port=None, running=False, exit_code=143)
        return {"crash": ServiceView("crash", instances=[gone])}

    loop._count_exits(exited(0), busy={("crash", 0)})
    assert loop.metrics.restarts.labels("crash")._value.get() == 0
    assert loop.restarts.may_start("crash", 0)
    loop._count_exits(exited(1), busy={("crash", 0)})
    assert loop.metrics.restarts.labels("crash")._value.get() == 1
    assert not loop.restarts.may_start("crash", 1)


def test_a_start_that_fails_backs_off_too(make_loop, tmp_path):
    loop = make_loop(CRASHING.replace('[sh, -c, "echo cannot find the thing >&2; exit 127"]',
                                      "[/no/such/command]"))
    settle(loop)
    assert loop.failures and "No such file" in loop.failures[0]
    assert not loop.restarts.may_start("crash", 0)
    failures = len(loop.failures)
    loop.clock.now += 0.5
    settle(loop)
    assert len(loop.failures) == failures  # held: the backoff has not run out
    loop.clock.now += 1.0
    settle(loop)
    assert len(loop.failures) == failures + 1


WORKERS = """
agent: {{cluster: loop, max_instances: {ceiling}, parallelism: 8}}
services:
  worker:
    command: [sleep, "300"]
    source: {{type: static, count: 1}}
    policy: {{max: 20}}
    actuator: {{type: process}}
"""


def test_the_agent_never_runs_more_than_max_instances(make_loop, embedded_store, tmp_path):
    loop = make_loop(WORKERS.format(ceiling=12))
    embedded_store.put(loop.keys.service("worker", "override"), "100000")
    most = 0
    for _ in range(10):
        settle(loop)
        most = max(most, len(live(tmp_path, "worker")))
    assert most == 12
    views = loop.reconciler.observe()
    loop.reconciler.plan(views)
    assert any("above agent.max_instances (12): running 12" in p
               for p in views["worker"].problems)
    record = json.loads(embedded_store.get(loop.keys.service("worker", "problems")).value)
    assert "max_instances" in json.dumps(record)


def test_a_huge_count_plans_a_bounded_pass(make_loop, embedded_store):
    loop = make_loop(WORKERS.format(ceiling=100_000))
    embedded_store.put(loop.keys.service("worker", "override"), str(10**9))
    views = loop.reconciler.observe()
    assert len(loop.reconciler.plan(views)) == loop.reconciler.limit


UNHEALTHY = """
agent: {{cluster: loop, interval: 10s}}
services:
  web:
    command: [sleep, "300"]
    port: {port}
    health: {{http: /}}
    source: {{type: static, count: 1}}
    actuator: {{type: process}}
"""


def test_an_unhealthy_instance_does_not_quicken_passes(make_loop, tmp_path):
    loop = make_loop(UNHEALTHY.format(port=port_block(1)))
    start = loop.clock.now
    while loop.clock.now - start < 20:
        settle(loop)
        loop.clock.now += loop.timeout()
    assert len(live(tmp_path, "web")) == 1
    assert loop.passes <= 6, f"{loop.passes} passes in 20 s"


def test_a_standby_does_not_spin(make_loop, embedded_store):
    embedded_store.put("/shipmate/loop/leader", '{"host": "elsewhere", "pid": 1}')
    loop = make_loop(WORKERS.format(ceiling=10))
    loop.turn()
    assert not loop.leadership.is_leader
    assert loop.timeout() >= loop.leadership.ttl / 3 - 0.01
    embedded_store.put(loop.keys.service("worker", "override"), "3")
    loop.request_pass()  # a store change reaches a standby too: it must not pass, nor spin
    loop.turn()
    assert loop.passes == 0 and not loop.pass_wanted
    assert loop.timeout() >= loop.leadership.ttl / 3 - 0.01


def test_a_broken_journal_is_one_problem_per_backoff_step(make_loop, embedded_store, tmp_path,
                                                          caplog):
    loop = make_loop(WORKERS.format(ceiling=10))
    settle(loop)
    pids = {r["pid"] for r in live(tmp_path, "worker")}
    embedded_store.put(loop.keys.service("worker", "deploy"),
                       json.dumps({"id": "x1", "phase": "running"}))  # no from, no to
    caplog.set_level(logging.ERROR, "shipmate.deploy")
    for _ in range(40):  # 10 s in quarter seconds
        loop.run_pass()
        eventually(lambda: not loop.deploys.busy("worker"), 10, "the deploy thread")
        loop.clock.now += 0.25
    # a journal that fails validation is marked refused once, with the reason
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and "from: Field required" in lines[0].getMessage()
    journal = json.loads(embedded_store.get(loop.keys.service("worker", "deploy")).value)
    assert journal["phase"] == "refused" and "from: Field required" in journal["error"]
    record = json.loads(embedded_store.get(loop.keys.service("worker", "problems")).value)
    assert any("deploy key refused" in p["text"] for p in record["problems"])
    assert {r["pid"] for r in live(tmp_path, "worker")} == pids  # nothing stopped


def test_a_slot_past_65535_is_never_started(make_loop, embedded_store, tmp_path):
    loop = make_loop("""
        agent: {cluster: loop}
        services:
          edge:
            command: [sleep, "300"]
            port: 65534
            source: {type: static, count: 1}
            actuator: {type: process}
        """)
    embedded_store.put(loop.keys.service("edge", "override"), "3")
    settle(loop)
    assert sorted(r["port"] for r in live(tmp_path, "edge")) == [65534, 65535]
    record = json.loads(embedded_store.get(loop.keys.service("edge", "problems")).value)
    assert any("port 65536 is past 65535" in p["text"] for p in record["problems"])


class StuckStops(Actuator):
    """One instance on slot 5 that cannot be stopped (an engine refusing every stop)."""

    type_name = "stuck"
    stops = 0
    version = ""  # the YAML's release, set by the test (so that no deploy is due)

    def list(self) -> list[Instance]:
        return [Instance(name=f"loop-worker-5-{self.version}", service="worker", slot=5,
                         version=self.version, host="127.0.0.1", port=None, cluster="loop")]

    def start(self, spec: InstanceSpec) -> Instance:
        raise AssertionError("nothing to start")

    def stop(self, instance: Instance, grace: float) -> None:
        type(self).stops += 1
        raise RuntimeError("the engine refuses")


class StuckPlugin:
    @staticmethod
    @hookimpl
    def shipmate_actuator_types():
        return [StuckStops]


def test_a_stop_that_fails_is_retried_later_not_at_once(load_test_config, embedded_store,
                                                        tmp_path):
    plugins = load_plugins(extra=[("stuck", StuckPlugin)])
    config = load_config(_write(tmp_path, """
        agent: {cluster: loop}
        services:
          worker:
            source: {type: static, count: 0}
            actuator: {type: stuck}
        """), plugins)
    builder = Builder(plugins, Context("loop", embedded_store, tmp_path))
    keys = Keys(config.key_prefix)
    services = builder.services(config)
    StuckStops.version = services["worker"].yaml_release.version
    loop = Loop(store=embedded_store, keys=keys, services=services,
                leadership=Leadership(embedded_store, keys.leader),
                settings=Settings.from_config(config.agent), clock=Clock())
    try:
        loop.turn()
        loop.poll_now("worker")
        for _ in range(20):  # the clock stands still: 20 turns, woken each time
            loop.pass_wanted = True
            settle(loop)
        assert StuckStops.stops == 1  # one try; the next one waits its delay
        assert loop.failures and "the engine refuses" in loop.failures[0]
        loop.clock.now += 1.0
        settle(loop)  # the retry is due: no wake-up needed
        assert StuckStops.stops == 2
    finally:
        loop.close()
        loop.leadership.resign()
        builder.close()


def _write(folder: Path, text: str) -> Path:
    path = folder / "stuck.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_deploy_runs_no_more_than_max_instances(make_loop, embedded_store):
    loop = make_loop(WORKERS.format(ceiling=3) + "    deploy: {type: rolling, images: [v2]}\n")
    settle(loop)
    started = []
    loop.emit = lambda hook, **kw: started.append(kw) if hook == "shipmate_deploy_started" \
        else None
    embedded_store.put(loop.keys.service("worker", "override"), "50")
    request_deploy(embedded_store, loop.keys, "worker", image="v2", by="t", reason="t")
    loop.run_pass()
    (begun,) = eventually(lambda: started, 30, "the deploy to begin")
    assert begun["deploy"].desired == 3


DRAINING = """
agent: {cluster: loop}
services:
  web:
    command: [sleep, "300"]
    source: {type: static, count: 2}
    actuator: {type: process}
    announce: {type: etcd, ttl: 30s, drain: 3s}
  other:
    command: [sleep, "300"]
    source: {type: static, count: 0}
    actuator: {type: process}
"""


def test_stops_withdraw_then_drain_together_while_other_work_goes_on(make_loop, embedded_store,
                                                                      tmp_path):
    loop = make_loop(DRAINING)
    settle(loop)
    web = live(tmp_path, "web")
    assert len(web) == 2
    eventually(lambda: len(embedded_store.get_prefix("/services/web/")) == 2, 10,
               "both announced")
    keys = Keys("/shipmate/loop")
    embedded_store.put(keys.service("web", "override"), "0")
    embedded_store.put(keys.service("other", "override"), "1")
    asked = time.monotonic()
    loop.pass_wanted = True  # as the store watch would
    loop.turn()
    # withdrawn at once, still running through the drain; the other service's start goes on
    eventually(lambda: not embedded_store.get_prefix("/services/web/"), 2, "both withdrawn")
    eventually(lambda: len(live(tmp_path, "other")) == 1, 2.5, "the other service started")
    assert all(alive(r["pid"]) for r in web), "stopped before the drain was over"
    eventually(lambda: not any(alive(r["pid"]) for r in web), 20, "both stopped")
    took = time.monotonic() - asked
    assert 2.9 <= took < 5.9, f"two 3 s drains took {took:.1f}s: not side by side"


QUIET = """
agent: {cluster: quiet, interval: 10s, resync: 30s}
services:
  web:
    command: [sleep, "60"]
    source: {type: static, count: 1}
    actuator: {type: process}
  other:
    command: [sleep, "60"]
    source: {type: static, count: 1}
    actuator: {type: process}
"""


def test_a_watched_pass_reads_only_what_changed_and_resyncs_at_interval(
        make_loop, embedded_store, tmp_path):
    loop = make_loop(QUIET)
    settle(loop)
    watch = embedded_store.watch(loop.keys.services, loop.store_changed)
    try:
        loop.store_changed([])  # as the watch's first resync would: everything read once
        settle(loop)
        def unchanged_pass_reads_nothing() -> bool:  # once the watch caught up with the
            before = embedded_store.round_trips      # agent's own writes (its releases)
            loop.run_pass()
            return embedded_store.round_trips == before

        eventually(unchanged_pass_reads_nothing, 30, "an unchanged pass to read nothing")
        reads = loop.reconciler.full_reads

        embedded_store.put(loop.keys.service("web", "override"), "2")
        eventually(lambda: "web" in loop.reconciler._dirty, 30, "the watch to see the override")
        loop.request_pass()  # as the agent's watch does too
        settle(loop)
        assert len(live(tmp_path, "web")) == 2 and len(live(tmp_path, "other")) == 1
        assert loop.reconciler.full_reads == reads  # one service read, not every key

        # the start of an override goes out before the pass looks at every service: here
        # the look at every service fails, and the start was handed out all the same
        embedded_store.put(loop.keys.service("web", "override"), "3")
        eventually(lambda: "web" in loop.reconciler._dirty, 30, "the watch to see the override")
        whole = loop.reconciler.observe

        def unreachable(**kwargs):
            raise StoreError("the whole read hangs")

        loop.reconciler.observe = unreachable
        loop.run_pass()
        loop.reconciler.observe = whole
        eventually(lambda: len(live(tmp_path, "web")) == 3, 30, "the third instance")
        assert len(live(tmp_path, "other")) == 1
    finally:
        watch.cancel()
    # a change the watch never reported is seen at the next full resync (agent.resync)
    embedded_store.put(loop.keys.service("other", "override"), "0")
    loop.clock.now += 10
    settle(loop)  # a pass at interval syncs announcements, and reads nothing
    assert len(live(tmp_path, "other")) == 1
    loop.clock.now += 20
    settle(loop)
    eventually(lambda: not live(tmp_path, "other"), 30, "other to stop at the resync")
    assert loop.reconciler.full_reads == reads + 1


SETTLED = """
agent: {cluster: settled, interval: 10s}
services:
  web:
    command: [sleep, "60"]
    source: {type: static, count: 1}
    actuator: {type: process}
    announce: {type: etcd, ttl: 30s, drain: 0s}
  other:
    command: [sleep, "60"]
    source: {type: static, count: 1}
    actuator: {type: process}
    announce: {type: etcd, ttl: 30s, drain: 0s}
"""


def test_a_settled_service_is_left_alone_until_something_about_it_changes(
        make_loop, embedded_store, tmp_path):
    loop = make_loop(SETTLED)
    settle(loop)
    watch = embedded_store.watch(loop.keys.services, loop.store_changed)
    try:
        loop.store_changed([])
        settle(loop)

        def nothing_to_look_at() -> bool:  # the agent's own writes came back, all healthy
            loop.run_pass()
            return not loop.reconciler.fresh

        eventually(nothing_to_look_at, 30, "a pass with every service settled")
        other = loop.reconciler.views["other"]
        events: list[tuple[str, dict]] = []
        loop.emit = lambda hook, **kwargs: events.append((hook, kwargs))
        embedded_store.put(loop.keys.service("web", "override"), "2")
        eventually(lambda: "web" in loop.reconciler._dirty, 30, "the watch to see the override")
        loop.run_pass()
        assert set(loop.reconciler.fresh) == {"web"}  # only what changed is looked at
        assert loop.reconciler.views["other"] is other
        assert ("shipmate_override_changed", {"service": "web", "old": None, "new": 2}) in events
        settle(loop)
        eventually(lambda: len(live(tmp_path, "web")) == 2, 30, "the second web instance")

        # a settled service whose instance dies is looked at (its list changed) and restarted
        (crashed,) = live(tmp_path, "other")
        os.kill(crashed["pid"], signal.SIGKILL)
        eventually(lambda: not alive(crashed["pid"]), 30, "the instance to die")
        eventually(lambda: (loop.run_pass(), "other" in loop.reconciler.fresh)[1], 30,
                   "the pass to look at the crashed service")
        loop.clock.now += 2  # past the first restart's backoff (1 s)
        settle(loop)
        eventually(lambda: len(live(tmp_path, "other")) == 1
                   and live(tmp_path, "other")[0]["pid"] != crashed["pid"], 30, "a restart")
    finally:
        watch.cancel()
    # (other stays under watch while its restart is young: its backoff resets after 10 min)
    assert "other" in loop.reconciler.fresh
    # an announcement deleted behind the agent's back comes back at the full resync
    eventually(lambda: (loop.run_pass(), "web" not in loop.reconciler.fresh)[1], 30,
               "web settled")
    gone, _ = sorted(embedded_store.get_prefix("/services/web/"))
    embedded_store.delete(gone)
    loop.run_pass()
    assert gone not in embedded_store.get_prefix("/services/web/")  # no resync yet
    loop.clock.now += 10
    loop.run_pass()
    assert gone in embedded_store.get_prefix("/services/web/")


# A web server that answers once the file `ready` exists and stops answering (while its
# instance keeps running) once `sick` exists.
HEALTH = """
agent: {{cluster: loop, interval: 60s}}
services:
  web:
    command: [sh, -c, "while [ ! -e {tmp}/ready ]; do sleep 0.02; done;
              python3 -m http.server {{port}} --bind 127.0.0.1 & while [ ! -e {tmp}/sick ];
              do sleep 0.05; done; kill $!; exec sleep 300"]
    port: {port}
    health: {{http: /, timeout: 1s, interval: 200ms}}
    source: {{type: static, count: 1}}
    actuator: {{type: process}}
    announce: {{type: etcd, ttl: 30s, drain: {drain}}}
"""


def health_yaml(tmp_path: Path, drain: str = "0s") -> str:
    return HEALTH.format(tmp=tmp_path, port=port_block(1), drain=drain)


def started(loop: Loop) -> Instance:
    """Settle, then the one running instance of web once a probe has looked at it."""
    settle(loop)
    (instance,) = eventually(lambda: loop.reconciler.views["web"].running, 20, "web running")
    eventually(lambda: loop.prober.health(instance.name) is not None, 20, "a first probe")
    return instance


def test_an_instance_is_announced_when_it_passes_and_withdrawn_when_it_fails_with_no_pass(
        make_loop, embedded_store, tmp_path):
    loop = make_loop(health_yaml(tmp_path))
    instance = started(loop)
    assert not embedded_store.get_prefix("/services/web/")
    passes = loop.passes
    (tmp_path / "ready").touch()
    ready = time.monotonic()
    eventually(lambda: embedded_store.get_prefix("/services/web/"), 20, "the announcement")
    took = time.monotonic() - ready
    assert json.loads(embedded_store.get(f"/services/web/{instance.name}").value)["port"] \
        == instance.port
    (tmp_path / "sick").touch()
    eventually(lambda: not embedded_store.get_prefix("/services/web/"), 20, "the withdrawal")
    # no pass ran in between (this test turns the loop, and did not): the probe did; it
    # asked for one (to look at that service alone: its gauges and problems)
    assert loop.passes == passes and loop.pass_wanted
    loop.run_pass()
    assert set(loop.reconciler.fresh) == {"web"}
    assert len(live(tmp_path, "web")) == 1  # still running: only its health changed
    print(f"announced {took * 1000:.0f} ms after `ready` (a python3 start included)")


def test_a_probe_that_hangs_does_not_delay_passes(make_loop, tmp_path):
    loop = make_loop(UNHEALTHY.format(port=port_block(1)).replace(
        '[sleep, "300"]',
        '''[python3, -c, "import socket, time; s = socket.socket();
            s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(300)"]''').replace(
        "health: {http: /}", "health: {http: /, timeout: 20s}"))
    settle(loop)
    (instance,) = eventually(lambda: loop.reconciler.views["web"].running, 20, "web running")

    def hanging() -> bool:  # it listens, never answers: the probe waits out its 20 s
        target = loop.prober._in_flight.get(instance.name)
        return target is not None and time.monotonic() - target.started > 0.5

    eventually(hanging, 20, "a probe hanging on the instance")
    probe = loop.prober._in_flight[instance.name].token
    passes, began = loop.passes, time.monotonic()
    for _ in range(5):
        loop.run_pass()
    assert loop.passes == passes + 5
    assert time.monotonic() - began < 10, "the passes waited for the probe"
    assert loop.prober._in_flight[instance.name].token == probe  # the same probe, still hung
    assert loop.reconciler.views["web"].healthy == []  # not healthy yet, as before


def test_a_deposed_agents_probes_announce_nothing(embedded_store, shipmate_plugins,
                                                   load_test_config, tmp_path):
    from agent.leader import FencedStore

    config = load_test_config(health_yaml(tmp_path))
    keys = Keys(config.key_prefix)
    leadership = Leadership(embedded_store, keys.leader)
    fenced = FencedStore(embedded_store, leadership)  # as the agent writes
    builder = Builder(shipmate_plugins, Context("loop", fenced, tmp_path))
    loop = Loop(store=fenced, keys=keys, services=builder.services(config),
                leadership=leadership, settings=Settings.from_config(config.agent),
                clock=Clock())
    other = Leadership(embedded_store, keys.leader)
    try:
        loop.turn()
        loop.poll_now("web")
        loop.pass_wanted = True
        started(loop)
        # another agent takes over (this one's lease ran out while it was paused, say)
        embedded_store.delete(keys.leader)
        assert other.campaign()
        seen = []
        handler = loop.prober.on_change

        def recorded(instance: Instance, healthy: bool, was: bool | None) -> None:
            try:
                assert handler is not None
                handler(instance, healthy, was)
            finally:
                seen.append(healthy)

        loop.prober.on_change = recorded
        (tmp_path / "ready").touch()
        eventually(lambda: True in seen, 20, "the probe to see it pass, and its handler to end")
        eventually(loop.health_synced, 10, "the change handled")
        assert embedded_store.get_prefix("/services/web/") == {}
    finally:
        other.resign()
        loop.close()
        leadership.resign()
        builder.close()
        kill_recorded(tmp_path)


def test_a_late_probe_result_does_not_announce_an_instance_being_stopped(
        make_loop, embedded_store, tmp_path):
    loop = make_loop(health_yaml(tmp_path, drain="3s"))
    (tmp_path / "ready").touch()
    instance = started(loop)
    key = f"/services/web/{instance.name}"
    eventually(lambda: embedded_store.get(key), 20, "the announcement")
    embedded_store.put(loop.keys.service("web", "override"), "0")
    loop.pass_wanted = True
    loop.turn()  # withdraws, drains 3 s, then stops
    eventually(lambda: embedded_store.get(key) is None, 10, "the withdrawal")
    loop._health_changed(instance, True, False)  # a probe that saw it pass, reported late
    eventually(loop.health_synced, 10, "the change handled")
    assert embedded_store.get(key) is None
    assert len(live(tmp_path, "web")) == 1, "stopped before the drain was over"
    eventually(lambda: not live(tmp_path, "web"), 20, "the stop")
    assert embedded_store.get(key) is None
