"""The ``shipmate`` command as a user runs it, in real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import alive, eventually, kill_recorded, port_block, process_records
from tests.services import free_port

DEFAULT = Path(__file__).parents[2] / "etc" / "agent.yaml"


def default_config(port: int) -> str:
    """The default etc/agent.yaml, on free ports (the README's run command uses it as is)."""
    text = DEFAULT.read_text()
    assert "port: 8080" in text and "http: 127.0.0.1:9464" in text
    return text.replace("port: 8080", f"port: {port}").replace(
        "http: 127.0.0.1:9464", f"http: 127.0.0.1:{free_port()}")


def shipmate(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60, check=check)


@pytest.fixture
def config(write_config, tmp_path):
    port = port_block(4)
    path = write_config(default_config(port))
    yield path, port
    kill_recorded(tmp_path)


def serving(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).status == 200
    except OSError:
        return False


def status(path) -> dict:
    return json.loads(shipmate("status", "-c", str(path), "--json", check=True).stdout)


def test_run_scale_ctrl_c_and_adopt(config, tmp_path):
    path, port = config
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)],
                             stderr=subprocess.PIPE, text=True)
    try:
        eventually(lambda: serving(port) and serving(port + 1), timeout=15,
                   what="two instances serving")
        web = eventually(lambda: (s := status(path)["services"][0])["healthy"] == 2 and s,
                         timeout=10)
        assert web["desired"] == 2 and web["running"] == 2
        result = shipmate("scale", "web", "3", "-c", str(path), check=True)
        assert "override set to 3" in result.stdout
        # within the 10 s interval: the store watch wakes the agent (it takes about a
        # second on an idle machine; the deadline holds on a loaded one)
        eventually(lambda: serving(port + 2), timeout=8, what="the third instance at once")
        agent.send_signal(signal.SIGINT)
        assert agent.wait(15) == 0
    finally:
        agent.kill()
    pids = sorted(r["pid"] for r in process_records(tmp_path) if alive(r["pid"]))
    assert len(pids) == 3 and all(serving(port + i) for i in range(3))  # still serving
    again = shipmate("run", "--once", "-c", str(path))
    assert again.returncode == 0, again.stderr
    assert "start web" not in again.stderr  # adopted, no duplicate
    assert sorted(r["pid"] for r in process_records(tmp_path) if alive(r["pid"])) == pids
    assert status(path)["services"][0]["running"] == 3
    from agent.store.embedded import EmbeddedStore

    store = EmbeddedStore(tmp_path / ".shipmate" / "state.db")  # what the README's run uses
    try:
        announced = [json.loads(e.value) for e in store.get_prefix("/services/web/").values()]
    finally:
        store.close()
    assert sorted(a["port"] for a in announced) == [port, port + 1, port + 2]
    assert {a["host"] for a in announced} == {"127.0.0.1"}


