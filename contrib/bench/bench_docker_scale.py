"""Benchmark: scale a service of Docker containers 0 -> N -> 0, the agent against the floor.

Starts its own dockerd and etcd (tests/services.py) and, in the same run:

- the floor of each width: docker SDK ``containers.run`` then ``remove(force=True)``
  calls on a thread pool as wide as the agent's ``parallelism`` (width 1: one
  container after the other);
- a running agent (``Agent.run`` in a thread: the etcd store, the docker
  actuator, the etcd announcer with no drain, an HTTP health check) driven by an
  ``override`` in etcd, with the actuator's ``parallelism`` at 1 and above, until
  the engine runs that many containers and nothing is left in flight;

and prints each time and its ratio to the pool of the same width (goal: at most
1.15), and to the sequential loop (what more workers buy). Then, with the whole
agent running, the median time from ``etcdctl put .../override 1`` to the first
container created (goal: under 300 ms), over several trials, against a raw watch
on a key that runs the same container at once (the floor).

    python3 contrib/bench/bench_docker_scale.py [--count 20] [--rounds 5] [--trials 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.runtime import Agent  # noqa: E402
from tests.helpers import port_block  # noqa: E402
from tests.services import Dockerd, Etcd  # noqa: E402

CONFIG = """
agent:
  cluster: {cluster}
  interval: 60s
  parallelism: 64
  store: {{backend: etcd, endpoints: ["{endpoint}"]}}
  state_dir: {folder}/state
services:
  web:
    image: {image}
    command: {command}
    port: {port}
    health: {{http: /, timeout: 1s}}
    source: {{type: static, count: 0, interval: 60s}}
    actuator: {{type: docker, host: "{host}", init: true, parallelism: {parallelism}}}
    announce: {{type: etcd, ttl: 30s, drain: 0s}}
"""


def floor(dockerd: Dockerd, count: int, port: int, width: int = 1) -> tuple[float, float]:
    """Seconds to run ``count`` containers on a pool of ``width`` threads of docker SDK
    calls, and to remove them the same way (width 1: one after the other)."""
    client = dockerd.client()

    def run(i: int) -> Any:
        return client.containers.run(
            Dockerd.WEB_V1, ["httpd", "-f", "-p", str(port + i), "-h", "/www"], detach=True,
            network_mode="host", init=True, name=f"floor-{i}", labels={"bench": "floor"})

    with ThreadPoolExecutor(width) as pool:
        started = time.perf_counter()
        containers = list(pool.map(run, range(count)))
        up = time.perf_counter() - started
        started = time.perf_counter()
        list(pool.map(lambda c: c.remove(force=True), containers))
        return up, time.perf_counter() - started


def through_reconcile(dockerd: Dockerd, etcd: Etcd, folder: Path, count: int, port: int,
                      parallelism: int, cluster: str) -> tuple[float, float, int]:
    """Seconds for a running agent to go 0 -> count and count -> 0 after an ``override`` (until
    the engine runs that many containers and nothing is left in flight); engine calls going
    up."""
    path = folder / f"{cluster}.yaml"
    path.write_text(CONFIG.format(cluster=cluster, endpoint=etcd.endpoint, folder=folder,
                                  image=Dockerd.WEB_V1, command=Dockerd.WEB_COMMAND,
                                  port=port, host=dockerd.host,
                                  parallelism=parallelism))
    agent = Agent(path)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    api, label = dockerd.client().api, f"shipmate.cluster={cluster}"
    actuation, override = agent.loop.actuation, agent.keys.service("web", "override")

    def settle(n: int) -> float:
        started = time.perf_counter()
        agent.store.put(override, str(n))
        wait_for(lambda: not actuation.in_flight and not actuation.pending and len(
            api.containers(filters={"label": label, "status": "running"})) == n
            and len(api.containers(all=True, filters={"label": label})) == n,
                 120, f"{n} containers of {cluster}")
        return time.perf_counter() - started

    try:
        wait_for(lambda: agent.leadership.is_leader, 10, "the agent leads")
        actuator = agent.services["web"].actuator
        calls = actuator.api_calls
        up = settle(count)
        calls = actuator.api_calls - calls
        down = settle(0)
        return up, down, calls
    finally:
        agent.store.delete(override)
        agent.stop()
        thread.join(15)
        for row in api.containers(all=True, filters={"label": label}):
            api.remove_container(row["Id"], force=True)


def override_latency(dockerd: Dockerd, etcd: Etcd, folder: Path, trials: int,
                     port: int) -> list[float]:
    """Seconds from ``etcdctl put`` of the override to the engine's ``create`` event."""
    cluster = "latency"
    path = folder / "latency.yaml"
    path.write_text(CONFIG.format(cluster=cluster, endpoint=etcd.endpoint, folder=folder,
                                  image=Dockerd.WEB_V1, command=Dockerd.WEB_COMMAND,
                                  port=port, host=dockerd.host,
                                  parallelism=4))
    agent = Agent(path)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    created: list[float] = []
    seen = threading.Event()
    events = dockerd.client().api.events(
        decode=True, filters={"type": "container", "event": "create",
                              "label": f"shipmate.cluster={cluster}"})

    def follow() -> None:
        try:
            for event in events:
                created.append(event["timeNano"] / 1e9)
                seen.set()
        except Exception:  # noqa: BLE001 - closed at the end
            pass

    threading.Thread(target=follow, daemon=True).start()
    override = f"/shipmate/{cluster}/services/web/override"
    api = dockerd.client().api

    def count() -> int:
        return len(api.containers(all=True, filters={"label": f"shipmate.cluster={cluster}"}))

    out = []
    try:
        wait_for(lambda: agent.leadership.is_leader, 10, "the agent leads")
        for _ in range(trials):
            seen.clear()
            created.clear()
            started = time.time()
            etcd.etcdctl("put", override, "1")
            if not seen.wait(10):
                raise RuntimeError("no container was created within 10 s")
            out.append(created[0] - started)
            etcd.etcdctl("put", override, "0")
            wait_for(lambda: count() == 0, 20, "back to 0 containers")
            time.sleep(0.5)
    finally:
        events.close()
        agent.stop()
        thread.join(15)
        for row in api.containers(all=True, filters={"label": f"shipmate.cluster={cluster}"}):
            api.remove_container(row["Id"], force=True)
    return out


