"""Operating it from the command line, as an ops engineer would (issue 11): orphans and
prune, true rollbacks, abort, history, the store, one agent per host, broken plugins.

Real agents in subprocesses, real local processes serving HTTP, the embedded store
(and etcd where it says).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import (
    alive,
    eventually,
    kill_recorded,
    observation_window,
    port_block,
    process_records,
)
from tests.services import free_port

# serves $GREETING; with $BROKEN set it never listens (a version that never gets healthy)
SERVER = """
import http.server, os, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ.get("GREETING", "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
if os.environ.get("BROKEN"):
    time.sleep(3600)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def shipmate(*args: str, env: dict[str, str] | None = None,
             check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=120, check=check,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def greeting(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as answer:
            return answer.read().decode()
    except OSError:
        return None


def config_text(tmp_path: Path, web: int, api: int | None, *, greeting: str = "hello",
                extra_env: str = "", store: str = "") -> str:
    server = tmp_path / "serve.py"
    server.write_text(SERVER)
    text = f"""
    agent:
      cluster: ops
      interval: 2s
      http: 127.0.0.1:{free_port()}
      {store}
    defaults:
      actuator: {{type: process}}
      announce: {{type: etcd, ttl: 30s}}
    services:
      web:
        command: [{sys.executable}, {server}, "{{port}}"]
        port: {web}
        env: {{GREETING: {greeting}{extra_env}}}
        health: {{http: /, timeout: 2s}}
        source: {{type: static, count: 2}}
        deploy: {{type: rolling, health_timeout: 120s}}
    """
    if api is not None:
        text += f"""
      api:
        command: [{sys.executable}, {server}, "{{port}}"]
        port: {api}
        env: {{GREETING: api}}
        health: {{http: /}}
        source: {{type: static, count: 1}}
    """
    return textwrap.dedent(text).lstrip()


@pytest.fixture
def ops(tmp_path):
    """(config path, web port, api port, start the agent)."""
    web, api = port_block(4), port_block(2)
    path = tmp_path / "agent.yaml"
    path.write_text(config_text(tmp_path, web, api))
    agents: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        with open(tmp_path / f"agent{len(agents)}.log", "w") as log:
            agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)],
                                     stderr=log)
        agents.append(agent)
        return agent

    yield path, web, api, start
    for agent in agents:
        agent.terminate()
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
    kill_recorded(tmp_path)


def store_get(path: Path, key: str) -> str | None:
    got = shipmate("store", "get", key, "-c", str(path))
    return got.stdout.strip() if got.returncode == 0 else None


def status(path: Path) -> dict:
    return json.loads(shipmate("status", "-c", str(path), "--json", check=True).stdout)


def serving(port: int, *, count: int = 2, text: str) -> bool:
    return all(greeting(port + slot) == text for slot in range(count))


# ---------------------------------------------------------------- orphans


def test_a_removed_service_is_withdrawn_at_once_listed_and_pruned(ops, tmp_path):
    path, web, api, start = ops
    agent = start()
    eventually(lambda: serving(web, text="hello") and greeting(api) == "api", timeout=30,
               what="both services serving")
    announced = eventually(lambda: [k for k in shipmate(
        "store", "get", "--prefix", "/services/api/", "-c", str(path)).stdout.split("\n")
        if k], timeout=20, what="api announced")
    key = announced[0].split("\t")[0]
    pid = next(r["pid"] for r in process_records(tmp_path) if r["service"] == "api")

    path.write_text(config_text(tmp_path, web, None))  # api removed from the YAML
    agent.send_signal(signal.SIGHUP)
    eventually(lambda: store_get(path, key) is None, timeout=5, what="the orphan withdrawn")
    assert alive(pid) and greeting(api) == "api"  # withdrawn, not stopped (orphans: keep)

    listed = status(path)["orphans"]
    assert [(o["service"], o["running"], o["announced"]) for o in listed] == [
        ("api", True, [])]
    text = shipmate("status", "-c", str(path)).stdout
    assert "orphan: ops-api-0-" in text and "shipmate prune" in text
    observation_window(3, "a few passes (interval 1 s): the orphan is not announced again")
    assert store_get(path, key) is None

    pruned = shipmate("prune", "--yes", "-c", str(path))
    assert pruned.returncode == 0, pruned.stderr
    assert "stopped ops-api-0-" in pruned.stdout
    eventually(lambda: not alive(pid), timeout=15, what="the orphan stopped")
    assert status(path)["orphans"] == []
    assert serving(web, text="hello")  # the configured service untouched


