"""The contrib event-and-command plugin (contrib/shipmate-datadog-events), installed into
a folder of its own (never the shared interpreter) and run in subprocesses against a
local stand-in of Datadog's events API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent import hookspecs
from tests.datadog_events_server import API_KEY, DatadogEventsStandIn
from tests.helpers import eventually, kill_recorded

PACKAGE = Path(__file__).parents[1] / "contrib" / "shipmate-datadog-events"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of a process that has the plugin (PYTHONPATH: its folder)."""
    target = tmp_path_factory.mktemp("datadog-events")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(target), str(PACKAGE)],
                   check=True, timeout=300, capture_output=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(target), *filter(None, [os.environ.get("PYTHONPATH")])]), "DD_API_KEY": API_KEY}


@pytest.fixture
def datadog():
    server = DatadogEventsStandIn()
    yield server
    server.close()


def shipmate(env: dict, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60, env=env)


CONFIG = """
agent: {{cluster: dd, interval: 30s}}
plugins:
  datadog-events:
    api_key: ${{DD_API_KEY}}
    api_url: {url}
    tags: [team:web]
services:
  web:
    image: registry.example/web:1
    command: [sleep, "300"]
    source: {{type: static, count: 1}}
    actuator: {{type: process}}
    deploy: {{type: rolling, images: ["registry.example/web:*"]}}
"""


def test_listed_with_its_hooks_and_no_types(env):
    listed = json.loads(shipmate(env, "plugins", "--json").stdout)
    plugin = next(p for p in listed if p["name"] == "datadog-events")
    assert plugin["distribution"] == "shipmate-datadog-events"
    assert plugin["types"] == {} and plugin["kinds"] == []
    assert {"shipmate_config_model", "shipmate_configure", "shipmate_unconfigure",
            "shipmate_deploy_finished", "shipmate_crash_loop"} <= set(plugin["hooks"])
    schema = json.loads(shipmate(env, "schema").stdout)
    assert "datadog-events" in schema["$defs"]["PluginBlocks"]["properties"]


def test_a_misspelled_key_of_its_block_is_a_config_error_with_its_line(env, write_config):
    path = write_config(CONFIG.format(url="http://127.0.0.1:9").replace("tags:", "tgas:"))
    result = shipmate(env, "check", "-c", str(path))
    assert result.returncode == 1
    assert (f"{path}:6: plugins.datadog-events.tgas: unknown key 'tgas' (did you mean "
            "'tags'?)") in result.stderr


def test_a_deploy_is_posted_as_grouped_datadog_events(env, datadog, write_config, tmp_path):
    path = write_config(CONFIG.format(url=datadog.url))
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)],
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        eventually(lambda: "web: desired count none -> 1" in datadog.titles(), 30,
                   "the first desired count as an event")
        deployed = shipmate(env, "deploy", "web", "--image", "registry.example/web:2",
                            "-c", str(path))
        assert deployed.returncode == 0, deployed.stderr
        eventually(lambda: "web: deploy finished" in datadog.titles(), 30, "the deploy's end")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        agent.communicate(timeout=30)
        kill_recorded(tmp_path)
    events = {e["title"]: e for e in datadog.events}
    started, finished = events["web: deploy started"], events["web: deploy finished"]
    assert started["aggregation_key"] == finished["aggregation_key"]
    assert finished["alert_type"] == "success" and "to registry.example/web:2" in finished["text"]
    assert set(finished["tags"]) == {"cluster:dd", "team:web", "service:web"}
    assert {e["api_key"] for e in datadog.events} == {API_KEY}
    assert any(t.startswith("shipmate agent on ") and t.endswith(" now leads dd")
               for t in datadog.titles())
    assert datadog.refused == []


def test_a_refused_key_is_logged_and_the_agent_carries_on(env, datadog, write_config,
                                                           tmp_path):
    path = write_config(CONFIG.format(url=datadog.url))
    result = shipmate({**env, "DD_API_KEY": "wrong"}, "run", "--once", "-c", str(path))
    kill_recorded(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "not posted" in result.stderr and "answered 403" in result.stderr
    assert "wrong" not in result.stderr  # the key is masked in the log
    assert datadog.refused and datadog.events == []


def test_its_command_posts_one_event(env, datadog):
    result = subprocess.run([sys.executable, "-m", "shipmate_datadog_events", "send",
                             "hello from shipmate", "--api-url", datadog.url, "--tag", "t:1"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("posted event 7") and "event?id=" in result.stdout
    assert datadog.events[0]["title"] == "hello from shipmate"
    assert datadog.events[0]["tags"] == ["t:1"]


@pytest.mark.skipif(not hasattr(hookspecs, "shipmate_register_commands"),
                    reason="this agent has no shipmate_register_commands hook yet")
def test_its_command_is_a_shipmate_command(env, datadog):
    result = shipmate(env, "datadog-events", "send", "hello", "--api-url", datadog.url)
    assert result.returncode == 0, result.stderr
    assert datadog.titles() == ["hello"]
