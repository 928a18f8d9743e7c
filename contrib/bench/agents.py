"""What the agent benchmarks share: real ``shipmate run`` processes and what they cost."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def agent(config: Path) -> subprocess.Popen[bytes]:
    """``shipmate run -c config`` from this checkout, its log discarded."""
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(config)],
                            cwd=ROOT, stderr=subprocess.DEVNULL)


def wait_for(check: Callable[[], object], timeout: float) -> float:
    """Poll ``check`` until true; the seconds it took (exit if ``timeout`` passes)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit("timed out")
        time.sleep(0.02)
    return time.monotonic() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def copy_for_another_agent(config: Path, name: str) -> Path:
    """The same config with a state folder of its own (one agent per state folder)."""
    text = config.read_text()
    state = config.parent / f"state-{name}"
    other = config.with_name(f"{config.stem}-{name}.yaml")
    other.write_text(text.replace("agent:\n", f"agent:\n  state_dir: {state}\n", 1)
                     if "agent:\n" in text else text.replace(
                         "agent: {", f"agent: {{state_dir: {state}, ", 1))
    return other


def kill_instances(cluster: str) -> None:
    """Kill every process instance of ``cluster`` (found by its SHIPMATE_INSTANCE marker)."""
    import signal

    marker = f"SHIPMATE_INSTANCE={cluster}-".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and any(
                    e.startswith(marker) for e in (entry / "environ").read_bytes().split(b"\0")):
                os.killpg(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


def rss_mb(pid: int) -> float:
    """The resident memory of ``pid``, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