def test_check_lists_every_error_with_its_line(write_config):
    path = write_config("""
        agent: {cluster: cli}
        services:
          web:
            prot: 80
            source: {type: static, count: "two"}
            actuator: {type: process, hots: x}
        """)
    result = shipmate("check", "-c", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"{path}:4: services.web.prot: unknown key 'prot' (did you mean 'port'?)"
    assert lines[1].startswith(f"{path}:5: services.web.source.count: ")
    assert lines[2].startswith(f"{path}:6: services.web.actuator.hots: unknown key 'hots'")
    assert lines[3] == "error: 3 errors in the config"
    assert "Traceback" not in result.stderr


def test_check_fails_a_blocked_default_strategy_and_warns_of_strategy_keys(write_config):
    path = write_config("""
        agent: {cluster: cli}
        defaults:
          actuator: {type: process}
          source: {type: static, count: 1}
        services:
          web:
            command: [sleep, "100"]
          api:
            command: [sleep, "100"]
            deploy: {strategy: blue-green, ports: [8000, 9000]}
        """)
    blocked = subprocess.run([sys.executable, "-m", "agent", "check", "-c", str(path)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "SHIPMATE_BLOCK_PLUGINS": "rolling"})
    assert blocked.returncode == 1
    assert (f"{path}:6: services.web: no deploy: block, and the default deploy strategy "
            "'rolling' (agent.default_strategy) is not installed (blocked?)") in blocked.stderr
    assert "services.api" not in blocked.stderr.replace("services.api.deploy.strategy", "")
    fine = shipmate("check", "-c", str(path))
    assert fine.returncode == 0, fine.stderr
    assert (f"{path}:10: services.api.deploy.strategy: deprecated: write type: blue-green"
            in fine.stderr)


def test_one_line_errors(config, tmp_path, write_config):
    path, _ = config
    missing = shipmate("status", "-c", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 1
    assert "config file" in missing.stderr and "not found" in missing.stderr
    unknown = shipmate("scale", "api", "2", "-c", str(path))
    assert unknown.returncode == 1 and "unknown service 'api'; known: web" in unknown.stderr
    down = write_config(f"""
        agent:
          cluster: cli
          store: {{backend: etcd, endpoints: ["http://127.0.0.1:{free_port()}"], timeout: 1s}}
        services: {{}}
        """, name="etcd.yaml")
    unreachable = shipmate("status", "-c", str(down))
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("error: store unreachable")
    assert "Traceback" not in unreachable.stderr


def test_plan_changes_nothing(config, tmp_path):
    path, _ = config
    result = shipmate("plan", "-c", str(path), check=True)
    assert "would start web slot 0" in result.stdout and "would start web slot 1" in result.stdout
    assert process_records(tmp_path) == []
    assert status(path)["services"][0]["desired"] is None


def test_dry_run_changes_nothing(config, tmp_path):
    path, _ = config
    result = shipmate("run", "--once", "--dry-run", "-c", str(path))
    assert result.returncode == 0
    assert "would start web slot 0: scale up to 2" in result.stderr
    assert process_records(tmp_path) == []


def test_plugins_and_schema():
    listed = json.loads(shipmate("plugins", "--json", check=True).stdout)
    static = next(p for p in listed if p["name"] == "static")
    assert static["distribution"] == "shipmate" and static["types"] == {"source": ["static"]}
    schema = json.loads(shipmate("schema", check=True).stdout)
    text = json.dumps(schema)
    assert '"const": "static"' in text and '"count"' in text  # plugin fields are covered


def test_sighup_reloads_the_config(config, tmp_path):
    path, port = config
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)],
                             stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: serving(port) and serving(port + 1), timeout=15)
        path.write_text(path.read_text().replace("count: 2", "count: 1"))
        agent.send_signal(signal.SIGHUP)
        eventually(lambda: not serving(port + 1), timeout=5, what="the reload to scale to 1")
        assert serving(port)
        agent.terminate()
        assert agent.wait(15) == 0
    finally:
        agent.kill()


def test_status_reads_the_store_in_prefix_reads_not_one_per_service(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from agent.cli import main
    from agent.store.embedded import EmbeddedStore

    services = "".join(f"  s{i}: {{}}\n" for i in range(30))
    path = tmp_path / "agent.yaml"
    path.write_text("agent: {cluster: many}\ndefaults:\n  command: [sleep, '60']\n"
                    "  source: {type: static, count: 1}\n  actuator: {type: process}\n"
                    "  announce: {type: etcd}\nservices:\n" + services)
    trips = []
    real = EmbeddedStore._tx

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        trips.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddedStore, "_tx", counted)
    shown = CliRunner().invoke(main, ["status", "-c", str(path), "--json"])
    assert shown.exit_code == 0, shown.output
    assert len(json.loads(shown.output)["services"]) == 30
    assert len(trips) <= 6, f"{len(trips)} store requests for 30 services"
