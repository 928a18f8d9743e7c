"""``shipmate --help`` and ``shipmate scale`` on the embedded store start fast.

Timings on a shared machine are noise, so what is asserted is deterministic: the
modules those commands import (``python -X importtime`` lists every one). The
heavy ones (pydantic, the etcd clients, rich, the plugins' libraries) must not be
among them; the import time is printed for the record.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentConfig, PolicyConfig, StoreConfig, load_config
from agent.quickconfig import AGENT_KEYS, POLICY_KEYS, STORE_KEYS, read_quick
from agent.store.embedded import EmbeddedStore
from tests.helpers import shipmate_imports

HEAVY = ("pydantic", "pydantic_core", "etcd3gw", "requests", "etcd", "urllib3", "boto3",
         "botocore", "docker", "rich", "datadog", "prometheus_client", "pluggy", "tenacity",
         "plugins", "agent.config", "agent.plugins", "agent.kinds", "agent.runtime")
"""Packages (and their submodules) that the fast commands must not import."""
CONFIG = """
    agent:
      cluster: quick
      store: {backend: embedded, path: state/store.db, prefix: /fast}
      max_instances: 30
    defaults:
      actuator: {type: process}
      policy: {min: 1}
    services:
      web:
        command: [sleep, "300"]
        source: {type: static, count: 2}
        policy: {max: 20}
      worker:
        command: [sleep, "300"]
        source: {type: static, count: 1}
    """


def imports(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str], float]:
    return shipmate_imports(*args)


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(f"{h}.") for h in HEAVY))


def test_help_imports_no_heavy_module():
    result, modules, took = imports("--help")
    print(f"shipmate --help: {len(modules)} modules imported in {took:.0f} ms")
    assert result.returncode == 0, result.stderr
    assert "scale" in result.stdout and "`shipmate plugins` lists them" in result.stdout
    assert "click" in modules  # the measurement sees imports at all
    assert heavy(modules) == []


def test_scale_on_the_embedded_store_imports_no_heavy_module(write_config, tmp_path):
    path = write_config(CONFIG)
    result, modules, took = imports("scale", "-c", str(path), "web", "3")
    print(f"shipmate scale (embedded): {len(modules)} modules imported in {took:.0f} ms")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "web: override set to 3\n"
    assert "agent.store.embedded" in modules
    assert heavy(modules) == []
    store = EmbeddedStore(tmp_path / "state" / "store.db")
    try:
        assert store.get("/fast/quick/services/web/override").value == "3"
    finally:
        store.close()
    result, modules, _ = imports("scale", "-c", str(path), "web", "--auto")
    assert result.stdout == "web: override cleared, the source decides\n"
    assert heavy(modules) == []
    result, modules, _ = imports("store", "put", "-c", str(path), "services/web/override", "4")
    assert result.returncode == 0 and heavy(modules) == []


def test_scale_refuses_outside_the_policy_merged_with_the_defaults(write_config):
    path = write_config(CONFIG)
    above, modules, _ = imports("scale", "-c", str(path), "web", "21")
    assert above.returncode == 1
    assert "web: 21 is above its policy.max (20); use --force" in above.stderr
    below = subprocess.run([sys.executable, "-m", "agent", "scale", "-c", str(path), "worker",
                            "0"], capture_output=True, text=True, timeout=60)
    assert below.returncode == 1 and "worker: 0 is below its policy.min (1)" in below.stderr
    forced = subprocess.run([sys.executable, "-m", "agent", "scale", "-c", str(path), "web",
                             "40", "--force"], capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0, forced.stderr
    assert "agent.max_instances (30)" in forced.stderr
    unknown = subprocess.run([sys.executable, "-m", "agent", "scale", "-c", str(path), "api",
                              "1"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1
    assert "unknown service 'api'; known: web, worker" in unknown.stderr


def test_what_the_quick_reader_does_not_vouch_for_goes_to_the_whole_config(write_config):
    typo = write_config(CONFIG.replace("path: state/store.db", "paht: state/store.db"),
                        name="typo.yaml")
    assert read_quick(typo) is None
    result, modules, _ = imports("scale", "-c", str(typo), "web", "3")
    assert result.returncode == 1
    assert f"{typo}:3: agent.store.paht: unknown key 'paht' (did you mean 'path'?)" \
        in result.stderr  # the whole config's error, with its line: nothing written elsewhere
    assert "pydantic" in modules


@pytest.mark.parametrize("change", [
    ("path: state/store.db", "path: ${STORE_DIR}/store.db"),  # the environment decides
    ("backend: embedded", "backend: etcd"),
    ("max_instances: 30", "max_instances: 0"),
    ("policy: {max: 20}", "policy: {max: 0}"),  # below min 1 from the defaults
    ("policy: {max: 20}", "policy: {max: twenty}"),
    ("cluster: quick", "cluster: Quick"),
    ("prefix: /fast", "prefix: fast"),
    ("  worker:", "  Worker:"),
    ("  worker:", "  web:"),  # a duplicate key
    ("policy: {max: 20}", "policy: {max: 20, mx: 3}"),
    ("policy: {max: 20}", "policy:"),
    ("    defaults:\n      actuator: {type: process}\n      policy: {min: 1}\n",
     "    defaults: []\n"),
])
def test_the_quick_reader_is_unsure_of_what_the_model_may_read_otherwise(write_config,
                                                                        change):
    assert read_quick(write_config(CONFIG.replace(*change))) is None


@pytest.mark.parametrize("text", [
    CONFIG,
    """
    agent: {cluster: bare}
    services:
      web: {command: [sleep, "1"], actuator: {type: process}, source: {type: static, count: 1}}
    """,
    """
    agent: {cluster: a1, store: {path: /tmp/abs.db}}
    defaults:
      actuator: {type: process}
      source: {type: static, count: 1}
      policy: {min: 2, max: 9}
    services:
      web: {command: [sleep, "1"], policy: {max: 4}}
      job: {command: [sleep, "1"]}
    """,
])
def test_the_quick_reader_reads_what_the_whole_config_reads(write_config, shipmate_plugins,
                                                          text):
    path = write_config(text)
    quick, config = read_quick(path), load_config(path, shipmate_plugins)
    assert quick is not None
    assert quick.key_prefix == config.key_prefix
    assert quick.store_path == config.resolve(config.agent.store.path)
    assert quick.max_instances == config.agent.max_instances
    assert quick.services == {name: (svc.policy.min, svc.policy.max)
                              for name, svc in config.services.items()}


def test_the_quick_reader_knows_every_key_of_the_models():
    """A key added to the models must be added to agent.quickconfig (or it falls back)."""
    assert set(AgentConfig.model_fields) == AGENT_KEYS
    assert set(StoreConfig.model_fields) == STORE_KEYS
    assert set(PolicyConfig.model_fields) == POLICY_KEYS


def test_importing_agent_imports_no_export_until_used():
    code = ("import sys, agent; before = 'pydantic' in sys.modules; "
            "from agent import Source, hookimpl; "
            "print(before, 'pydantic' in sys.modules, Source.__name__, sorted(agent.__all__) "
            "== sorted(n for n in agent.__all__ if hasattr(agent, n)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["False", "True", "Source", "True"]


def test_the_lazy_exports_are_the_modules_own_objects():
    import agent
    from agent.hookspecs import hookimpl
    from agent.kinds import Source
    from agent.store import StoreError

    assert agent.Source is Source and agent.hookimpl is hookimpl
    assert agent.StoreError is StoreError
    assert set(agent.__all__) <= set(dir(agent))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        agent.Nope  # noqa: B018
    assert Path(agent.__file__).name == "__init__.py"
