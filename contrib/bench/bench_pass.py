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

With ``--health`` every service has ``health: {http: /}`` (each instance is a
port of one local HTTP server) and the pass is timed twice in the same run:
probing every instance itself (as ``shipmate status`` does, and as every pass
did before probes moved off it) and reading the results of the agent's
:class:`agent.probes.Prober`, which probes on its own threads; their ratio is
what moving the probes off the pass saves; a pass with no health block, in
the same run, is the baseline of both.

    python3 contrib/bench/bench_pass.py [--services 1000] [--passes 20] [--health]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
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
from agent.probes import Prober  # noqa: E402
from agent.reconcile import Reconciler  # noqa: E402
from agent.runtime import Builder  # noqa: E402
from agent.store import Store  # noqa: E402

ANNOUNCED = "/services/"  # the announcer's default key template: /services/{service}/...


class MemoryActuator(Actuator):
    """Reports one running instance per service; starting or stopping is a bug here."""

    type_name = "memory"
    Config = TypeConfig
    services: list[str] = []
    port: int | None = None  # every instance on one HTTP server (--health)

    def list(self) -> list[Instance]:
        return [Instance(name=f"bench-{s}-0-v", service=s, slot=0, version="v",
                         host="127.0.0.1", port=self.port or 10000 + i, cluster="bench")
                for i, s in enumerate(self.services)]

    def start(self, spec):
        raise AssertionError("nothing should start")

    def stop(self, instance, grace):
        raise AssertionError("nothing should stop")


def build(store: Store, n: int, folder: Path, health: bool = False,
          prober: Prober | None = None):
    names = [f"svc{i:04d}" for i in range(n)]
    MemoryActuator.services = names
    plugin = types.SimpleNamespace(shipmate_actuator_types=hookimpl(lambda: [MemoryActuator]))
    plugins = load_plugins(extra=[("bench", plugin)])
    lines = ["agent: {cluster: bench}", "defaults:", "  actuator: {type: memory}",
             "  announce: {type: etcd, ttl: 60s}", "  source: {type: static, count: 1}",
             *(["  health: {http: /, timeout: 2s}"] if health else []),
             "services:"] + [f"  {name}: {{}}" for name in names]
    path = folder / "bench.yaml"
    path.write_text("\n".join(lines) + "\n")
    config = load_config(path, plugins)
    keys = Keys(config.key_prefix)
    for name in names:
        store.put(keys.service(name, "desired"), "1")
    services = Builder(plugins, Context("bench", store, folder)).services(config)
    return Reconciler(services=services, store=store, keys=keys, prober=prober), keys, names


def one_pass(reconciler: Reconciler) -> None:
    views = reconciler.observe()
    actions = reconciler.plan(views)
    assert not actions, actions[:3]
    errors = reconciler.announce(views, set())
    assert not errors, errors[:3]


HEALTH_SERVER = """
import http.server, sys

class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True

Server(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""


def serve_health() -> tuple[subprocess.Popen[bytes], int]:
    """A local HTTP server answering 200 to every probe, in a process of its own (its
    work is not the agent's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", HEALTH_SERVER, str(port)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("the health server did not start")


def measure(label: str, store: Store, n: int, passes: int, folder: Path,
            health: bool = False) -> None:
    if health:
        bare = time_passes(store, n, passes, folder)
        server, MemoryActuator.port = serve_health()
        try:
            in_pass = time_passes(store, n, passes, folder, health=True)
            prober = Prober()
            try:
                off = time_passes(store, n, passes, folder, health=True, prober=prober)
            finally:
                prober.close()
        finally:
            server.kill()
            server.wait()
            MemoryActuator.port = None
        print(f"{label:10s} {n} services, health {{http: /}}: probing in the pass "
              f"{in_pass * 1000:.1f} ms/pass, reading the prober's results "
              f"{off * 1000:.1f} ms/pass (x{off / in_pass:.2f}) | no health block "
              f"{bare * 1000:.1f} ms/pass: x{in_pass / bare:.1f} probing in the pass, "
              f"x{off / bare:.2f} reading")
        return
    time_passes(store, n, passes, folder, label=label)


def time_passes(store: Store, n: int, passes: int, folder: Path, *, health: bool = False,
                prober: Prober | None = None, label: str | None = None) -> float:
    reconciler, keys, names = build(store, n, folder, health=health, prober=prober)
    if prober is not None:  # the agent's prober has looked at every instance once
        reconciler.observe()
        deadline = time.monotonic() + 120
        while (any(prober.health(f"bench-{s}-0-v") is None for s in names)
               and time.monotonic() < deadline):
            time.sleep(0.05)
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
    for runtime in reconciler.services.values():
        if runtime.announcer:
            runtime.announcer.close()
    if label is None:
        return per_pass
    print(f"{label:10s} {n} services: {per_pass * 1000:7.1f} ms/pass, "
          f"{statistics.median(trips):.0f} store round trips/pass | "
          f"x{per_pass / statistics.median(floor):.1f} two raw prefix reads "
          f"({statistics.median(floor) * 1000:.1f} ms) | "
          f"x{per_pass / naive:.2f} of a read per service ({naive * 1000:.0f} ms, {n} trips)")
    return per_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--no-etcd", action="store_true", help="embedded store only")
    parser.add_argument("--health", action="store_true",
                        help="with a health block: probing in the pass against the prober")
    args = parser.parse_args()
    from agent.store.embedded import EmbeddedStore

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        measure("embedded", EmbeddedStore(folder / "state.db"), args.services, args.passes,
                folder, args.health)
        if args.no_etcd:
            return
        from agent.store.etcd2 import Etcd2Store
        from agent.store.etcd3 import Etcd3Store
        from tests.services import Etcd

        with Etcd() as etcd:
            measure("etcd (v3)", Etcd3Store([etcd.endpoint], timeout=5), args.services,
                    args.passes, folder, args.health)
            measure("etcd2", Etcd2Store([etcd.endpoint], timeout=5), args.services,
                    args.passes, folder, args.health)


if __name__ == "__main__":
    main()
