"""Benchmark: from an override to the first announced key, and from healthy to announced.

A real ``shipmate run`` agent (the process actuator, ``health: {http: /}``, the
etcd announcer) on the embedded store and on a real etcd (v3 API; started here
from tests/services.py). Each round puts ``override`` 1 for a service at 0 and
times, until its key is in the store (polled every 5 ms):

- from the put of the override (the whole reaction: watch, pass, start, probe,
  announce);
- from the moment the new instance's HTTP server was listening (it writes the
  time into a file just after ``listen``): what announcing on health costs;
- and, to tell the parts apart, from the override to the start's beginning
  (the process actuator's record);

then puts 0 and waits until the instance is gone. Medians over ``--rounds``
(default 10), against a floor measured in the same run: a raw client that
watches the override key with the same store client, starts the same server
itself, polls its port every 5 ms until it answers and puts one key.

    python3 contrib/bench/bench_announce.py [--rounds 10] [--no-etcd]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agents import agent, kill_instances, wait_for  # noqa: E402

from agent.store import Store  # noqa: E402

SERVER = """
import http.server, socket, sys, time

class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok)
with open(sys.argv[2], "w") as out:
    out.write(repr(time.time()))
server.serve_forever()
"""

CONFIG = """
agent:
  cluster: bench
  interval: 10s
  store: {store}
services:
  web:
    command: ["{python}", "{folder}/server.py", "{{port}}", "{folder}/bound-{{instance}}"]
    port: {port}
    health: {{http: /, timeout: 1s}}
    source: {{type: static, count: 0}}
    actuator: {{type: process}}
    announce: {{type: etcd, ttl: 30s, drain: 0s}}
"""


def first_key(store: Store, prefix: str, timeout: float = 30) -> float:
    """Poll until a key is under ``prefix``; the wall time it was seen."""
    wait_for(lambda: store.get_prefix(prefix), timeout)
    return time.time()


def agent_rounds(store: Store, folder: Path, rounds: int
                 ) -> tuple[list[float], list[float], list[float]]:
    override = "/shipmate/bench/services/web/override"
    reaction, on_health, to_start = [], [], []
    for _ in range(rounds):
        for old in folder.glob("bound-*"):
            old.unlink()
        asked = time.time()
        store.put(override, "1")
        seen = first_key(store, "/services/web/")
        (bound,) = [float(p.read_text() or "nan") for p in folder.glob("bound-*")]
        (record,) = folder.glob("state/processes/bench/*.json")
        reaction.append(seen - asked)
        on_health.append(seen - bound)
        to_start.append(json.loads(record.read_text())["written"] - asked)
        store.put(override, "0")
        wait_for(lambda: not store.get_prefix("/services/web/")
                 and not list(folder.glob("state/processes/bench/*.json")), 60)
    return reaction, on_health, to_start


def floor_rounds(store: Store, folder: Path, port: int, rounds: int) -> list[float]:
    """A raw client: watch the override, start the server, poll it, put one key."""
    key, override = "/floor/web/0", "/floor/override"
    times = []
    for _ in range(rounds):
        started = threading.Event()
        server: list[subprocess.Popen[bytes]] = []

        def act(events: list, server: list = server, started: threading.Event = started
                ) -> None:
            if started.is_set() or not any(e.key == override and e.value for e in events):
                return
            started.set()
            server.append(subprocess.Popen([sys.executable, str(folder / "server.py"),
                                            str(port), str(folder / "floor-bound")]))
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                    conn.request("GET", "/")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.005)
                finally:
                    conn.close()
            store.put(key, f"127.0.0.1:{port}")

        watch = store.watch("/floor/", act)
        time.sleep(0.5)  # the watch is up
        asked = time.time()
        store.put(override, "1")
        times.append(first_key(store, key) - asked)
        watch.cancel()
        server[0].kill()
        server[0].wait()
        store.delete(key)
        store.delete(override)
    return times


def measure(label: str, store: Store, store_yaml: str, rounds: int) -> None:
    from tests.helpers import port_block

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "server.py").write_text(SERVER)
        port = port_block(2)
        floor = floor_rounds(store, folder, port + 1, rounds)
        config = folder / "agent.yaml"
        config.write_text(CONFIG.format(store=store_yaml, folder=folder, port=port,
                                        python=sys.executable)
                          .replace("agent:\n", f"agent:\n  state_dir: {folder}/state\n", 1))
        process = agent(config)
        try:
            time.sleep(3)  # leading, first pass done
            reaction, on_health, to_start = agent_rounds(store, folder, rounds)
        finally:
            process.terminate()
            process.wait(60)
            kill_instances("bench")
        r, h, f, s = (statistics.median(x) for x in (reaction, on_health, floor, to_start))
        print(f"{label:9s} override -> first announced key: {r * 1000:.0f} ms (median of "
              f"{rounds}; floor {f * 1000:.0f} ms: x{r / f:.2f}) | listening -> announced: "
              f"{h * 1000:.0f} ms (max {max(on_health) * 1000:.0f} ms) | override -> start "
              f"begun: {s * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-etcd", action="store_true", help="embedded store only")
    args = parser.parse_args()
    from agent.store.embedded import EmbeddedStore

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.db"
        measure("embedded", EmbeddedStore(path), f"{{backend: embedded, path: {path}}}",
                args.rounds)
    if args.no_etcd:
        return
    from agent.store.etcd3 import Etcd3Store
    from tests.services import Etcd

    with Etcd() as etcd:
        measure("etcd (v3)", Etcd3Store([etcd.endpoint], timeout=5),
                f'{{backend: etcd, endpoints: ["{etcd.endpoint}"]}}', args.rounds)


if __name__ == "__main__":
    main()
