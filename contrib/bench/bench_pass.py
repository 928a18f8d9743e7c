"""Benchmark: one reconcile pass over 1,000 services with nothing to change.

For the embedded store and for a real etcd (v3 and v2 APIs; started here from
tests/services.py), it prints the time per pass, the store round trips per
pass, and, as ratios measured in the same run:

- against the floor: the raw prefix reads a pass makes, of the same keys (the
  cluster's, and the announcements), done directly with the store client: what a
  pass cannot avoid;
- against the naive loop: one read per service (what the design rules out).

Each service has one running instance (an in-memory actuator registered as a
plugin, so no processes are involved) and one announcement, so the pass does
all its work: parse, plan, health, announcer resync.

    python3 contrib/bench/bench_pass.py [--services 1000] [--passes 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent import Actuator, Context, Instance, TypeConfig, hookimpl  # noqa: E402
from agent.config import load_config  # noqa: E402
from agent.keys import Keys  # noqa: E402
from agent.plugins import load_plugins  # noqa: E402
from agent.reconcile import Reconciler  # noqa: E402
from agent.runtime import Builder  # noqa: E402
from agent.store import Store  # noqa: E402

ANNOUNCED = "/services/"  # the announcer's default key template: /services/{service}/...


class MemoryActuator(Actuator):
    """Reports one running instance per service; starting or stopping is a bug here."""

    type_name = "memory"
    Config = TypeConfig
    services: list[str] = []

    def list(self) -> list[Instance]:
        return [Instance(name=f"bench-{s}-0-v", service=s, slot=0, version="v",
                         host="127.0.0.1", port=10000 + i, cluster="bench")
                for i, s in enumerate(self.services)]

    def start(self, spec):
        raise AssertionError("nothing should start")

    def stop(self, instance, grace):
        raise AssertionError("nothing should stop")


def build(store: Store, n: int, folder: Path):
    names = [f"svc{i:04d}" for i in range(n)]
    MemoryActuator.services = names
    plugin = types.SimpleNamespace(shipmate_actuator_types=hookimpl(lambda: [MemoryActuator]))
    plugins = load_plugins(extra=[("bench", plugin)])
    lines = ["agent: {cluster: bench}", "defaults:", "  actuator: {type: memory}",
             "  announce: {type: etcd, ttl: 60s}", "  source: {type: static, count: 1}",
             "services:"] + [f"  {name}: {{}}" for name in names]
    path = folder / "bench.yaml"
    path.write_text("\n".join(lines) + "\n")
    config = load_config(path, plugins)
    keys = Keys(config.key_prefix)
    for name in names:
        store.put(keys.service(name, "desired"), "1")
    services = Builder(plugins, Context("bench", store, folder)).services(config)
    return Reconciler(services=services, store=store, keys=keys), keys, names


def one_pass(reconciler: Reconciler) -> None:
    views = reconciler.observe()
    actions = reconciler.plan(views)
    assert not actions, actions[:3]
    errors = reconciler.announce(views, set())
    assert not errors, errors[:3]


def measure(label: str, store: Store, n: int, passes: int, folder: Path) -> None:
    reconciler, keys, names = build(store, n, folder)
    one_pass(reconciler)  # writes the announcements once
    times, trips = [], []
    for _ in range(passes):
        before, started = store.round_trips, time.perf_counter()
        one_pass(reconciler)
        times.append(time.perf_counter() - started)
        trips.append(store.round_trips - before)
    floor = []
    for _ in range(passes):
        started = time.perf_counter()
        for prefix in (keys.services, ANNOUNCED):
            store.get_prefix(prefix)
        floor.append(time.perf_counter() - started)
    naive_started = time.perf_counter()
    for name in names:
        store.get(keys.service(name, "desired"))
    naive = time.perf_counter() - naive_started
    per_pass = statistics.median(times)
    print(f"{label:10s} {n} services: {per_pass * 1000:7.1f} ms/pass, "
          f"{statistics.median(trips):.0f} store round trips/pass | "
          f"x{per_pass / statistics.median(floor):.1f} two raw prefix reads "
          f"({statistics.median(floor) * 1000:.1f} ms) | "
          f"x{per_pass / naive:.2f} of a read per service ({naive * 1000:.0f} ms, {n} trips)")
    for runtime in reconciler.services.values():
        if runtime.announcer:
            runtime.announcer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--no-etcd", action="store_true", help="embedded store only")
    args = parser.parse_args()
    from agent.store.embedded import EmbeddedStore

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        measure("embedded", EmbeddedStore(folder / "state.db"), args.services, args.passes, folder)
        if args.no_etcd:
            return
        from agent.store.etcd2 import Etcd2Store
        from agent.store.etcd3 import Etcd3Store
        from tests.services import Etcd

        with Etcd() as etcd:
            measure("etcd (v3)", Etcd3Store([etcd.endpoint], timeout=5), args.services,
                    args.passes, folder)
            measure("etcd2", Etcd2Store([etcd.endpoint], timeout=5), args.services,
                    args.passes, folder)


if __name__ == "__main__":
    main()
