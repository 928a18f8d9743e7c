"""Deploys through the real agent and the real CLI, with local processes.

Each release is a folder served by its own ``python3 -m http.server``; the
``broken`` release exits at once, so it never passes its health check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Literal

import pytest

from agent import (
    DeployError,
    DeployJournal,
    Deployment,
    LockLost,
    Phase,
    Release,
    Strategy,
    StrategyConfig,
    hookimpl,
)
from agent.deploys import DeployRunner, request_deploy
from agent.keys import Keys, parse_object
from agent.plugins import load_plugins
from agent.reconcile import ServiceView
from agent.runtime import Agent
from tests.helpers import eventually, kill_recorded, port_block, process_records

CONFIG = """
agent: {{cluster: dep, interval: 5s}}
services:
  web:
    image: v1
    command: [sh, -c, 'test "{{image}}" != broken && exec python3 -m http.server {{port}}
              --bind 127.0.0.1 --directory {root}/{{image}}']
    port: {port}
    health: {{http: /, timeout: 1s}}
    source: {{type: static, count: 4}}
    policy: {{max: 5}}
    actuator: {{type: process}}
    announce: {{type: etcd, ttl: 10s}}
    deploy: {{type: rolling, batch: 1, health_timeout: 5s, images: ["v[0-9]", broken]}}
"""


def body(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=0.5) as answer:
            return answer.read().decode().strip()
    except OSError:
        return None


class Sampler(threading.Thread):
    """Counts the instances serving, every 50 ms, while a deploy runs."""

    def __init__(self, ports: range) -> None:
        super().__init__(daemon=True)
        self.ports, self.samples, self.done = ports, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append(sum(body(p) is not None for p in self.ports))
            time.sleep(0.05)


class Observer:
    """A plugin that records the deploy events it sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    @hookimpl
    def shipmate_deploy_started(self, service, deploy):
        self.seen.append(("started", deploy.to.image))

    @hookimpl
    def shipmate_deploy_progressed(self, service, deploy):
        self.seen.append(("progressed", deploy.phase))

    @hookimpl
    def shipmate_deploy_finished(self, service, deploy):
        self.seen.append(("finished", deploy.to.image))

    @hookimpl
    def shipmate_deploy_rolled_back(self, service, deploy, reason):
        self.seen.append(("rolled back", reason))

    @hookimpl
    def shipmate_instance_stopped(self, instance, reason):
        self.seen.append(("stopped", reason))


@pytest.fixture
def observer() -> Observer:
    return Observer()


class Recreate(Strategy):
    """A third party's strategy, written with ``agent``'s exports only: stop every old
    instance, then start the new ones (a gap in service, by design)."""

    type_name = "recreate"

    def run(self, deploy: Deployment) -> None:
        old = [i for i in deploy.instances() if i.version != deploy.target.version]
        deploy.progress(0, deploy.desired, f"stopping {len(old)}")
        deploy.stop_all(old)
        running = {i.slot for i in deploy.instances() if i.running}
        started = [deploy.start(slot) for slot in range(deploy.desired) if slot not in running]
        deploy.wait_healthy(started, self.config.health_timeout)
        deploy.progress(deploy.desired, deploy.desired, "all started")


class RecreatePlugin:
    @hookimpl
    def shipmate_strategy_types(self) -> list[type[Strategy]]:
        return [Recreate]


@pytest.fixture
def cluster(write_config, tmp_path, observer):
    for release in ("v1", "v2", "v3"):
        (tmp_path / release).mkdir()
        (tmp_path / release / "index.html").write_text(release)
    port = port_block(8)
    path = write_config(CONFIG.format(root=tmp_path, port=port))
    agent = Agent(path, plugins=load_plugins(extra=[("observer", observer),
                                                    ("recreate", RecreatePlugin())]))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    eventually(lambda: all(body(port + i) == "v1" for i in range(4)), timeout=20,
               what="4 instances of v1")
    yield agent, path, port
    agent.stop()
    thread.join(20)
    kill_recorded(tmp_path)


def shipmate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60)


