"""Releases record the whole spec; the version covers it; a rolled-back YAML is held."""

from __future__ import annotations

import json

from agent.history import changes
from agent.releases import (
    config_deploy,
    make_release,
    parse_release,
    restore_release,
    yaml_differs,
)

BASE = """
agent: {{cluster: rel}}
services:
  web:
    command: [serve, "{{port}}"]
    port: 8080
    env: {{GREETING: {greeting}, TOKEN: "${{REL_TOKEN}}"}}
    source: {{type: static, count: 1}}
    actuator: {actuator}
"""
FLEET = ('{{type: fleet, endpoint: "http://127.0.0.1:1", unit: "[Service]\\nExecStart={exe}\\n"}}')


def web(load_test_config, monkeypatch, greeting="hello", actuator="{type: process}"):
    monkeypatch.setenv("REL_TOKEN", "s3cr3t")
    return load_test_config(BASE.format(greeting=greeting, actuator=actuator)).services["web"]


def test_a_release_records_command_and_env_but_never_a_secret(load_test_config, monkeypatch):
    config = web(load_test_config, monkeypatch)
    release = make_release(config)
    stored = json.dumps(release.to_json(by="test"))
    assert "s3cr3t" not in stored
    data = json.loads(stored)
    assert data["command"] == ["serve", "{port}"] and data["env"] == {"GREETING": "hello"}
    assert data["secret_env"] == ["TOKEN"]
    back = parse_release(data)
    assert back.env_for(config) == {"GREETING": "hello", "TOKEN": "s3cr3t"}  # from the YAML
    assert back.version == release.version


def test_the_version_covers_env_and_the_fleet_unit(load_test_config, monkeypatch):
    hello = make_release(web(load_test_config, monkeypatch))
    bonjour = make_release(web(load_test_config, monkeypatch, greeting="bonjour"))
    assert hello.version != bonjour.version and hello.spec != bonjour.spec
    one = make_release(web(load_test_config, monkeypatch,
                           actuator=FLEET.format(exe="/bin/a")))
    two = make_release(web(load_test_config, monkeypatch,
                           actuator=FLEET.format(exe="/bin/b")))
    assert one.version != two.version  # a unit-only change rolls
    assert changes(one, two) == "actuator unit"


def test_restoring_brings_back_the_old_env_on_its_own_version(load_test_config, monkeypatch):
    old = parse_release(make_release(web(load_test_config, monkeypatch)).to_json())
    now = web(load_test_config, monkeypatch, greeting="bonjour")
    back = restore_release(old, now, old.port)
    assert back.version == old.version and back.env_for(now)["GREETING"] == "hello"
    assert restore_release(old, now, 9090).version != old.version  # another color's port


def test_a_rolled_back_yaml_is_not_deployed_again_until_it_changes(load_test_config,
                                                                   monkeypatch):
    old = make_release(web(load_test_config, monkeypatch))
    new = make_release(web(load_test_config, monkeypatch, greeting="bonjour"))
    newer = make_release(web(load_test_config, monkeypatch, greeting="hola"))
    running = [old.version]
    assert config_deploy(None, old, running) == "record"
    assert config_deploy(old.to_json(), old, running) is None
    assert config_deploy(old.to_json(), new, running) == "deploy"
    held = old.to_json(held=new.spec, deploy={"result": "rolled-back", "reason": "unhealthy"})
    assert config_deploy(held, new, running) is None
    assert "its deploy rolled back (unhealthy)" in yaml_differs(held, new)
    assert config_deploy(held, newer, running) == "deploy"
    # a record from before releases held command and env still parses, and runs the YAML's
    legacy = parse_release({"image": None, "port": 8080, "version": old.version,
                            "spec": old.spec})
    assert legacy.command is None and config_deploy(
        {"version": old.version, "spec": old.spec}, old, running) is None


def test_default_docker_settings_leave_the_version_as_before(load_test_config, monkeypatch):
    from agent.instances import release_version

    config = web(load_test_config, monkeypatch, actuator="{type: docker}")
    release = make_release(config)
    assert release.shape == {}  # only settings that differ from the defaults count
    assert release.version == release_version(None, config.command, dict(config.env), 8080)
    bridged = make_release(web(load_test_config, monkeypatch,
                               actuator="{type: docker, network: bridge}"))
    assert bridged.shape == {"network": "bridge"} and bridged.version != release.version
