"""One agent per state folder: the second is told the first one's pid."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.pidlock import AgentRunning, acquire, read_holder

HOLD = """
import sys, time
from pathlib import Path
from agent.pidlock import acquire
lock = acquire(Path(sys.argv[1]), config="/etc/first.yaml", http="127.0.0.1:9999")
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_holder_is_told_who_holds_it_and_a_dead_one_blocks_nothing(tmp_path):
    path = tmp_path / "state" / "agent.pid"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(AgentRunning, match=rf"pid {first.pid}\b.*"
                           r"shipmate status -c /etc/first.yaml.*http://127.0.0.1:9999/healthz"):
            acquire(path, config="/etc/second.yaml", http=None)
        assert read_holder(path)["pid"] == first.pid
    finally:
        first.kill()
        first.wait(10)
    lock = acquire(path, config="/etc/second.yaml", http=None)  # the dead one's file is stale
    try:
        assert read_holder(path)["config"] == "/etc/second.yaml"
    finally:
        lock.release()
