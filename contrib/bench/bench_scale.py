"""Benchmark: what one agent costs as its cluster grows (100 to 50,000 services).

For each size and store (``--backend embedded,etcd``; etcd v3 is started here
from tests/services.py) a real agent runs in a child process (``Agent.run``
with one in-bench actuator plugin registered via ``load_plugins(extra=...)``),
and the bench prints, each against a baseline measured in the same run:

- start-up: from spawning the agent to its first pass after every source was
  polled, and the store round trips it took; against a floor process that
  imports the store client, reads the pass's prefixes and writes as many keys
  as the agent did, in batches (etcd: transactions of 128 puts; embedded: one
  SQLite transaction);
- one unchanged pass, without and then (after a reload) with a
  ``health: {http: /}`` block, one at ``agent.interval`` (every announcement
  synced) and one full resync (``agent.resync``: every key's revision compared
  too); against the raw prefix reads a pass makes (the cluster's keys:
  desired, policy, release...; and the announcements), done directly with the
  store client, interleaved with the agent's passes;
- with everything running: from a ``put`` of an override to the first start of a
  real process instance (busybox httpd) and to its announcement; against a raw
  watch on a key that then starts the same command (and waits for its HTTP
  answer, then puts one key);
- scale-out of that service 0 -> ``--scale-out`` processes; against a thread
  pool of the same width starting the same commands;
- store writes per idle minute (counted as store revisions over ``--idle``
  seconds, scaled to a minute; sources polled every ``--poll`` seconds; the
  floor is 0), agent round trips, RSS and CPU while idle; against the floor
  process reading the pass's prefixes every ``interval`` over the same window.

Every service but one has one instance of the ``memory`` actuator (instances are
entries in the agent's memory, found running at start as after a restart; their
health port is a small HTTP server in this process), a static count of 1 and an
etcd-style announcement. The reacting service is a real ``process`` service.
Round trips are the store client's own count (``Store.round_trips``: every HTTP
request to etcd, every SQLite transaction) read in the agent's process.

    python3 contrib/bench/bench_scale.py [--sizes 100,1000,10000,50000]
        [--backend embedded,etcd] [--passes 5] [--trials 3] [--idle 10]

100 and 1,000 services take about a minute per store; 10,000 and 50,000 take
minutes (a size that does not start within ``--timeout`` is reported and skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agents import ROOT, cpu_seconds, kill_instances, rss_mb  # noqa: E402

from agent import Actuator, Instance, InstanceSpec, TypeConfig, hookimpl  # noqa: E402

SIZES = [100, 1000, 10_000, 50_000]
HEALTH_WORKERS = 16  # the pass's health-check pool (Reconciler.health_workers)
BATCH = 128  # etcd's default --max-txn-ops
WWW = "www"  # the folder busybox httpd serves (index.html: 200 on /)


# ------------------------------------------------------------------ the in-bench actuator
class MemoryActuator(Actuator):
    """Instances are entries in this dict: starting and stopping cost nothing, so the
    agent's own work is what is measured. Their health port is the bench's HTTP server."""

    type_name = "memory"
    Config = TypeConfig
    parallelism = 64
    instances: dict[str, Instance] = {}
    health_port = int(os.environ.get("BENCH_HEALTH_PORT", "0")) or None

    def list(self) -> list[Instance]:
        return list(self.instances.values())

    def start(self, spec: InstanceSpec) -> Instance:
        made = Instance(name=spec.name, service=spec.service, slot=spec.slot,
                        version=spec.version, host="127.0.0.1", port=self.health_port,
                        cluster=spec.cluster)
        self.instances[spec.name] = made
        return made

    def stop(self, instance: Instance, grace: float) -> None:
        self.instances.pop(instance.name, None)


PLUGIN = types.SimpleNamespace(shipmate_actuator_types=hookimpl(lambda: [MemoryActuator]))


def config_text(cluster: str, folder: Path, backend: str, endpoint: str, n: int, *,
                health: bool, port: int, width: int, poll: float) -> str:
    store = (f'{{backend: etcd, endpoints: ["{endpoint}"]}}' if backend == "etcd"
             else f"{{backend: embedded, path: {folder}/state.db}}")
    # one announcer for all (one prefix read a pass); no drain: no wait between the trials
    announce = (f"type: etcd, ttl: 60s, key: '/announce/{cluster}/{{service}}/{{instance}}', "
                "drain: 0s")
    lines = [
        "agent:",
        f"  cluster: {cluster}",
        f"  store: {store}",
        f"  state_dir: {folder}/state",
        f"  max_instances: {max(width, 100)}",
        "defaults:",
        "  actuator: {type: memory}",
        f"  announce: {{{announce}}}",
        f"  source: {{type: static, count: 1, interval: {poll}s}}",
    ]
    if health:
        lines.append("  health: {http: /, timeout: 2s}")
    lines += [
        "services:",
        "  react:",
        f"    command: [busybox, httpd, -f, -p, '{{port}}', -h, {folder / WWW}]",
        f"    port: {port}",
        "    actuator: {type: process}",
        f"    source: {{type: static, count: 0, interval: {poll}s}}",
        f"    policy: {{max: {width}}}",
        "    health: {http: /, timeout: 2s}",
    ]
    lines += [f"  s{i:05d}: {{}}" for i in range(n)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the agent's process
def child(config: Path) -> None:
    """Run the agent on ``config``; answer the bench's commands (stdin) with JSON (fd 1)."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to the log
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from agent.plugins import load_plugins
    from agent.runtime import Agent

    agent = Agent(config, plugins=load_plugins(extra=[("bench-memory", PLUGIN)]))
    for runtime in agent.services.values():  # found running, as after a restart
        if isinstance(runtime.actuator, MemoryActuator):
            runtime.actuator.start(runtime.spec(0, runtime.yaml_release))
    loop, store = agent.loop, agent.store
    done = threading.Condition()
    passes: list[tuple[float, float, int, int, bool]] = []  # began, seconds, trips, all, ok
    own = [0]  # store calls made by the pass: on the loop's thread and its health pool

    def counted(call: Callable[..., Any]) -> Callable[..., Any]:
        def calling(*args: Any, **kwargs: Any) -> Any:
            thread = threading.current_thread()
            if thread is threading.main_thread() or thread.name.startswith("ThreadPool"):
                own[0] += 1
            return call(*args, **kwargs)
        return calling

    for method in ("get", "get_prefix", "put", "create", "replace", "delete", "lease_left",
                   "lease", "watch"):
        setattr(store, method, counted(getattr(store, method)))
    polls = [0, 0.0]  # completed, when the last one ended
    reloads = [0]
    starts: list[float] = []
    stops = [0]

    inner_pass = loop._pass

    def timed_pass() -> None:
        began, trips, mine, t0 = time.time(), store.round_trips, own[0], time.perf_counter()
        ok = False
        try:
            inner_pass()
            ok = True
        finally:
            with done:
                passes.append((began, time.perf_counter() - t0, own[0] - mine,
                               store.round_trips - trips, ok))
                done.notify_all()

    inner_poll = loop.poll_now

    def counted_poll(name: str) -> None:
        inner_poll(name)
        with done:
            polls[0] += 1
            polls[1] = time.time()
            done.notify_all()

    inner_reload = agent.reload

    def counted_reload() -> None:
        inner_reload()
        with done:
            reloads[0] += 1
            done.notify_all()

    react = agent.services["react"].actuator
    inner_start, inner_stop = react.start, react.stop

    def timed_start(spec: InstanceSpec) -> Instance:
        made = inner_start(spec)
        with done:
            starts.append(time.time())
        return made

    def counted_stop(instance: Instance, grace: float) -> None:
        inner_stop(instance, grace)
        with done:
            stops[0] += 1

    loop._pass, loop.poll_now, loop.on_reload = timed_pass, counted_poll, counted_reload
    react.start, react.stop = timed_start, counted_stop  # type: ignore[method-assign]
    width = max(1, min(agent.config.agent.parallelism, getattr(react, "parallelism", 1)))
    total = len(agent.services)

    def wait(check: Callable[[], Any], timeout: float) -> Any:
        with done:
            return done.wait_for(check, timeout)

    def a_pass_after(t: float, timeout: float) -> dict[str, Any]:
        got = wait(lambda: next((p for p in passes if p[0] >= t), None), timeout)
        return ({"seconds": got[1], "trips": got[2], "all": got[3], "ok": got[4]} if got
                else {"ok": False})

    def answer(line: str) -> dict[str, Any]:
        command, *args = line.split()
        timeout = float(args[0]) if args else 600.0
        if command == "ready":  # every source polled, then a whole pass: within timeout
            deadline = time.monotonic() + timeout
            if not wait(lambda: polls[0] >= total, timeout):
                return {"ok": False, "polls": polls[0], "trips": store.round_trips}
            after = a_pass_after(polls[1], max(0.0, deadline - time.monotonic()))
            return {"ok": after["ok"], "at": time.time(), "trips": store.round_trips,
                    "width": width, "polls": polls[0]}
        if command in ("pass", "interval", "resync"):  # watched; every interval; agent.resync
            began = time.time()
            if command == "interval":  # as a pass at agent.interval: every announcement synced
                loop.reconciler._synced_all = float("-inf")
            if command == "resync":  # as one at agent.resync: every key's revision compared
                loop.store_changed([])
            loop.request_pass()
            return a_pass_after(began, timeout)
        if command == "reload":
            began, before = time.time(), reloads[0]
            loop.request_reload()
            if not wait(lambda: reloads[0] > before, timeout):
                return {"ok": False}
            reloaded = time.time() - began
            return {**a_pass_after(time.time(), timeout), "reload": reloaded}
        if command == "stats":
            with done:
                return {"trips": store.round_trips, "starts": list(starts), "stops": stops[0],
                        "failed_passes": sum(not p[4] for p in passes)}
        if command == "quit":
            agent.stop()
            return {"ok": True}
        return {"error": f"unknown command {command!r}"}

    def serve() -> None:
        for line in sys.stdin:
            if line.strip():
                replies.write(json.dumps(answer(line)) + "\n")
        agent.stop()

    threading.Thread(target=serve, name="bench-commands", daemon=True).start()
    sys.exit(agent.run())