def release(agent: Agent) -> dict:
    entry = agent.store.get(Keys("/shipmate/dep").service("web", "release"))
    return json.loads(entry.value)


def announced(agent: Agent) -> list[dict]:
    return [json.loads(e.value) for e in agent.store.get_prefix("/services/web/").values()]


def test_rolling_deploy_keeps_three_serving_then_a_broken_release_rolls_back(cluster):
    agent, path, port = cluster
    sampler = Sampler(range(port, port + 4))
    sampler.start()
    result = shipmate("deploy", "web", "--image", "v2", "-c", str(path))
    sampler.done.set()
    sampler.join()
    assert result.returncode == 0, result.stderr
    assert "web: deployed v2" in result.stdout
    assert min(sampler.samples) >= 3, sampler.samples
    assert [body(port + i) for i in range(4)] == ["v2"] * 4
    assert release(agent)["image"] == "v2" and release(agent)["previous"]["image"] == "v1"
    eventually(lambda: len(announced(agent)) == 4 and {a["version"] for a in announced(
        agent)} == {release(agent)["version"]}, timeout=10, what="4 announcements of v2")

    broken = shipmate("deploy", "web", "--image", "broken", "-c", str(path))
    assert broken.returncode == 1
    assert "deploy of web rolled back" in broken.stderr
    assert "exited before passing its health check (GET /)" in broken.stderr
    assert [body(port + i) for i in range(4)] == ["v2"] * 4
    assert release(agent)["image"] == "v2"
    assert release(agent)["deploy"]["result"] == "rolled-back"


def test_deploy_events_reach_plugins(cluster, observer):
    agent, path, port = cluster
    assert shipmate("deploy", "web", "--image", "v2", "-c", str(path)).returncode == 0
    assert observer.seen[0] == ("started", "v2"), observer.seen
    assert observer.seen[-1] == ("finished", "v2"), observer.seen
    assert ("progressed", "running") in observer.seen
    # every v1 instance was stopped by the deploy; no new one crashed (say, on a taken port)
    stops = [e for e in observer.seen if e[0] == "stopped"]
    assert stops == [("stopped", "deploy")] * 4, observer.seen
    assert shipmate("deploy", "web", "--image", "broken", "-c", str(path)).returncode == 1
    kind, reason = observer.seen[-1]
    assert kind == "rolled back" and "health check" in reason


def test_a_third_party_strategy_deploys_through_the_public_api(cluster, observer):
    agent, path, port = cluster
    request_deploy(agent.store, Keys("/shipmate/dep"), "web", image="v2", strategy="recreate",
                   by="t", reason="t")
    eventually(lambda: release(agent)["image"] == "v2", timeout=30, what="v2 recorded")
    assert [body(port + i) for i in range(4)] == ["v2"] * 4
    assert release(agent)["deploy"]["result"] == "finished"
    assert ("started", "v2") in observer.seen and ("progressed", "running") in observer.seen


