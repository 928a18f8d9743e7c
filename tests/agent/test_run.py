"""``shipmate run`` and ``scale`` as a user meets them: bounds, signals, ``--once``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.agent.test_cli import shipmate, status
from tests.helpers import eventually, kill_recorded
from tests.services import free_port

CONFIG = """
agent: {{cluster: {cluster}, interval: 30s, http: "127.0.0.1:{http}", max_instances: {ceiling},
        parallelism: 16}}
services:
  web:
    command: [sleep, "600"]
    source: {{type: static, count: 1}}
    policy: {{max: 20}}
    actuator: {{type: process}}
"""


def marked(cluster: str) -> set[int]:
    """Pids of live processes the process actuator started for ``cluster`` (by the
    SHIPMATE_INSTANCE marker in their environment, records or not)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in "ZX" and any(e.startswith(f"SHIPMATE_INSTANCE={cluster}-".encode())
                                     for e in env):
            out.add(int(entry.name))
    return out


@pytest.fixture
def config(write_config, tmp_path):
    def make(ceiling: int = 100, cluster: str = "runs") -> Path:
        return write_config(CONFIG.format(cluster=cluster, http=free_port(), ceiling=ceiling))

    yield make
    kill_recorded(tmp_path)
    for pid in marked("runs") | marked("ceil"):
        os.killpg(pid, signal.SIGKILL)


def test_scale_refuses_a_count_beyond_the_policy_unless_forced(config):
    path = config(ceiling=50)
    refused = shipmate("scale", "-c", str(path), "web", "100000")
    assert refused.returncode == 1
    assert "100000 is above its policy.max (20)" in refused.stderr and "--force" in refused.stderr
    forced = shipmate("scale", "-c", str(path), "web", "100000", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "agent.max_instances (50)" in forced.stderr
    assert status(path)["services"][0]["override"] == 100000


def test_a_forced_huge_count_runs_the_ceiling_and_status_says_why(config, tmp_path):
    path = config(ceiling=50, cluster="ceil")
    shipmate("scale", "-c", str(path), "web", "100000", "--force", check=True)
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)],
                             stderr=subprocess.DEVNULL)
    most = [0]

    def count() -> int:
        most[0] = max(most[0], len(marked("ceil")))
        return most[0]

    try:
        eventually(lambda: count() == 50, 60, "50 instances")
        web = eventually(lambda: count() and (s := status(path)["services"][0])[
            "running"] == 50 and s, 30)
        assert any("above agent.max_instances (50): running 50" in p for p in web["problems"])
        for _ in range(20):  # sampled a while longer: never more
            count()
        assert most[0] == 50
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)


def test_sigterm_during_a_big_scale_up_ends_the_agent_and_loses_no_instance(config, tmp_path):
    path = config(ceiling=400)
    shipmate("scale", "-c", str(path), "web", "400", "--force", check=True)
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)],
                             stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: len(marked("runs")) >= 20, 60, "the scale-up to be under way")
        sent = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        took = time.monotonic() - sent
    finally:
        if agent.poll() is None:
            agent.kill()
    assert took < 3, f"the agent took {took:.1f}s to stop"
    running = marked("runs")
    assert 20 <= len(running) < 400  # it stopped in the middle
    second = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)],
                              stderr=subprocess.DEVNULL)
    try:  # the next agent sees every instance that runs (none is invisible) and adds none twice
        eventually(lambda: status(path)["services"][0]["running"] == 400, 120, "400 instances")
        assert len(marked("runs")) == 400 and running <= marked("runs")
        shipmate("scale", "-c", str(path), "web", "0", check=True)
        eventually(lambda: not marked("runs"), 120, "every instance to be stopped")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)


def test_run_once_exits_1_when_a_start_fails(write_config, tmp_path):
    path = write_config("""
        agent: {cluster: once}
        services:
          broken:
            command: [/no/such/program]
            source: {type: static, count: 1}
            actuator: {type: process}
        """)
    result = shipmate("run", "-c", str(path), "--once")
    assert result.returncode == 1
    assert "/no/such/program" in result.stderr


def test_a_crash_looping_service_is_a_problem_in_status(write_config, tmp_path):
    path = write_config(f"""
        agent: {{cluster: crashy, http: "127.0.0.1:{free_port()}"}}
        services:
          crash:
            command: [sh, -c, "echo no such thing >&2; exit 127"]
            source: {{type: static, count: 1}}
            actuator: {{type: process}}
        """)
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)],
                             stderr=subprocess.PIPE, text=True)
    try:
        crash = eventually(lambda: (s := status(path)["services"][0]) and any(
            "crash-looping" in p for p in s["problems"]) and s, 30, "the crash loop reported")
        (problem,) = [p for p in crash["problems"] if "crash-looping" in p]
        assert "exit code 127" in problem and "next try in" in problem
        table = shipmate("status", "-c", str(path)).stdout
        assert "crash-looping" in table
    finally:
        agent.send_signal(signal.SIGTERM)
        _, log = agent.communicate(timeout=30)
    lines = [line for line in log.splitlines() if "crash slot 0: exited" in line]
    assert lines and all("no such thing" in line for line in lines)
