"""The process actuator: real local processes, records that survive the agent."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent import Context, InstanceSpec
from plugins.actuators.process import ProcessActuator, ProcessConfig
from tests.helpers import alive, eventually, kill_recorded


def comm(pid: int) -> str:
    """The name of process ``pid``'s program ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.fixture
def actuator(tmp_path, embedded_store):
    yield ProcessActuator(ProcessConfig(), Context("t", embedded_store, tmp_path))
    kill_recorded(tmp_path)


def spec(slot: int, command: list[str], env: dict[str, str] | None = None) -> InstanceSpec:
    return InstanceSpec(cluster="t", service="svc", slot=slot, version="v1",
                        name=f"t-svc-{slot}-v1", port=None, command=command, env=env or {})


def test_start_list_stop(actuator, tmp_path):
    started = actuator.start(spec(0, ["sh", "-c", 'echo "hello $WHO"; exec sleep 60'],
                                  {"WHO": "world"}))
    assert started.running and started.slot == 0 and started.host == "127.0.0.1"
    (listed,) = actuator.list()
    assert listed.name == "t-svc-0-v1" and listed.running
    log = tmp_path / "logs" / "t-svc-0-v1.log"
    eventually(lambda: log.exists() and "hello world" in log.read_text())
    pid = listed.ref["pid"]
    actuator.stop(listed, grace=5)
    assert not alive(pid)
    assert actuator.list() == []


def test_stop_kills_after_the_grace_period_and_reaches_the_whole_group(actuator, tmp_path):
    child = tmp_path / "child.pid"
    stubborn = actuator.start(spec(1, ["sh", "-c", f"trap '' TERM; sleep 60 & echo $! > {child}; "
                                                   "wait"]))
    eventually(lambda: child.exists() and child.read_text().strip())
    started = time.monotonic()
    actuator.stop(stubborn, grace=0.5)
    assert 0.4 < time.monotonic() - started < 5
    assert not alive(stubborn.ref["pid"])
    eventually(lambda: not alive(int(child.read_text())), timeout=15, what="the child's end")


def test_a_child_that_ignores_sigterm_dies_with_its_leader(actuator, tmp_path):
    child = tmp_path / "child.pid"
    leader = actuator.start(spec(2, ["sh", "-c", f"(trap '' TERM; exec sleep 60) & "
                                                 f"echo $! > {child}; wait"]))
    eventually(lambda: child.exists() and child.read_text().strip())
    # the child execs sleep once its trap is set
    eventually(lambda: comm(int(child.read_text())) == "sleep", timeout=15,
               what="the child's trap set")
    actuator.stop(leader, grace=1)
    eventually(lambda: not alive(int(child.read_text())), timeout=15,
               what="the orphan to be killed with the group")


def test_an_exited_process_is_listed_as_not_running(actuator):
    actuator.start(spec(2, ["true"]))
    eventually(lambda: not actuator.list()[0].running, what="the exit")
    actuator.stop(actuator.list()[0], grace=1)
    assert actuator.list() == []


def test_a_reused_pid_is_not_mistaken_for_the_instance(actuator, tmp_path):
    instance = actuator.start(spec(3, ["sleep", "60"]))
    record_path = tmp_path / "processes" / "t" / f"{instance.name}.json"
    record = json.loads(record_path.read_text())
    record["ticks"] += 1  # as if the pid now belonged to another process
    record_path.write_text(json.dumps(record))
    (listed,) = actuator.list()
    assert not listed.running


def test_a_new_actuator_adopts_recorded_processes(actuator, tmp_path, embedded_store):
    actuator.start(spec(0, ["sleep", "60"]))
    again = ProcessActuator(ProcessConfig(), Context("t", embedded_store, tmp_path))
    (adopted,) = again.list()
    assert adopted.running and adopted.name == "t-svc-0-v1"


def test_a_command_that_cannot_run_is_a_clear_error(actuator):
    with pytest.raises(FileNotFoundError, match="no-such-binary"):
        actuator.start(spec(0, ["no-such-binary"]))
    with pytest.raises(ValueError, match="has no command"):
        actuator.start(spec(0, []))