def test_rollback_returns_to_the_previous_release(cluster):
    agent, path, port = cluster
    assert shipmate("deploy", "web", "--image", "v3", "-c", str(path)).returncode == 0
    result = shipmate("rollback", "web", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert [body(port + i) for i in range(4)] == ["v1"] * 4
    assert release(agent)["image"] == "v1"


def test_scaling_pauses_during_a_deploy_and_the_count_is_kept(cluster):
    agent, path, port = cluster
    keys = Keys("/shipmate/dep")
    agent.store.put(keys.service("web", "override"), "3")
    eventually(lambda: body(port + 3) is None, what="scale to 3")
    shipmate("deploy", "web", "--image", "v2", "--no-wait", "-c", str(path))
    eventually(lambda: agent.store.get(keys.service("web", "deploy")) and json.loads(
        agent.store.get(keys.service("web", "deploy")).value)["phase"] == "running",
        what="the deploy to run")
    journal = json.loads(agent.store.get(keys.service("web", "deploy")).value)
    assert journal["desired"] == 3
    eventually(lambda: agent.store.get(keys.service("web", "deploy")) is None, timeout=30)
    assert [body(port + i) for i in range(3)] == ["v2"] * 3 and body(port + 3) is None


def test_a_second_deploy_is_refused_while_one_holds_the_service(cluster):
    agent, path, _ = cluster
    # a deploy paused on a failure holds the service until ops decide (a running one would
    # finish within the time the CLI takes to start on a loaded machine)
    request_deploy(agent.store, Keys("/shipmate/dep"), "web", image="v2", by="t", reason="t")
    key = Keys("/shipmate/dep").service("web", "deploy")
    entry = agent.store.get(key)
    paused = agent.store.replace(key, json.dumps({**json.loads(entry.value), "phase": "paused",
                                                  "error": "held by the test"}), entry.revision)
    second = shipmate("deploy", "web", "--image", "v3", "--no-wait", "-c", str(path))
    # (the agent may have picked the request up first: then it runs, and says so)
    assert second.returncode == 1
    assert ("is paused" if paused else "already in progress") in second.stderr


def test_a_changed_config_is_deployed_on_reload(cluster, write_config, tmp_path):
    agent, path, port = cluster
    text = path.read_text().replace("image: v1", "image: v3")
    path.write_text(text)
    agent.request_reload()
    eventually(lambda: all(body(port + i) == "v3" for i in range(4)), timeout=30,
               what="v3 everywhere")
    eventually(lambda: release(agent)["image"] == "v3" and release(agent)["by"] == "config")


def test_a_deploy_whose_strategy_cannot_run_fails_once_and_changes_nothing(cluster):
    agent, path, port = cluster
    keys = Keys("/shipmate/dep")
    request_deploy(agent.store, keys, "web", image="v2", strategy="nope", by="t", reason="t")

    def journal() -> dict:
        return json.loads(agent.store.get(keys.service("web", "deploy")).value)

    eventually(lambda: journal()["phase"] == "failed", what="the deploy to fail")
    assert "cannot run strategy 'nope'" in journal()["error"]
    assert [body(port + i) for i in range(4)] == ["v1"] * 4
    status = json.loads(shipmate("status", "--json", "-c", str(path)).stdout)
    assert status["services"][0]["deploy"]["phase"] == "failed"


def test_a_changed_port_in_the_config_is_deployed(cluster):
    agent, path, port = cluster
    path.write_text(path.read_text().replace(f"port: {port}", f"port: {port + 4}"))
    agent.request_reload()
    eventually(lambda: all(body(port + 4 + i) == "v1" for i in range(4)), timeout=30,
               what="v1 on the new ports")
    eventually(lambda: release(agent)["port"] == port + 4, what="the release recorded")
    assert all(body(port + i) is None for i in range(4))


VERSION = "0123456789"
RELEASE = {"image": "v1", "port": 8080, "version": VERSION, "spec": VERSION}
HAND_WRITTEN = {  # what someone with write access to etcd might put in the deploy key
    "an image outside deploy.images": (
        {"id": "h1", "phase": "requested", "image": "sec/web:v2"}, "not among"),
    "an image that is an option": (
        {"id": "h2", "phase": "requested", "image": "--privileged"}, "not an image reference"),
    "a number for an image": ({"id": "h3", "phase": "requested", "image": 5}, "image"),
    "a negative port": ({"id": "h4", "phase": "requested", "image": "v2", "port": -1}, "port"),
    "a command": ({"id": "h5", "phase": "requested", "image": "v2", "command": ["sh"]},
                  "command: Extra inputs are not permitted"),
    "desired 6 above the max": (
        {"id": "h6", "phase": "running", "desired": 6, "from": RELEASE,
         "to": {**RELEASE, "image": "v2"}}, "desired 6 is above the service's maximum (5)"),
    "a version that is a path": (
        {"id": "h7", "phase": "running", "desired": 2, "from": RELEASE,
         "to": {**RELEASE, "version": "x/../../../tmp/escape"}}, "to.version"),
    "a count as a string": (
        {"id": "h8", "phase": "running", "desired": "2", "from": RELEASE, "to": RELEASE},
        "desired: Input should be a valid integer"),
    "not JSON": ("{nope", "does not hold a JSON object"),
    "no phase": ({"id": "h9"}, "is not a deploy phase"),
}


def test_hand_written_deploy_keys_are_refused_and_change_nothing(cluster, tmp_path):
    agent, path, port = cluster
    key = Keys("/shipmate/dep").service("web", "deploy")
    pids = sorted(r["pid"] for r in process_records(tmp_path))
    for case, (value, expected) in HAND_WRITTEN.items():
        agent.store.put(key, value if isinstance(value, str) else json.dumps(value))

        def journal() -> dict:
            entry = agent.store.get(key)
            return parse_object(entry.value) if entry else {}

        eventually(lambda: journal().get("phase") == "refused", timeout=20,
                   what=f"{case} refused")
        assert expected in journal()["error"], (case, journal())
        assert [body(port + i) for i in range(4)] == ["v1"] * 4, case
        assert sorted(r["pid"] for r in process_records(tmp_path)) == pids, case
    status = json.loads(shipmate("status", "--json", "-c", str(path)).stdout)
    assert status["services"][0]["deploy"]["phase"] == "refused"
    assert status["services"][0]["desired"] == 4  # scaling goes on


def test_a_refused_deploy_key_is_replaced_by_the_next_request(tmp_path):
    from agent.store.embedded import EmbeddedStore

    store = EmbeddedStore(tmp_path / "state.db")
    keys = Keys("/shipmate/t")
    try:
        store.put(keys.service("web", "deploy"), json.dumps({"phase": "refused"}))
        journal = request_deploy(store, keys, "web", image="v2", by="t", reason="t")
        entry = store.get(keys.service("web", "deploy"))
        assert json.loads(entry.value)["id"] == journal["id"]
    finally:
        store.close()


class _Cfg:
    def __init__(self, image, images=(), actuator="docker", policy_max=None):
        from types import SimpleNamespace

        self.image = image
        self.deploy = SimpleNamespace(images=list(images))
        self.actuator = SimpleNamespace(type=actuator)
        self.policy = SimpleNamespace(max=policy_max)


@pytest.mark.parametrize(("config", "image", "allowed"), [
    (_Cfg("reg:5000/team/web:1.4"), "reg:5000/team/web:1.5", True),
    (_Cfg("reg:5000/team/web:1.4"), "reg:5000/team/web@sha256:" + "a" * 64, True),
    (_Cfg("reg:5000/team/web:1.4"), "reg:5000/team/other:1.5", False),
    (_Cfg("reg:5000/team/web:1.4"), "reg:5000/team/web:1.5 --privileged", False),
    (_Cfg("reg:5000/team/web:1.4"), "reg:5000/team/web:../../x", False),
    (_Cfg("web:1", images=["web:*", "mirror/web:*"]), "mirror/web:2", True),
    (_Cfg("v1", actuator="process"), "v1", True),
    (_Cfg("v1", actuator="process"), "v2", False),
    (_Cfg(None, actuator="process"), "anything", False),
])
def test_the_images_a_deploy_may_name(config, image, allowed):
    from agent.releases import image_problem

    assert (image_problem(config, image) is None) is allowed


def test_a_journal_too_big_is_refused():
    from types import SimpleNamespace

    from agent.deploys import check_journal

    runtime = SimpleNamespace(config=_Cfg("web:1"))
    problem = check_journal(json.dumps({"id": "a", "phase": "requested",
                                        "reason": "x" * 100_000}), runtime)
    assert problem is not None and "bytes" in problem
    nested = '{"id": "a", "phase": "requested", "by": ' + "[" * 5000 + "]" * 5000 + "}"
    assert "recursion" in (check_journal(nested, runtime) or "").lower()


# ---------------------------------------------------------------- the runner, unit by unit
#
# The runner on the embedded store, with a strategy that follows a script instead of
# starting anything: each step is a function of the Deployment, as a strategy's code is.

RUNNER = """
agent: {cluster: unit}
services:
  web:
    image: v1
    command: [sleep, "300"]
    source: {type: static, count: 2}
    actuator: {type: process}
    deploy: {type: rolling, images: ["v*"]}
"""


class ScriptedConfig(StrategyConfig):
    on_failure: Literal["rollback", "pause"] = "rollback"


class Scripted(Strategy):
    """Runs ``script`` (functions of the Deployment) forward, ``backward`` on a rollback."""

    type_name = "scripted"
    Config = ScriptedConfig

    def __init__(self, script, backward=(), on_failure="rollback") -> None:
        super().__init__(ScriptedConfig(on_failure=on_failure), None)
        self.script, self.backward = list(script), list(backward)
        self.calls: list[tuple[str, str, str]] = []  # (run | rollback, from, to)

    def run(self, deploy: Deployment) -> None:
        self.calls.append(("run", deploy.release_from.image, deploy.release_to.image))
        for step in self.script:
            step(deploy)

    def rollback(self, deploy: Deployment, reason: str) -> None:
        self.calls.append(("rollback", deploy.release_from.image, reason))
        for step in self.backward:
            step(deploy)


class Unit:
    """One service's runtime, a runner and the writes of its deploy key, on the embedded
    store; ``events`` records what the runner emitted."""

    def __init__(self, store, load_test_config, tmp_path) -> None:
        from agent.kinds import Context
        from agent.runtime import Builder

        self.store = store
        config = load_test_config(RUNNER)
        self.builder = Builder(load_plugins(), Context("unit", store, tmp_path))
        self.runtime = self.builder.services(config)["web"]
        self.keys = Keys(config.key_prefix)
        self.key = self.keys.service("web", "deploy")
        self.strategy: Strategy | None = None
        self.events: list[tuple[str, dict]] = []
        self.writes: list[str | None] = []  # each value of the deploy key (None: deleted)
        self.watch = store.watch(self.key, lambda events: self.writes.extend(
            e.value or None for e in events if e.key == self.key))

    def runner(self) -> DeployRunner:
        return DeployRunner(store=self.store, keys=self.keys, grace=1.0,
                            emit=lambda hook, **kw: self.events.append((hook, kw)),
                            strategies=lambda service, name: self.strategy)

    def view(self) -> ServiceView:
        entry, release = self.store.get(self.key), self.store.get(
            self.keys.service("web", "release"))
        return ServiceView(name="web", desired=2, deploy=parse_object(entry.value) if entry
                           else None, release=parse_object(release.value) if release else None)

    def request(self) -> None:
        request_deploy(self.store, self.keys, "web", image="v2", by="t", reason="test")

    def journal(self) -> dict | None:
        entry = self.store.get(self.key)
        return json.loads(entry.value) if entry else None

    def release(self) -> dict | None:
        entry = self.store.get(self.keys.service("web", "release"))
        return json.loads(entry.value) if entry else None

    def phases(self, until: str | None) -> list[str | None]:
        """The phases written to the deploy key, in order (None: deleted), once the last
        write was ``until`` (the watch reports them on its own thread)."""
        def seen() -> list[str | None]:
            phases = [json.loads(w)["phase"] if w else None for w in list(self.writes)]
            return phases if phases and phases[-1] == until else []
        return list(dict.fromkeys(eventually(seen, 20, f"the journal's last phase {until}")))

    def close(self) -> None:
        self.watch.cancel()
        self.builder.close()


@pytest.fixture
def unit(embedded_store, load_test_config, tmp_path):
    made = Unit(embedded_store, load_test_config, tmp_path)
    yield made
    made.close()


def hooks(unit: Unit) -> list[str]:
    return [hook.removeprefix("shipmate_deploy_") for hook, _ in unit.events]


def test_the_runner_writes_the_phases_in_order_and_emits_the_typed_journal(unit):
    seen: list[DeployJournal] = []

    def half(deploy: Deployment) -> None:
        assert deploy.phase is Phase.RUNNING and deploy.desired == 2
        deploy.progress(1, 2, "one of two")
        deploy.save_state(step="half", announce=[deploy.release_to.version])
        seen.append(deploy.journal)

    unit.strategy = Scripted([half, lambda deploy: deploy.progress(2, 2, "both")])
    unit.request()
    unit.runner().execute(unit.runtime, unit.view())
    assert unit.phases(until=None) == ["requested", "running", "finished", None]
    assert unit.strategy.calls == [("run", "v1", "v2")]
    (journal,) = seen
    assert journal.strategy_state == {"step": "half"} and journal.announce == [
        journal.to.version]
    assert isinstance(journal.to, Release) and (journal.from_.image, journal.to.image) == (
        "v1", "v2")
    assert hooks(unit) == ["started", "progressed", "progressed", "finished"]
    started, finished = unit.events[0][1]["deploy"], unit.events[-1][1]["deploy"]
    assert isinstance(started, DeployJournal) and started.phase == "running"
    assert started.strategy == "scripted" and started.desired == 2
    assert [kw["deploy"].progress.done for hook, kw in unit.events[1:3]] == [1, 2]
    assert finished.phase is Phase.FINISHED and finished.to.image == "v2"
    release = unit.release()
    assert release["image"] == "v2" and release["deploy"]["result"] == "finished"
    assert release["previous"]["image"] == "v1"


def test_a_lost_lock_stops_the_deploy_and_nothing_more_is_written(unit):
    def taken(deploy: Deployment) -> None:
        deploy.progress(0, 2, "begun")
        unit.store.delete(unit.key)  # another agent (or ops) took the key away
        deploy.save_state(step="never written")

    unit.strategy = Scripted([taken])
    unit.request()
    with pytest.raises(LockLost):
        unit.runner().execute(unit.runtime, unit.view())
    assert unit.phases(until=None) == ["requested", "running", None]
    assert unit.journal() is None and unit.release() is None
    assert "never written" not in "".join(w for w in unit.writes if w)
    assert hooks(unit) == ["started", "progressed"]  # neither finished nor rolled back
    assert unit.strategy.calls == [("run", "v1", "v2")]  # no rollback either


def test_a_stopped_runner_leaves_the_journal_for_the_next_one_to_resume(unit):
    sleeping = threading.Event()

    def nap(deploy: Deployment) -> None:
        if deploy.state.get("step") == "slept":
            return
        deploy.save_state(step="napping")
        sleeping.set()
        deploy.sleep(120)  # the agent stops meanwhile
        deploy.save_state(step="slept")

    unit.strategy = Scripted([nap])
    unit.request()
    first = unit.runner()
    first.launch(unit.runtime, unit.view())
    assert sleeping.wait(20)
    began = time.monotonic()
    first.stop(timeout=20)
    assert not first.busy("web") and time.monotonic() - began < 15
    left = unit.journal()
    assert left["phase"] == "running" and left["strategy_state"] == {"step": "napping"}
    assert unit.release() is None and "finished" not in hooks(unit)
    # the next acting agent resumes it where it was: the strategy sees its own state
    resumed = Scripted([lambda deploy: deploy.save_state(step="slept"), nap])
    unit.strategy = resumed
    unit.runner().execute(unit.runtime, unit.view())
    assert resumed.calls == [("run", "v1", "v2")]
    assert unit.release()["image"] == "v2" and unit.journal() is None


def test_a_failing_strategy_rolls_back_and_the_release_stays(unit):
    def fail(deploy: Deployment) -> None:
        deploy.progress(1, 2, "half way")
        raise DeployError("web-1 not healthy after 5s")

    back: list[Phase] = []
    unit.strategy = Scripted([fail], backward=[lambda deploy: back.append(deploy.phase)])
    unit.request()
    unit.runner().execute(unit.runtime, unit.view())
    assert unit.phases(until=None) == ["requested", "running", "rolling-back", "rolled-back",
                                       None]
    assert unit.strategy.calls == [("run", "v1", "v2"),
                                   ("rollback", "v1", "web-1 not healthy after 5s")]
    assert back == [Phase.ROLLING_BACK]
    release = unit.release()
    assert release["image"] == "v1" and release["deploy"]["result"] == "rolled-back"
    assert hooks(unit)[-1] == "rolled_back"
    rolled = unit.events[-1][1]
    assert rolled["reason"] == "web-1 not healthy after 5s"
    assert rolled["deploy"].phase is Phase.ROLLED_BACK
    assert rolled["deploy"].error == "web-1 not healthy after 5s"


def test_a_paused_deploy_waits_until_rollback_resumes_it_backwards(unit):
    def fail(deploy: Deployment) -> None:
        raise DeployError("bad release")

    unit.strategy = Scripted([fail], on_failure="pause")
    unit.request()
    runner = unit.runner()
    runner.execute(unit.runtime, unit.view())
    paused = unit.journal()
    assert (paused["phase"], paused["error"]) == ("paused", "bad release")
    assert unit.phases(until="paused") == ["requested", "running", "paused"]
    # the runner leaves a paused journal alone, pass after pass
    for _ in range(3):
        assert runner.launch(unit.runtime, unit.view()) is None and not runner.busy("web")
        runner.execute(unit.runtime, unit.view())
    assert unit.journal() == paused and unit.release() is None
    assert unit.strategy.calls == [("run", "v1", "v2")]
    # `shipmate rollback` writes rolling-back into it: the next pass finishes it backwards
    entry = unit.store.get(unit.key)
    assert unit.store.replace(unit.key, json.dumps({**paused, "phase": "rolling-back"}),
                              entry.revision)
    runner.execute(unit.runtime, unit.view())
    assert unit.strategy.calls[-1] == ("rollback", "v1", "bad release")
    assert unit.journal() is None and unit.release()["deploy"]["result"] == "rolled-back"
    assert unit.phases(until=None)[-2:] == ["rolled-back", None]


def test_a_journal_of_an_older_agent_resumes_with_its_strategy_state(unit):
    """Before strategy_state, a strategy's keys were the journal's own: a deploy in flight
    through an upgrade resumes with them, and the next write moves them under it."""
    unit.strategy = Scripted([])
    unit.request()
    old = unit.runtime.yaml_release
    from agent.releases import make_release

    new = make_release(unit.runtime.config, image="v2", port=None)
    entry = unit.store.get(unit.key)
    journal = {**json.loads(entry.value), "phase": "running", "desired": 2,
               "strategy": "scripted", "from": old.to_json(), "to": new.to_json(),
               "step": "baking", "baking_since": 1764280000.0}
    assert unit.store.replace(unit.key, json.dumps(journal), entry.revision)
    states: list[dict] = []

    def resume(deploy: Deployment) -> None:
        states.append(deploy.state)
        assert deploy.journal.strategy_state == states[0]
        deploy.save_state(step="draining")
        states.append(json.loads(unit.store.get(unit.key).value))

    unit.strategy = Scripted([resume])
    unit.runner().execute(unit.runtime, unit.view())
    assert states[0] == {"step": "baking", "baking_since": 1764280000.0}
    written = states[1]
    assert written["strategy_state"] == {"step": "draining", "baking_since": 1764280000.0}
    assert "step" not in written and "baking_since" not in written
    assert unit.release()["image"] == "v2"


def test_a_strategy_state_the_next_agent_could_not_read_is_not_saved(unit):
    def hoard(deploy: Deployment) -> None:
        deploy.save_state(step="ok")
        deploy.save_state(**{f"key{i}": i for i in range(100)})  # over strategy_state's 64

    unit.strategy = Scripted([hoard])
    unit.request()
    unit.runner().execute(unit.runtime, unit.view())
    assert unit.strategy.calls[-1][0] == "rollback"
    assert "not saved: the next agent could not resume the journal" in unit.strategy.calls[-1][2]
    assert unit.phases(until=None)[-2:] == ["rolled-back", None]  # every write seen
    written = [json.loads(w) for w in unit.writes if w]
    assert all(len(w.get("strategy_state", {})) <= 1 for w in written)
    assert unit.release()["deploy"]["result"] == "rolled-back"
