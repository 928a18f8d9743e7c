"""Benchmark: how long a standby takes to act when the leader stops, dies or freezes.

Starts a real etcd (from tests/services.py) and two ``shipmate run`` agents on
it (process actuator, ``sleep`` instances), then, for each way the leader can
go, measures the time from the event to the standby holding the leader key,
and prints it against a floor of the same shape measured in the same run (two
raw store clients: one holds a key on a lease, the other watches it and creates
it as soon as it is gone), and against ``agent.leader_ttl``:

- clean stop (SIGTERM: the leader deletes its key; floor: the raw holder deletes it);
- kill -9 (both agents run on this host, so the standby sees its predecessor's pid
  gone and takes over at its next campaign, a third of the lease at most; across
  hosts the lease must expire first; floor: the raw holder's lease runs out);
- SIGSTOP (a frozen leader: the lease must expire; the frozen one acts on
  nothing when it continues; floor: the raw holder's lease runs out).

It also prints the CPU of the idle standby and of the idle leader.

    python3 contrib/bench/bench_leadership.py [--ttl 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agents import (  # noqa: E402
    ROOT,
    agent,
    copy_for_another_agent,
    cpu_seconds,
    kill_instances,
    wait_for,
)

sys.path.insert(0, str(ROOT))

from agent.store import WatchEvent  # noqa: E402
from tests.services import Etcd  # noqa: E402

CONFIG = """
agent:
  cluster: lead
  interval: 10s
  leader_ttl: {ttl}s
  store: {{backend: etcd, endpoints: ["{endpoint}"]}}
services:
  web:
    command: [sleep, "600"]
    source: {{type: static, count: 1}}
    actuator: {{type: process}}
"""


def raw_takeover(etcd: Etcd, ttl: float, expire: bool) -> float:
    """Seconds from a raw holder deleting its key (or, ``expire``, refreshing its lease for
    the last time) to a raw watcher having created it on a lease of its own."""
    from agent.store.etcd3 import Etcd3Store

    holder, taker = Etcd3Store([etcd.endpoint]), Etcd3Store([etcd.endpoint])
    key, took, when = "/bench-floor/leader", threading.Event(), []
    try:
        held, mine = holder.lease(ttl), taker.lease(20 * ttl)  # outlives the wait
        assert holder.create(key, "holder", lease=held), "the floor's key exists"

        def gone(events: list[WatchEvent]) -> None:
            if any(e.key == key and e.value is None for e in events) and taker.create(
                    key, "taker", lease=mine):
                when.append(time.monotonic())
                took.set()

        watch = taker.watch(key, gone)
        time.sleep(0.3)  # the watch is open
        if expire:
            held.refresh()
        start = time.monotonic()
        if not expire:
            holder.delete(key)
        if not took.wait(10 * ttl):
            raise SystemExit("the floor's watcher never took the key")
        watch.cancel()
        mine.revoke()
        return when[0] - start
    finally:
        holder.close()
        taker.close()


def leader(etcd: Etcd) -> int | None:
    out = etcd.etcdctl("get", "/shipmate/lead/leader", "--print-value-only").strip()
    return json.loads(out)["pid"] if out else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ttl", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    etcd = Etcd()
    etcd.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "agent.yaml"
            config.write_text(CONFIG.format(ttl=args.ttl, endpoint=etcd.endpoint))
            made = iter(range(1000))

            def fresh() -> subprocess.Popen[bytes]:  # one state folder per agent
                return agent(copy_for_another_agent(config, str(next(made))))

            times: dict[str, list[float]] = {"clean stop": [], "kill -9": [], "SIGSTOP": []}
            agents = [fresh()]
            wait_for(lambda: leader(etcd) == agents[0].pid, 30)
            agents.append(fresh())
            time.sleep(3)
            standby, acting = agents[1], agents[0]
            before = {p.pid: cpu_seconds(p.pid) for p in agents}
            time.sleep(10)
            idle_leader, idle_standby = ((cpu_seconds(p.pid) - before[p.pid]) / 10 * 100
                                         for p in agents)
            for _ in range(args.rounds):
                for how in times:
                    acting, standby = agents[0], agents[1]
                    sent = time.monotonic()
                    if how == "clean stop":
                        acting.send_signal(signal.SIGTERM)
                    elif how == "kill -9":
                        acting.kill()
                    else:
                        acting.send_signal(signal.SIGSTOP)
                    wait_for(lambda s=standby: leader(etcd) == s.pid, 10 * args.ttl)
                    times[how].append(time.monotonic() - sent)
                    if how == "SIGSTOP":
                        acting.send_signal(signal.SIGCONT)
                        acting.send_signal(signal.SIGTERM)
                    acting.wait(30)
                    agents = [standby, fresh()]  # a fresh standby for the next round
                    time.sleep(2)
            ttl = args.ttl
            floors = {False: statistics.median(raw_takeover(etcd, ttl, False)
                                               for _ in range(args.rounds)),
                      True: statistics.median(raw_takeover(etcd, ttl, True)
                                              for _ in range(args.rounds))}
            for how, values in times.items():
                median, floor = statistics.median(values), floors[how != "clean stop"]
                shape = "deletes its key" if how == "clean stop" else "lets its lease lapse"
                print(f"takeover after {how:10s}: median {median:5.2f} s over {len(values)} "
                      f"= x{median / floor:.2f} of a raw watcher when a raw holder {shape} "
                      f"({floor:.3f} s), x{median / ttl:.2f} of the {ttl:g} s lease")
            print(f"idle CPU over 10 s: standby {idle_standby:.2f} % of a core, leader "
                  f"{idle_leader:.2f} %")
            for p in agents:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    finally:
        kill_instances("lead")
        etcd.close()


if __name__ == "__main__":
    main()
