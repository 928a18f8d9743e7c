"""Small helpers shared by the project's tests."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def port_block(count: int) -> int:
    """A base port such that ``base .. base+count-1`` are free on 127.0.0.1 now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


def eventually(check: Callable[[], object], timeout: float = 5.0, what: str = "") -> object:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(0.05)


def observation_window(seconds: float, why: str) -> None:
    """Watch for ``seconds`` while something must *not* happen (a negative check).

    Not a wait for something to happen (use :func:`eventually`): the test asserts
    afterwards that nothing changed. ``why`` says what the window covers.
    """
    assert why, "say what the window must cover"
    time.sleep(seconds)


def process_records(state_dir: Path) -> list[dict]:
    """The process actuator's records under ``state_dir`` (every cluster).

    A record the agent removes between the listing and the read (a stop that
    just finished) is skipped: it is no longer a record.
    """
    records = []
    for path in sorted(state_dir.glob("**/processes/*/*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except FileNotFoundError:
            continue
    return records


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def kill_recorded(state_dir: Path) -> None:
    """Kill every process the process actuator recorded under ``state_dir`` (test cleanup)."""
    for record in process_records(state_dir):
        if not isinstance(record.get("pid"), int) or record["pid"] <= 0:
            continue  # recorded before its spawn, or never ran
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record["pid"], signal.SIGKILL)


IMPORT_TIME = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)\S+")
_MODULES_PROBE = """\
import atexit, json, os, runpy, sys
atexit.register(lambda: open(os.environ["SHIPMATE_MODULES_OUT"], "w").write(
    json.dumps(sorted(sys.modules))))
sys.argv[0] = "shipmate"
runpy.run_module("agent", run_name="__main__", alter_sys=True)
"""


def shipmate_imports(*args: str, env: dict[str, str] | None = None
                     ) -> tuple[subprocess.CompletedProcess[str], set[str], float]:
    """Run ``shipmate ARGS`` in a subprocess: its result, every module it had imported at
    exit (``sys.modules``: also what ``importlib.import_module`` loaded, which
    ``-X importtime`` leaves out), and the milliseconds ``-X importtime`` counted."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "modules.json"
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", _MODULES_PROBE, *args],
            capture_output=True, text=True, timeout=60,
            env={**(env or os.environ), "SHIPMATE_MODULES_OUT": str(out)})
        modules = set(json.loads(out.read_text())) if out.exists() else set()
    total, kept = 0, []
    for line in result.stderr.splitlines():
        match = IMPORT_TIME.match(line)
        if match is None:
            kept.append(line)
        elif not match.group(2):  # a top-level import: its cumulative time holds its children's
            total += int(match.group(1))
    result.stderr = "\n".join(kept) + ("\n" if kept else "")
    return result, modules, total / 1000