def test_prune_refuses_a_configured_service_and_says_when_nothing_is_orphaned(ops):
    path, _, _, _ = ops
    refused = shipmate("prune", "web", "--yes", "-c", str(path))
    assert refused.returncode == 1 and "is in the config" in refused.stderr
    nothing = shipmate("prune", "--yes", "-c", str(path))
    assert nothing.returncode == 0 and "no orphans" in nothing.stdout


# ---------------------------------------------------------------- rollback and history


def test_an_env_change_rolled_back_restores_the_old_env_and_stays(ops, tmp_path):
    path, web, api, start = ops
    agent = start()
    eventually(lambda: serving(web, text="hello"), timeout=30, what="hello on both slots")
    path.write_text(config_text(tmp_path, web, api, greeting="bonjour"))
    agent.send_signal(signal.SIGHUP)
    eventually(lambda: serving(web, text="bonjour") and status(path)["services"][0]["deploy"]
               is None, timeout=60, what="the new env serving")

    rolled = shipmate("rollback", "web", "-c", str(path), "--timeout", "90")
    assert rolled.returncode == 0, rolled.stderr
    assert serving(web, text="hello")
    # it stays: passes run every 2 s, and none deploys the YAML's version again
    for _ in range(16):
        assert store_get(path, "services/web/deploy") is None
        assert serving(web, text="hello")
        observation_window(0.5, "passes that must not deploy the YAML's version again")
    web_status = status(path)["services"][0]
    assert any("the YAML differs from what runs" in p for p in web_status["problems"])

    history = json.loads(shipmate("history", "web", "--json", "-c", str(path),
                                  check=True).stdout)
    releases = history["releases"]
    assert [r["result"] for r in releases] == ["recorded", "finished", "finished"]
    assert releases[1]["env"] == {"GREETING": "bonjour"} and releases[1]["changed"] == (
        "env GREETING")
    assert releases[2]["version"] == releases[0]["version"]
    assert releases[2]["changed"].startswith("rollback")
    table = shipmate("history", "web", "-c", str(path), check=True).stdout
    assert releases[0]["version"] in table and releases[1]["version"] in table
    assert any(s["to"] == 2 for s in history["scaling"])

    # a new change of the YAML is deployed again
    path.write_text(config_text(tmp_path, web, api, greeting="hola"))
    agent.send_signal(signal.SIGHUP)
    eventually(lambda: serving(web, text="hola"), timeout=60, what="the next YAML deployed")


def test_rollback_without_an_earlier_release_says_so(ops):
    path, web, _, start = ops
    start()
    eventually(lambda: store_get(path, "services/web/release"), timeout=30,
               what="the first release recorded")
    refused = shipmate("rollback", "web", "-c", str(path))
    assert refused.returncode == 1
    assert "no earlier release recorded" in refused.stderr
    assert "already running" not in refused.stdout


# ---------------------------------------------------------------- abort