def floor_latency(dockerd: Dockerd, etcd: Etcd, trials: int, port: int) -> list[float]:
    """Seconds from ``etcdctl put`` of a key to the ``create`` event of a container that a
    raw store watch on that key runs at once (the same SDK call as the actuator's)."""
    from agent.store.etcd3 import Etcd3Store

    client, label = dockerd.client(), "shipmate.cluster=floor-latency"
    key, created, seen = "/bench-floor/override", [], threading.Event()
    events = client.api.events(decode=True, filters={"type": "container", "event": "create",
                                                      "label": label})

    def follow() -> None:
        try:
            for event in events:
                created.append(event["timeNano"] / 1e9)
                seen.set()
        except Exception:  # noqa: BLE001 - closed at the end
            pass

    def act(changes: list[Any]) -> None:
        if any(c.value == "1" for c in changes):
            client.containers.run(Dockerd.WEB_V1, ["httpd", "-f", "-p", str(port), "-h", "/www"],
                                  detach=True, network_mode="host", init=True,
                                  labels={"shipmate.cluster": "floor-latency"})

    threading.Thread(target=follow, daemon=True).start()
    store = Etcd3Store([etcd.endpoint])
    watch = store.watch(key, act)
    out = []
    try:
        time.sleep(0.5)  # the watch is open
        for _ in range(trials):
            seen.clear()
            created.clear()
            started = time.time()
            etcd.etcdctl("put", key, "1")
            if not seen.wait(10):
                raise RuntimeError("the floor's watch created no container within 10 s")
            out.append(created[0] - started)
            etcd.etcdctl("put", key, "0")
            for row in client.api.containers(all=True, filters={"label": label}):
                client.api.remove_container(row["Id"], force=True)
            time.sleep(0.5)
    finally:
        watch.cancel()
        events.close()
        store.close()
        for row in client.api.containers(all=True, filters={"label": label}):
            client.api.remove_container(row["Id"], force=True)
    return out


def pool_name(width: int) -> str:
    """The row of the floor of ``width`` threads (the last word is the width)."""
    return f"SDK pool, width {width}"


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="medians over this many runs")
    parser.add_argument("--trials", type=int, default=7, help="override latency trials")
    parser.add_argument("--parallelism", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-docker-") as tmp:
        folder = Path(tmp)
        dockerd, etcd = Dockerd(), Etcd()
        try:
            dockerd.start()
            dockerd.build_busybox_images()
            etcd.start()
            port = port_block(args.count)
            floor(dockerd, 2, port)  # warm the engine up
            results: dict[str, Any] = {"count": args.count}
            widths = sorted({1, *args.parallelism})
            rows: dict[str, list[tuple[float, float]]] = {}
            calls = {}
            for r in range(args.rounds):  # interleaved: a busy moment hits every variant
                for w in widths:
                    rows.setdefault(pool_name(w), []).append(
                        floor(dockerd, args.count, port, w))
                for p in args.parallelism:
                    up, down, calls[p] = through_reconcile(dockerd, etcd, folder, args.count,
                                                           port, p, f"bench-p{p}-{r}")
                    rows.setdefault(f"agent, parallelism {p}", []).append((up, down))
            totals = {name: (statistics.median(u for u, _ in runs),
                             statistics.median(d for _, d in runs)) for name, runs in rows.items()}
            sequential = sum(totals[pool_name(1)])
            print(f"scale 0 -> {args.count} -> 0, median of {args.rounds} runs "
                  f"(docker engine {dockerd.client().version()['Version']}, vfs, host network)")
            print(f"{'':28} {'up':>8} {'down':>8} {'total':>8} {'vs pool':>8} {'vs seq':>7}")
            for name, (up, down) in totals.items():
                width = int(name.rsplit(" ", 1)[1])
                ratio = (up + down) / sum(totals[pool_name(width)])
                print(f"{name:28} {up:7.2f}s {down:7.2f}s {up + down:7.2f}s {ratio:7.2f}x "
                      f"{(up + down) / sequential:6.2f}x")
                results[name] = {"up": up, "down": down, "ratio": ratio}
            for p, n in calls.items():
                print(f"engine API calls for 0 -> {args.count} at parallelism {p}: {n} "
                      f"({n / args.count:.1f} per container, listing included)")

            latencies = override_latency(dockerd, etcd, folder, args.trials, port)
            floors = floor_latency(dockerd, etcd, args.trials, port)
            median_ms = statistics.median(latencies) * 1000
            floor_ms = statistics.median(floors) * 1000
            print(f"etcdctl put override 1 -> first container created: median "
                  f"{median_ms:.0f} ms over {len(latencies)} trials "
                  f"(min {min(latencies) * 1000:.0f}, max {max(latencies) * 1000:.0f}; "
                  f"includes starting etcdctl) = x{median_ms / floor_ms:.2f} of a raw watch "
                  f"then the same containers.run: {floor_ms:.0f} ms")
            results["floor_override_to_create_ms"] = floor_ms
            results["override_to_create_ms"] = median_ms
            if args.json:
                print(json.dumps(results))
        finally:
            dockerd.close()
            etcd.close()


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        sys.exit(f"bench failed: {exc}")