class Child:
    """The agent's process, seen from the bench."""

    def __init__(self, config: Path, log: Path, health_port: int) -> None:
        self.log = log
        env = {**os.environ, "BENCH_HEALTH_PORT": str(health_port)}
        self.spawned = time.time()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--child", str(config)], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("ab"), text=True)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the agent exited ({self.process.poll()}); its log:\n"
                               + self.tail())
        return json.loads(line)

    def tail(self, lines: int = 8) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.ask("quit")
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ------------------------------------------------------------------ the floor's process
def floor_child(spec: str) -> None:
    """Import the store client, read the pass's prefixes, write ``writes`` keys in batches;
    print what it took; then read the prefixes every ``interval`` for ``idle`` seconds."""
    args = json.loads(spec)
    store = open_store(args["backend"], args["where"])
    held = [store.get_prefix(prefix) for prefix in args["prefixes"]]
    value = "x" * args["value_size"]
    keys = [f"/bench-floor/{args['cluster']}/{i}" for i in range(args["writes"])]
    batched_put(store, keys, value)
    print(json.dumps({"at": time.time(), "trips": store.round_trips,
                      "entries": sum(map(len, held))}), flush=True)
    sys.stdin.readline()  # the bench starts both idle windows together
    cpu0, started = time.process_time(), time.monotonic()
    while time.monotonic() - started < args["idle"]:
        held = [store.get_prefix(prefix) for prefix in args["prefixes"]]
        time.sleep(max(0.0, min(args["interval"], args["idle"] - (time.monotonic() - started))))
    print(json.dumps({"cpu": time.process_time() - cpu0, "rss": rss_mb(os.getpid())}),
          flush=True)


