"""Benchmark: how fast the agent stops in the middle of a big scale-up, and what a standby costs.

Runs real ``shipmate run`` processes on the embedded store with the process
actuator (``sleep`` instances) in a temporary folder, and prints:

- SIGTERM to exit, one second into a scale-up to ``--instances`` (default
  1,000), against SIGTERM to exit of the same agent when idle (the baseline,
  measured in the same run): the ratio says what a scale-up adds to stopping;
- the CPU of an idle standby (a second agent while the first leads) and of the
  idle leader over ``--seconds``, in % of one core, and their ratio;
- the CPU of an agent waiting for an etcd that does not answer, against the idle
  leader's.

Every instance started is killed at the end.

    python3 contrib/bench/bench_loop.py [--instances 1000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agents import (  # noqa: E402
    ROOT,
    agent,
    copy_for_another_agent,
    cpu_seconds,
    wait_for,
)

CONFIG = """
agent: {{cluster: bench, interval: 10s, max_instances: {n}, parallelism: 8}}
services:
  web:
    command: [sleep, "600"]
    source: {{type: static, count: 1}}
    actuator: {{type: process}}
"""


def shipmate(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, check=True,
                   capture_output=True)


def instances(folder: Path) -> int:
    return len(list(folder.glob(".shipmate/processes/bench/*.json")))


def stop_time(process: subprocess.Popen[bytes]) -> float:
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(120)
    return time.monotonic() - sent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_all(folder: Path) -> None:
    config = folder / "agent.yaml"
    shipmate("scale", "-c", str(config), "web", "0", "--force")
    shipmate("run", "-c", str(config), "--once")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = folder / "agent.yaml"
        config.write_text(CONFIG.format(n=args.instances))
        try:
            idle = agent(config)
            wait_for(lambda: instances(folder) == 1, 60)
            time.sleep(1)
            baseline = stop_time(idle)

            shipmate("scale", "-c", str(config), "web", str(args.instances), "--force")
            busy = agent(config)
            wait_for(lambda: instances(folder) > 10, 60)
            time.sleep(1)
            started = instances(folder)
            during = stop_time(busy)
            print(f"SIGTERM to exit, idle: {baseline * 1000:.0f} ms; one second into a "
                  f"scale-up to {args.instances} ({started} started): {during * 1000:.0f} ms "
                  f"= x{during / baseline:.2f}")

            shipmate("scale", "-c", str(config), "web", "1", "--force")
            leader = agent(config)
            wait_for(lambda: instances(folder) <= 1, 300)
            standby = agent(copy_for_another_agent(config, "standby"))
            time.sleep(2)
            before = {p.pid: cpu_seconds(p.pid) for p in (leader, standby)}
            time.sleep(args.seconds)
            used = {p.pid: (cpu_seconds(p.pid) - before[p.pid]) / args.seconds * 100
                    for p in (leader, standby)}
            print(f"idle CPU over {args.seconds:.0f} s: standby {used[standby.pid]:.2f} % of a "
                  f"core, leader {used[leader.pid]:.2f} % = x"
                  f"{used[standby.pid] / max(used[leader.pid], 0.01):.2f}")
            for p in (standby, leader):
                stop_time(p)

            lost = folder / "lost.yaml"  # an etcd that does not answer (nothing listens there)
            lost.write_text(CONFIG.format(n=1).replace(
                "agent: {", f'agent: {{store: {{backend: etcd, endpoints: '
                f'["http://127.0.0.1:{free_port()}"], timeout: 1s}}, '))
            waiting = agent(lost)
            time.sleep(2)
            before = cpu_seconds(waiting.pid)
            time.sleep(args.seconds)
            lost_cpu = (cpu_seconds(waiting.pid) - before) / args.seconds * 100
            print(f"idle CPU over {args.seconds:.0f} s waiting for an etcd that does not "
                  f"answer: {lost_cpu:.2f} % of a core = x"
                  f"{lost_cpu / max(used[leader.pid], 0.01):.2f} of the idle leader's")
            stop_time(waiting)
        finally:
            kill_all(folder)


if __name__ == "__main__":
    main()