def test_abort_of_a_never_healthy_deploy_keeps_the_old_version_serving(ops, tmp_path):
    path, web, api, start = ops
    agent = start()
    eventually(lambda: serving(web, text="hello"), timeout=30, what="hello on both slots")
    path.write_text(config_text(tmp_path, web, api, extra_env=', BROKEN: "1"'))
    agent.send_signal(signal.SIGHUP)
    eventually(lambda: (status(path)["services"][0]["deploy"] or {}).get("phase") == "running",
               timeout=30, what="the broken deploy running")
    started = time.monotonic()
    aborted = shipmate("abort", "web", "-c", str(path), "--timeout", "60")
    assert aborted.returncode == 0, aborted.stderr
    assert "rolled back" in aborted.stdout
    eventually(lambda: store_get(path, "services/web/deploy") is None, timeout=15,
               what="the deploy ended")
    assert time.monotonic() - started < 15
    assert greeting(web) == "hello" or greeting(web + 1) == "hello"
    eventually(lambda: serving(web, text="hello"), timeout=20, what="both slots on hello")
    release = json.loads(store_get(path, "services/web/release"))
    assert release["deploy"]["result"] == "rolled-back"
    assert "aborted by" in release["deploy"]["reason"]

    again = shipmate("deploy", "web", "--image", "v2", "--no-wait", "-c", str(path))
    assert again.returncode == 0 and "requested" in again.stdout, again.stderr
    assert shipmate("abort", "web", "-c", str(path), "--timeout", "60").returncode == 0


def test_abort_clears_an_unreadable_or_failed_journal_by_compare_and_set(ops):
    path, _, _, _ = ops
    shipmate("store", "put", "services/web/deploy", "{not json", "-c", str(path), check=True)
    table = shipmate("status", "-c", str(path)).stdout
    assert "unreadable" in table
    refused = shipmate("deploy", "web", "--image", "x", "--no-wait", "-c", str(path))
    assert refused.returncode == 1
    cleared = shipmate("abort", "web", "-c", str(path))
    assert cleared.returncode == 0 and "cleared the unreadable deploy journal" in cleared.stdout

    failed = {"id": "abc", "phase": "failed", "error": "w-1 not healthy after 60s (GET /); "
              "the rollback failed too: boom"}
    shipmate("store", "put", "services/web/deploy", json.dumps(failed), "-c", str(path),
             check=True)
    assert "failed: rollback failed" in shipmate("status", "-c", str(path)).stdout
    up_close = shipmate("status", "web", "-c", str(path)).stdout
    assert "the rollback failed too: boom" in up_close
    cleared = shipmate("abort", "web", "-c", str(path))
    assert cleared.returncode == 0 and "a new deploy can start" in cleared.stdout
    assert store_get(path, "services/web/deploy") is None
    nothing = shipmate("abort", "web", "-c", str(path))
    assert nothing.returncode == 1 and "no deploy of web is in progress" in nothing.stderr


# ---------------------------------------------------------------- status SERVICE


def test_status_of_one_service_shows_each_instance(ops):
    path, web, _, start = ops
    start()
    eventually(lambda: all(i["announced"] for i in status(path)["services"][0]["instances"])
               and status(path)["services"][0]["healthy"] == 2, timeout=30,
               what="web healthy and announced")
    text = eventually(lambda: (t := shipmate("status", "web", "-c", str(path)).stdout).count(
        "/services/web/ops-web-") == 2 and t, timeout=20, what="both keys in status web")
    assert f"127.0.0.1:{web}" in text and f"127.0.0.1:{web + 1}" in text
    assert text.count(" healthy ") >= 2
    unknown = shipmate("status", "nope", "-c", str(path))
    assert unknown.returncode == 1 and "unknown service 'nope'" in unknown.stderr


# ---------------------------------------------------------------- the store