def test_an_agent_killed_between_record_and_spawn_leaves_a_visible_instance(
        actuator, tmp_path, embedded_store):
    """The record is written before the spawn: what a killed agent leaves is completed."""
    import os
    import subprocess

    name = "t-svc-4-v1"
    record = {"name": name, "service": "svc", "slot": 4, "version": "v1", "port": None,
              "pid": None, "ticks": None, "command": ["sleep", "60"], "labels": {},
              "log": "", "written": time.time()}
    (tmp_path / "processes" / "t" / f"{name}.json").write_text(json.dumps(record))
    child = subprocess.Popen(["sleep", "60"], start_new_session=True,
                             env={**os.environ, "SHIPMATE_INSTANCE": name})
    try:
        again = ProcessActuator(ProcessConfig(), Context("t", embedded_store, tmp_path))
        (found,) = again.list()
        assert found.running and found.ref["pid"] == child.pid
        again.stop(found, grace=2)
        assert child.wait(10) is not None
    finally:
        child.kill()


def test_a_record_whose_spawn_never_happened_becomes_an_exited_instance(actuator, tmp_path):
    record = {"name": "t-svc-5-v1", "service": "svc", "slot": 5, "version": "v1",
              "port": None, "pid": None, "ticks": None, "command": ["x"], "labels": {},
              "log": "", "written": time.time() - 3600}
    (tmp_path / "processes" / "t" / "t-svc-5-v1.json").write_text(json.dumps(record))
    (listed,) = actuator.list()
    assert not listed.running
    actuator.stop(listed, grace=1)
    assert actuator.list() == []


def test_exit_code_and_output_of_an_exited_instance(actuator):
    actuator.start(spec(6, ["sh", "-c", "echo first; echo the reason >&2; exit 3"]))
    exited = eventually(lambda: (i := actuator.list()[0]) and not i.running and i)
    assert exited.exit_code == 3
    assert actuator.output(exited).splitlines()[-1] == "the reason"


def test_logs_rotate_and_go_with_their_instance(tmp_path, embedded_store):
    actuator = ProcessActuator(ProcessConfig(log_max_bytes=1000, log_keep=2, log_retention=0),
                               Context("t", embedded_store, tmp_path))
    logs = tmp_path / "logs"
    try:
        instance = actuator.start(spec(7, ["sh", "-c", "head -c 5000 /dev/zero; exec sleep 60"]))
        log = logs / f"{instance.name}.log"
        eventually(lambda: log.stat().st_size >= 5000, what="the output")
        actuator._next_tend = 0
        actuator.list()
        assert log.stat().st_size < 1000 and (logs / f"{instance.name}.log.1").stat(
            ).st_size >= 5000
        actuator.stop(actuator.list()[0], grace=1)
        actuator._next_tend = 0
        actuator.list()
        assert not list(logs.glob(f"{instance.name}.log*"))
    finally:
        kill_recorded(tmp_path)


def test_an_instance_gets_its_yaml_env_and_a_small_base_never_the_agents(
        tmp_path, embedded_store, monkeypatch):
    secrets = {"AWS_SECRET_ACCESS_KEY": "aws-secret-0123", "AWS_SESSION_TOKEN": "aws-token-4567",
               "DD_API_KEY": "dd-api-89ab", "DD_APP_KEY": "dd-app-cdef",
               "ETCD_PASSWORD": "etcd-pw-1357"}
    for name, value in {**secrets, "LANG": "C.UTF-8", "TZ": "UTC", "SHARED": "passed"}.items():
        monkeypatch.setenv(name, value)
    config = ProcessConfig(env_passthrough=["SHARED"])
    actuator = ProcessActuator(config, Context("t", embedded_store, tmp_path / "state"))
    try:
        instance = actuator.start(spec(0, ["sh", "-c", "env; exec sleep 60"],
                                       env={"GREETING": "hello"}))
        log = tmp_path / "state" / "logs" / f"{instance.name}.log"
        eventually(lambda: "GREETING=hello" in log.read_text(), timeout=20, what="env printed")
        printed = log.read_text()
        names = {line.split("=", 1)[0] for line in printed.splitlines() if "=" in line}
        assert not any(value in printed for value in secrets.values())
        assert {"GREETING", "SHARED", "PATH", "HOME", "LANG", "TZ"} <= names
        assert names - {"GREETING", "SHARED", "PATH", "HOME", "LANG", "TZ", "PWD", "SHLVL",
                        "SHIPMATE_INSTANCE",  # the actuator's own marker
                        "_"} == set()  # what sh adds by itself, and nothing else
        # state is private: folders 0700, files 0600
        state = tmp_path / "state"
        for folder in (state, state / "logs", state / "processes", state / "processes" / "t"):
            assert folder.stat().st_mode & 0o777 == 0o700, folder
        record = state / "processes" / "t" / f"{instance.name}.json"
        assert log.stat().st_mode & 0o777 == 0o600
        assert record.stat().st_mode & 0o777 == 0o600
    finally:
        kill_recorded(tmp_path)
