"""Profile: the loop's own unchanged pass (observe, plan, announce, deploys, problems,
metrics) over N services, on the embedded store and on a real etcd v3.

Each service runs one instance (an in-memory actuator, so no processes) announced
by the etcd announcer; the store holds every service's desired count. Prints per
backend: the start-up (the first pass, which announces everything), the median
unchanged pass and its store round trips, against one raw prefix read of the
same keys (the floor, measured in the same run); with ``--profile``, the top of a
cProfile of the watched unchanged passes; with ``--override``, the time from an override
written to the store to the actuator's first start (through the loop's own watch
wake-up and pass).

    python3 contrib/bench/profile_pass.py [--services 10000] [--passes 10]
        [--no-etcd] [--profile] [--override] [--no-announce]
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import statistics
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent import Actuator, Context, Instance, TypeConfig, hookimpl  # noqa: E402
from agent.config import load_config  # noqa: E402
from agent.keys import Keys  # noqa: E402
from agent.leader import Leadership  # noqa: E402
from agent.loop import Loop, Settings  # noqa: E402
from agent.plugins import load_plugins  # noqa: E402
from agent.runtime import Builder  # noqa: E402
from agent.store import Store  # noqa: E402


class MemoryActuator(Actuator):
    """One running instance per service; a start records itself and runs at once."""

    type_name = "memory"
    Config = TypeConfig
    services: list[str] = []
    running: list[Instance] = []  # slot 0 of every service, at the YAML's release
    started: list[tuple[float, str]] = []
    extra: list[Instance] = []

    def list(self) -> list[Instance]:
        # new objects on every list, as a real actuator builds them from what it reads
        return [Instance(i.name, i.service, i.slot, i.version, i.host, i.port, i.running,
                         i.cluster) for i in (*self.running, *self.extra)]

    def start(self, spec):
        MemoryActuator.started.append((time.perf_counter(), spec.name))
        instance = Instance(name=spec.name, service=spec.service, slot=spec.slot,
                            version=spec.version, host="127.0.0.1", port=spec.port,
                            cluster="bench")
        MemoryActuator.extra.append(instance)
        return instance

    def stop(self, instance, grace):
        MemoryActuator.extra = [i for i in MemoryActuator.extra if i.name != instance.name]


ANNOUNCE = True  # --no-announce: what the pass costs without the announcer's sync


def build(store: Store, n: int, folder: Path) -> tuple[Loop, Builder, float]:
    names = [f"svc{i:05d}" for i in range(n)]
    MemoryActuator.services, MemoryActuator.started, MemoryActuator.extra = names, [], []
    plugin = types.SimpleNamespace(shipmate_actuator_types=hookimpl(lambda: [MemoryActuator]))
    plugins = load_plugins(extra=[("bench", plugin)])
    lines = ["agent: {cluster: bench, interval: 600s}", "defaults:",
             "  actuator: {type: memory}",
             *(["  announce: {type: etcd, ttl: 600s}"] if ANNOUNCE else []),
             "  source: {type: static, count: 1, interval: 600s}", "services:"]
    lines += [f"  {name}: {{}}" for name in names]
    path = folder / f"bench-{n}.yaml"
    path.write_text("\n".join(lines) + "\n")
    config = load_config(path, plugins)
    keys = Keys(config.key_prefix)
    desired = {keys.service(name, "desired"): "1" for name in names}
    if hasattr(store, "create_many"):  # batched where the store can
        store.create_many(desired)
    else:
        for key, value in desired.items():
            store.put(key, value)
    builder = Builder(plugins, Context("bench", store, folder))
    services = builder.services(config)
    MemoryActuator.running = []
    for i, runtime in enumerate(services.values()):
        spec = runtime.spec(0, runtime.yaml_release)
        MemoryActuator.running.append(Instance(
            name=spec.name, service=spec.service, slot=0, version=spec.version,
            host="127.0.0.1", port=10000 + i % 50000, cluster="bench"))
    loop = Loop(store=store, keys=keys, services=services,
                leadership=Leadership(store, keys.leader), settings=Settings.from_config(
                    config.agent))
    follow = getattr(loop, "store_changed", lambda events: None)  # None: a checkout before it
    loop.watch = store.watch(keys.services, follow)  # as ``shipmate run`` does
    started = time.perf_counter()
    loop.leadership.campaign()
    loop.run_pass()  # the first pass: records releases, announces everything
    first = time.perf_counter() - started
    prober = getattr(loop, "prober", None)  # None: a checkout that probes in the pass
    deadline = time.monotonic() + 300
    while prober is not None and time.monotonic() < deadline and not (
            all(prober.health(i.name) is not None for i in MemoryActuator.running)
            and loop.health_synced()):
        time.sleep(0.1)  # the prober's first round (at most 1,000 probes a second)
    time.sleep(1.0)  # the first pass's own writes come back through the watch
    loop.run_pass()
    loop.run_pass()  # what the first probes announced is now what the pass sees
    return loop, builder, first


def measure(label: str, store: Store, n: int, passes: int, folder: Path, profile: bool,
            override: bool) -> None:
    loop, builder, first = build(store, n, folder)
    profilers = {kind: cProfile.Profile() for kind in ("full", "watched")} if profile else {}
    results = {}
    for kind in ("full", "watched"):
        times, trips = [], []
        for _ in range(passes):
            if kind == "full" and hasattr(loop, "store_changed"):  # every key read again
                loop.store_changed([])
            before, started = store.round_trips, time.perf_counter()
            profiler = profilers.get(kind)
            if profiler:
                profiler.enable()
            loop.run_pass()
            if profiler:
                profiler.disable()
            times.append(time.perf_counter() - started)
            trips.append(store.round_trips - before)
        results[kind] = (statistics.median(times), statistics.median(trips))
    floor = []
    for _ in range(passes):
        started = time.perf_counter()
        store.get_prefix(loop.keys.services)
        floor.append(time.perf_counter() - started)
    raw = statistics.median(floor)
    print(f"{label:9s} {n:6d} services: first pass {first:6.2f} s | raw prefix read "
          f"{raw * 1000:.1f} ms", flush=True)
    for kind, (per_pass, trips) in results.items():
        print(f"{label:9s} {n:6d} services: unchanged pass ({kind:7s}) {per_pass * 1000:7.1f}"
              f" ms, {trips:.0f} round trips | x{per_pass / raw:.2f} one raw prefix read",
              flush=True)
    for kind, profiler in profilers.items():
        print(f"--- profile of the {kind} passes")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    if override:
        print(f"{label:9s} {n:6d} services: override -> first start "
              f"{react(loop, store) * 1000:.0f} ms (median of 5)", flush=True)
    loop.watch.cancel()
    loop.close()
    builder.close()


def react(loop: Loop, store: Store) -> float:
    """Median time from an override's put to the actuator's first start, with the loop
    running on a thread of its own and woken by its store watch, as ``shipmate run`` is."""
    def changed(events) -> None:  # as the agent's own watch callback (agent/runtime.py)
        getattr(loop, "store_changed", lambda events: None)(events)
        if events and all((loop.keys.parse(e.key) or ("", ""))[1] in ("policy", "problems")
                          for e in events):
            return  # the agent's own bookkeeping needs no pass
        loop.request_pass()

    loop.watch.cancel()
    loop.watch = store.watch(loop.keys.services, changed)
    loop._was_leading = True  # it leads already: no round of 10,000 polls now
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    waits = []
    name = MemoryActuator.services[0]
    key = loop.keys.service(name, "override")
    for count in range(2, 7):  # each override starts one more slot
        time.sleep(0.3)  # let the loop settle into its sleep
        seen = len(MemoryActuator.started)
        put = time.perf_counter()
        store.put(key, str(count))
        deadline = time.monotonic() + 30
        while len(MemoryActuator.started) == seen and time.monotonic() < deadline:
            time.sleep(0.001)
        if len(MemoryActuator.started) == seen:
            raise SystemExit(f"override {count}: nothing started within 30 s")
        waits.append(MemoryActuator.started[seen][0] - put)
    loop.request_stop()
    runner.join(30)
    store.delete(key)
    return statistics.median(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--no-etcd", action="store_true", help="embedded store only")
    parser.add_argument("--no-embedded", action="store_true", help="etcd only")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--override", action="store_true")
    parser.add_argument("--no-announce", action="store_true",
                        help="no announcer (what the rest of the pass costs)")
    args = parser.parse_args()
    global ANNOUNCE
    ANNOUNCE = not args.no_announce
    logging.getLogger("shipmate").setLevel(logging.ERROR)  # polls left over at the end
    from agent.store.embedded import EmbeddedStore

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.no_embedded:
            measure("embedded", EmbeddedStore(folder / "state.db"), args.services,
                    args.passes, folder, args.profile, args.override)
        if args.no_etcd:
            return
        from agent.store.etcd3 import Etcd3Store
        from tests.services import Etcd

        with Etcd() as etcd:
            measure("etcd (v3)", Etcd3Store([etcd.endpoint], timeout=5), args.services,
                    args.passes, folder, args.profile, args.override)


if __name__ == "__main__":
    main()