@pytest.mark.parametrize("backend", ["embedded", "etcd"])
def test_the_store_from_the_cli(backend, request, tmp_path):
    store = ""
    if backend == "etcd":
        etcd = request.getfixturevalue("etcd")
        store = (f'store: {{backend: etcd, endpoints: ["{etcd.endpoint}"], '
                 f'prefix: /t{free_port()}}}')
    path = tmp_path / "agent.yaml"
    path.write_text(config_text(tmp_path, port_block(2), None, store=store))
    try:
        once = shipmate("run", "--once", "-c", str(path))
        assert once.returncode == 0, once.stderr
        assert store_get(path, "services/web/desired") == "2"
        c = ["-c", str(path)]
        shipmate("store", "put", "services/web/override", "3", *c, check=True)
        listed = shipmate("store", "get", "--prefix", "services/web/", *c, check=True).stdout
        assert "/services/web/desired\t2" in listed and "/services/web/override\t3" in listed
        shipmate("store", "put", "/services/hand/written", "x", *c, check=True)  # absolute
        assert store_get(path, "/services/hand/written") == "x"
        assert shipmate("store", "del", "services/web/override", *c).returncode == 0
        assert store_get(path, "services/web/override") is None
        missing = shipmate("store", "get", "services/web/override", *c)
        assert missing.returncode == 1 and "no key" in missing.stderr
        deleted = shipmate("store", "del", "--prefix", "/services/hand/", *c, check=True)
        assert "deleted /services/hand/written" in deleted.stdout

        watch = subprocess.Popen([sys.executable, "-m", "agent", "store", "watch", "--prefix",
                                  "services/web/", *c], stdout=subprocess.PIPE, text=True)
        try:
            # put until the watch (which may still be starting) prints the change
            deadline = time.monotonic() + 30
            while True:
                shipmate("store", "put", "services/web/override", "4", *c, check=True)
                if select.select([watch.stdout], [], [], 1.0)[0]:
                    break
                assert time.monotonic() < deadline, "the watch printed nothing"
            line = watch.stdout.readline()
            assert line.startswith("PUT ") and line.strip().endswith("/services/web/override 4")
        finally:
            watch.terminate()
            watch.wait(10)
    finally:
        kill_recorded(tmp_path)


# ---------------------------------------------------------------- one agent, broken plugins


def test_a_second_agent_on_the_same_host_names_the_first(ops):
    path, web, _, start = ops
    first = start()
    eventually(lambda: greeting(web) == "hello", timeout=30, what="the first agent serving")
    second = shipmate("run", "-c", str(path))
    assert second.returncode == 1
    assert f"an agent already runs for this config on this host (pid {first.pid}" in (
        second.stderr)
    assert "Address already in use" not in second.stderr and "Traceback" not in second.stderr
    assert first.poll() is None


@pytest.fixture
def broken_plugin(tmp_path):
    """A plugin distribution on PYTHONPATH whose hook name is misspelled."""
    site = tmp_path / "site"
    dist = site / "shipmate_typo-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shipmate-typo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[shipmate]\ntypo = shipmate_typo\n")
    (site / "shipmate_typo.py").write_text(
        "from agent import hookimpl\n\n@hookimpl\ndef shipmate_sorce_types():\n    return []\n")
    return {"PYTHONPATH": str(site)}


def test_a_broken_plugin_stops_run_but_not_status_plugins_or_check(ops, broken_plugin):
    path, _, _, _ = ops
    listed = shipmate("plugins", env=broken_plugin)
    assert listed.returncode == 0
    assert "typo" in listed.stdout and "did you mean shipmate_source_types?" in listed.stdout
    checked = shipmate("check", "-c", str(path), env=broken_plugin)
    assert checked.returncode == 1 and "did you mean shipmate_source_types?" in checked.stderr
    assert "refuses to start" in checked.stderr
    shown = shipmate("status", "-c", str(path), env=broken_plugin)
    assert shown.returncode == 0 and "web" in shown.stdout
    assert "left out: plugin 'typo'" in shown.stderr
    refused = shipmate("run", "--once", "-c", str(path), env=broken_plugin)
    assert refused.returncode == 1 and "did you mean shipmate_source_types?" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_status_of_one_service_shows_a_crash_loop_with_restarts_and_last_exit(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(textwrap.dedent("""
        agent: {cluster: loop, interval: 2s}
        services:
          crash:
            command: [sh, -c, "exit 3"]
            source: {type: static, count: 1}
            actuator: {type: process}
        """).lstrip())
    with open(tmp_path / "agent.log", "w") as log:
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)],
                                 stderr=log)
    try:
        row = eventually(lambda: next((line for line in shipmate(
            "status", "crash", "-c", str(path)).stdout.splitlines()
            if "exit code 3" in line and "│" in line), None), timeout=30,
            what="slot 0 in the instance table with its last exit")
        cells = [cell.strip() for cell in row.split("│")]
        assert cells[1] == "0" and int(cells[6]) >= 1, row
    finally:
        agent.terminate()
        agent.wait(20)
        kill_recorded(tmp_path)
