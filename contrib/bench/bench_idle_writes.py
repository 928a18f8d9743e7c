"""Benchmark: store writes an idle agent makes per minute (issue 16: "idle costs nothing").

For 100 and 1,000 static services (no instances: ``count: 0``, the default 30 s
poll) on the embedded store and on a real etcd (v3 API, started here from
tests/services.py), it runs a real :class:`agent.runtime.Agent` in this
process, waits until every service has its desired count, then watches the
cluster's keys for ``--seconds`` and prints, per minute: the writes seen (every
put or delete under the cluster's prefix), the store round trips the agent
made, and the source polls it did. The floor is 0 writes: lease keep-alives
are no writes (no event, no new etcd revision).

    python3 contrib/bench/bench_idle_writes.py [--services 100 1000] [--seconds 60] [--no-etcd]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.keys import Keys  # noqa: E402
from agent.runtime import Agent  # noqa: E402


def measure(label: str, store_yaml: str, n: int, seconds: float, folder: Path) -> None:
    cluster = f"idle{n}{label.split()[0]}"
    services = "".join(f"""
  s{i:05d}:
    command: [sleep, "300"]
    source: {{type: static, count: 0}}
    actuator: {{type: process}}""" for i in range(n))
    config = folder / f"{cluster}.yaml"
    config.write_text(f"agent: {{cluster: {cluster}, interval: 10s, store: {store_yaml}, "
                      f"state_dir: {folder / cluster}}}\nservices:{services}\n")
    agent = Agent(config)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    keys = Keys(f"/shipmate/{cluster}")
    try:
        start = time.monotonic()
        while True:
            desired = [k for k in agent.store.get_prefix(keys.services) if k.endswith("/desired")]
            if len(desired) == n:
                break
            if time.monotonic() - start > 600:
                raise SystemExit(f"{label}: {len(desired)} of {n} desired counts after 600 s")
            time.sleep(0.2)
        passes = agent.loop.passes
        while agent.loop.passes < passes + 1:
            time.sleep(0.05)
        settled = time.monotonic() - start
        events: list[object] = []
        watch = agent.store.watch(keys.root + "/", events.extend)
        trips = agent.store.round_trips
        polls = getattr(agent.loop.scaler, "polls", None)
        time.sleep(seconds)
        watch.cancel()
        per_minute = 60.0 / seconds
        trips = (agent.store.round_trips - trips) * per_minute
        done = getattr(agent.loop.scaler, "polls", None)
        polled = "?" if polls is None or done is None else f"{(done - polls) * per_minute:.0f}"
        print(f"{label:10} {n:6} services: {len(events) * per_minute:7.0f} writes/min "
              f"(floor 0), {trips:7.0f} round trips/min, {polled} polls/min "
              f"(settled in {settled:.1f} s)", flush=True)
    finally:
        agent.stop()
        thread.join(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=60.0, help="the idle window watched")
    parser.add_argument("--no-etcd", action="store_true", help="embedded store only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for n in args.services:
            measure("embedded", f"{{backend: embedded, path: {folder / f'state{n}.db'}}}", n,
                    args.seconds, folder)
        if args.no_etcd:
            return
        from tests.services import Etcd

        with Etcd() as etcd:
            for n in args.services:
                measure("etcd (v3)", f'{{backend: etcd, endpoints: ["{etcd.endpoint}"]}}', n,
                        args.seconds, folder)


if __name__ == "__main__":
    main()