def open_store(backend: str, where: str) -> Any:
    if backend == "etcd":
        from agent.store.etcd3 import Etcd3Store

        return Etcd3Store([where], timeout=60)
    from agent.store.embedded import EmbeddedStore

    return EmbeddedStore(where)


def batched_put(store: Any, keys: list[str], value: str) -> None:
    """Write every key with as few requests as the backend allows."""
    from agent.store.embedded import EmbeddedStore

    if isinstance(store, EmbeddedStore):
        with store._tx() as db:
            for key in keys:
                store._write(db, key, value)
        return
    from agent.store.etcd3 import _b64

    for i in range(0, len(keys), BATCH):
        store._txn([], [{"request_put": {"key": _b64(k), "value": _b64(value)}}
                        for k in keys[i:i + BATCH]])


def revision(store: Any) -> int:
    from agent.store.embedded import EmbeddedStore

    if isinstance(store, EmbeddedStore):
        with store._tx() as db:
            return db.execute("SELECT rev FROM meta").fetchone()[0]
    return store._head()


# ------------------------------------------------------------------ the bench
class HealthServer:
    """Answers 200 to every GET: the memory instances' health endpoint."""

    def __init__(self) -> None:
        class Quiet(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the handler's API
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 1024  # the default 5 drops the health workers' SYNs (1 s)

        server = Server(("127.0.0.1", 0), Quiet)
        server.daemon_threads = True
        self.server, self.port = server, server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()


def answers(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{port}/", timeout=1) as reply:
            if reply.status < 400:
                return True
        time.sleep(0.005)
    return False


def raw_probes(port: int, count: int) -> float:
    """Seconds per health probe of the agent's own ``probe`` on the bench's HTTP server, from
    another process on a pool as wide as the pass's (timed over ``count``)."""
    code = (f"import time\nfrom concurrent.futures import ThreadPoolExecutor\n"
            f"from agent.health import probe\nfrom agent.config import HealthConfig\n"
            f"from agent.instances import Instance\n"
            f"i = Instance('i', 's', 0, 'v', '127.0.0.1', {port})\n"
            f"check, t = HealthConfig(http='/'), time.perf_counter()\n"
            f"with ThreadPoolExecutor({HEALTH_WORKERS}) as pool:\n"
            f"    assert all(pool.map(lambda _: probe(i, check), range({count})))\n"
            f"print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return float(out) / count


def spawn(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """The reacting service's command, as the process actuator starts it."""
    with (folder / "floor.log").open("ab") as log:
        return subprocess.Popen(["busybox", "httpd", "-f", "-p", str(port), "-h",
                                 str(folder / WWW)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def end(processes: list[subprocess.Popen[bytes]]) -> None:
    for p in processes:
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def poll_until(check: Callable[[], Any], timeout: float, what: str, step: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


class Run:
    """One size on one store: the agent, its floors, the figures."""

    def __init__(self, args: argparse.Namespace, backend: str, n: int, folder: Path,
                 endpoint: str, health: HealthServer) -> None:
        from agent.keys import Keys

        self.args, self.backend, self.n, self.folder = args, backend, n, folder
        self.cluster = f"scale{n}"
        self.where = endpoint if backend == "etcd" else str(folder / "state.db")
        self.endpoint, self.health = endpoint, health
        self.keys = Keys(f"/shipmate/{self.cluster}")
        self.announced = f"/announce/{self.cluster}/"
        self.prefixes = [self.keys.services, self.announced]
        self.store = open_store(backend, self.where)
        self.rows: list[tuple[str, str, str]] = []
        self.width = 4
        self.port = 0
        self.floor: subprocess.Popen[str] | None = None

    def row(self, what: str, value: str, versus: str) -> None:
        self.rows.append((what, value, versus))

    def write_config(self, health: bool) -> Path:
        from tests.helpers import port_block

        self.port = self.port or port_block(self.args.scale_out)
        path = self.folder / "agent.yaml"
        path.write_text(config_text(self.cluster, self.folder, self.backend, self.endpoint,
                                    self.n, health=health, port=self.port,
                                    width=self.args.scale_out, poll=self.args.poll))
        return path

    def timeout(self) -> float:
        return self.args.timeout or 60 + self.n * 0.03

    # -------------------------------------------------------------- phases
    def go(self) -> None:
        (self.folder / WWW).mkdir(exist_ok=True)
        (self.folder / WWW / "index.html").write_text("ok\n")
        config = self.write_config(health=False)
        before = revision(self.store)
        agent = Child(config, self.folder / "agent.log", self.health.port)
        try:
            ready = agent.ask(f"ready {self.timeout()}")
            if not ready["ok"]:
                self.row("start-up", f"not ready in {self.timeout():.0f} s",
                         f"{ready.get('polls', 0)} of {self.n + 1} polls done, then no "
                         f"whole pass; {ready['trips']} trips; log: {agent.tail(1)[:100]}")
                return
            self.width = ready["width"]
            startup, trips = ready["at"] - agent.spawned, ready["trips"]
            writes = revision(self.store) - before
            floor = self.start_floor(writes)
            self.row("start-up", f"{startup:.2f} s, {trips} trips, {writes} writes",
                     f"x{startup / floor['seconds']:.1f} / x{trips / floor['trips']:.0f} "
                     f"floor {floor['seconds']:.2f} s, {floor['trips']} trips")
            self.passes(agent, "unchanged pass")
            self.passes(agent, "pass at agent.interval", command="interval")
            self.passes(agent, "full resync (agent.resync)", command="resync")
            self.idle(agent, floor)
            self.reactions(agent)
            self.scale_out(agent)
            self.write_config(health=True)
            reload = agent.ask(f"reload {self.timeout()}")
            if reload.get("ok"):
                self.passes(agent, "pass, health: {http: /}", probes=True)
            else:
                self.row("pass, health: {http: /}", "reload failed", agent.tail(1)[:100])
            failed = agent.ask("stats")["failed_passes"]
            if failed:
                self.row("failed passes", str(failed), f"log: {agent.tail(1)[:100]}")
        finally:
            agent.stop()
            kill_instances(self.cluster)
            if self.floor is not None and self.floor.poll() is None:
                self.floor.kill()
                self.floor.wait()
            self.store.close()

    def start_floor(self, writes: int) -> dict[str, Any]:
        entries = self.store.get_prefix(self.keys.services)
        size = max(1, round(statistics.mean(len(e.value) for e in entries.values())))
        spec = json.dumps({"backend": self.backend, "where": self.where, "cluster": self.cluster,
                           "prefixes": self.prefixes, "writes": writes, "value_size": size,
                           "interval": 10.0, "idle": self.args.idle})
        spawned = time.time()
        self.floor = subprocess.Popen([sys.executable, __file__, "--floor", spec], cwd=ROOT,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.floor.stdout
        line = self.floor.stdout.readline()
        if not line:
            raise RuntimeError("the floor process failed")
        got = json.loads(line)
        return {"seconds": got["at"] - spawned, "trips": got["trips"]}

    def passes(self, agent: Child, what: str, probes: bool = False,
               command: str = "pass") -> None:
        times, trips, others, floor = [], [], [], []
        count = self.args.passes if self.n < 10_000 and not probes else min(self.args.passes, 3)
        for _ in range(count):
            got = agent.ask(f"{command} {self.timeout()}")
            if not got.get("ok"):
                self.row(what, "failed", agent.tail(1)[:100])
                return
            times.append(got["seconds"])
            trips.append(got["trips"])
            others.append(got["all"] - got["trips"])
            t0 = time.perf_counter()
            for prefix in self.prefixes:
                self.store.get_prefix(prefix)
            floor.append(time.perf_counter() - t0)
        took, base = statistics.median(times), statistics.median(floor)
        floor_text = f"{len(self.prefixes)} raw prefix reads {base * 1000:.0f} ms"
        if probes:
            each = raw_probes(self.health.port, min(self.n, 500))
            base += each * self.n
            floor_text += (f" + {self.n} raw probes on {HEALTH_WORKERS} threads "
                           f"{each * self.n * 1000:.0f} ms")
        self.row(what, f"{took * 1000:.0f} ms, {statistics.median(trips):.0f} trips",
                 f"x{took / base:.1f} {floor_text} (other threads meanwhile: "
                 f"{statistics.median(others):.0f} trips)")

    def idle(self, agent: Child, floor: dict[str, Any]) -> None:
        pid, window = agent.process.pid, self.args.idle
        rev, trips, cpu = revision(self.store), agent.ask("stats")["trips"], cpu_seconds(pid)
        assert self.floor and self.floor.stdin and self.floor.stdout
        self.floor.stdin.write("go\n")
        self.floor.stdin.flush()
        time.sleep(window)
        writes = revision(self.store) - rev
        trips = agent.ask("stats")["trips"] - trips
        cpu = (cpu_seconds(pid) - cpu) / window * 100
        rss = rss_mb(pid)
        got = json.loads(self.floor.stdout.readline() or "{}")
        self.floor.wait(30)
        per_minute = 60 / window
        self.row("idle store writes/min", f"{writes * per_minute:.0f}",
                 f"floor 0 ({writes} in {window:g} s, polls every {self.args.poll:g} s)")
        # a pass's prefix reads every interval (10 s), the leader lease's keep-alive every
        # leader_ttl / 3 (5 s) and the announcer lease's every ttl / 3 (20 s)
        floor_trips = len(self.prefixes) * 6 + 12 + 3
        self.row("idle round trips/min", f"{trips * per_minute:.0f}",
                 f"x{trips * per_minute / floor_trips:.1f} floor {floor_trips} "
                 "(reads each interval + keep-alives)")
        floor_cpu = got.get("cpu", math.nan) / window * 100
        self.row("idle CPU", f"{cpu:.1f} % of a core",
                 f"x{cpu / max(floor_cpu, 0.01):.0f} floor {floor_cpu:.2f} %")
        self.row("RSS", f"{rss:.0f} MB", f"x{rss / got.get('rss', math.nan):.1f} floor "
                 f"{got.get('rss', math.nan):.0f} MB (store client + the keys read)")

    def reactions(self, agent: Child) -> None:
        override = self.keys.service("react", "override")
        to_start, to_announce = [], []
        for _ in range(self.args.trials):
            seen = len(agent.ask("stats")["starts"])
            began = time.time()
            self.store.put(override, "1")
            got = poll_until(lambda s=seen: agent.ask("stats")["starts"][s:] or None,
                             30 + self.n * 0.01, "a start")
            to_start.append(got[0] - began)
            poll_until(lambda: self.announced_react(), 30 + self.n * 0.01, "the announcement")
            to_announce.append(time.time() - began)
            self.store.put(override, "0")
            self.settle(agent)
        floor_start, floor_announce = self.floor_reactions()
        start, first = statistics.median(to_start), statistics.median(floor_start)
        self.row("override -> first start", f"{start * 1000:.0f} ms",
                 f"x{start / first:.1f} raw watch + the same start {first * 1000:.0f} ms")
        ann, base = statistics.median(to_announce), statistics.median(floor_announce)
        self.row("override -> announced", f"{ann * 1000:.0f} ms",
                 f"x{ann / base:.1f} raw watch + start + HTTP wait + put {base * 1000:.0f} ms")

    def announced_react(self) -> bool:
        return bool(self.store.get_prefix(f"{self.announced}react/"))

    def settle(self, agent: Child) -> None:
        """Back to 0 instances of ``react`` (stopped, withdrawn)."""
        poll_until(lambda: (lambda s: s["stops"] >= len(s["starts"]))(agent.ask("stats"))
                   and not self.announced_react(), 60 + self.n * 0.01, "the stop", 0.05)

    def floor_reactions(self) -> tuple[list[float], list[float]]:
        from tests.helpers import port_block

        key, put = f"/bench-floor/{self.cluster}/override", f"/bench-floor/{self.cluster}/up"
        port = port_block(1)
        seen: list[tuple[float, float]] = []
        acted = threading.Event()
        running: list[subprocess.Popen[bytes]] = []

        def react(events: list[Any]) -> None:
            if not any(e.key == key and e.value == "1" for e in events):
                return
            running.append(spawn(self.folder, port))
            started = time.time()
            answers(port)
            self.store.put(put, json.dumps({"host": "127.0.0.1", "port": port}))
            seen.append((started, time.time()))
            acted.set()

        watch = self.store.watch(key, react)
        try:
            time.sleep(0.2)  # the watch is open
            starts, announced = [], []
            for _ in range(self.args.trials):
                acted.clear()
                began = time.time()
                self.store.put(key, "1")
                if not acted.wait(30):
                    raise TimeoutError("the floor's watch saw nothing in 30 s")
                starts.append(seen[-1][0] - began)
                announced.append(seen[-1][1] - began)
                self.store.put(key, "0")
                end(running)
                running.clear()
                time.sleep(0.1)
        finally:
            watch.cancel()
            end(running)
        return starts, announced

    def scale_out(self, agent: Child) -> None:
        count, override = self.args.scale_out, self.keys.service("react", "override")
        before = len(agent.ask("stats")["starts"])
        began = time.time()
        self.store.put(override, str(count))
        got = poll_until(lambda: (lambda s: s[before + count - 1] if len(s) >= before + count
                                  else None)(agent.ask("stats")["starts"]),
                         60 + self.n * 0.01, f"{count} starts", 0.02)
        took = got - began
        self.store.put(override, "0")
        self.settle(agent)
        from tests.helpers import port_block

        base = port_block(count)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.width) as pool:
            running = list(pool.map(lambda i: spawn(self.folder, base + i), range(count)))
        pool_took = time.perf_counter() - t0
        end(running)
        self.row(f"scale-out 0 -> {count} processes", f"{took:.2f} s",
                 f"x{took / pool_took:.1f} a {self.width}-thread pool {pool_took:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="service counts, comma-separated (default: %(default)s)")
    parser.add_argument("--backend", default="embedded,etcd", help="embedded,etcd")
    parser.add_argument("--passes", type=int, default=5, help="passes measured (3 at >= 10k)")
    parser.add_argument("--trials", type=int, default=3, help="override trials")
    parser.add_argument("--idle", type=float, default=10.0, help="idle window, seconds")
    parser.add_argument("--poll", type=float, default=10.0,
                        help="source poll interval, seconds (the default of a source is 30)")
    parser.add_argument("--scale-out", type=int, default=20, help="process instances")
    parser.add_argument("--timeout", type=float, default=0,
                        help="seconds a size may take to start (default: 60 + 0.03 per service)")
    args = parser.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = set(backends) - {"embedded", "etcd"}
    if unknown or not backends:
        parser.error(f"--backend: embedded and/or etcd, not {sorted(unknown)}")
    health = HealthServer()
    etcd = None
    try:
        if "etcd" in backends:
            from tests.services import Etcd

            etcd = Etcd(extra=("--quota-backend-bytes=8589934592",))
            etcd.start()
        print(f"one agent, N memory services + 1 process service; {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f}; medians; ratios against floors of the same run",
              flush=True)
        for backend in backends:
            for n in sizes:
                with tempfile.TemporaryDirectory(prefix=f"bench-scale-{n}-") as tmp:
                    started = time.monotonic()
                    run = Run(args, backend, n, Path(tmp), etcd.endpoint if etcd else "",
                              health)
                    try:
                        run.go()
                    except (TimeoutError, RuntimeError) as exc:
                        run.row("aborted", str(exc)[:200], "")
                    title = f"{backend if backend == 'embedded' else 'etcd v3'}, {n:,} services"
                    print(f"\n{title} ({time.monotonic() - started:.0f} s)")
                    for what, value, versus in run.rows:
                        print(f"  {what:28} {value:32} {versus}")
                    sys.stdout.flush()
                    if etcd is not None and backend == "etcd":
                        for prefix in (*run.prefixes, f"/bench-floor/{run.cluster}/"):
                            etcd.etcdctl("del", "--prefix", prefix)
    finally:
        health.server.shutdown()
        if etcd is not None:
            etcd.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--floor":
        floor_child(sys.argv[2])
    else:
        main()
