"""A third-party plugin, installed with pip, is listed and used from YAML.

It is installed into a folder of its own (``pip install --target``) that only
the agents these tests start see (``PYTHONPATH``): the interpreter running the
tests, shared with every other test, is left as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "contrib" / "shipmate-example-plugin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The environment of an agent that has the example plugin installed."""
    target = tmp_path_factory.mktemp("example-plugin")
    subprocess.run([sys.executable, "-m", "pip", "-q", "install", "--no-deps", "--target",
                    str(target), str(PACKAGE)], check=True, timeout=300)
    paths = [str(target), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def shipmate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_the_interpreter_running_the_tests_does_not_have_it(installed):
    from importlib import metadata

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution("shipmate-example-plugin")
    listed = json.loads(shipmate("plugins", "--json", env=dict(os.environ)).stdout)
    assert "example" not in {p["name"] for p in listed}


def test_listed_with_its_distribution_and_types(installed):
    listed = json.loads(shipmate("plugins", "--json", env=installed).stdout)
    example = next(p for p in listed if p["name"] == "example")
    assert example["distribution"] == "shipmate-example-plugin"
    assert example["version"] == "1.0.0"
    assert example["types"] == {"source": ["file"]}


def test_used_from_yaml_and_blockable(installed, write_config, tmp_path):
    count = tmp_path / "web.count"
    count.write_text("3\n")
    path = write_config(f"""
        agent: {{cluster: contrib}}
        services:
          web:
            command: [sleep, "1"]
            source: {{type: file, path: {count}}}
            actuator: {{type: process}}
        """)
    result = shipmate("plan", "-c", str(path), env=installed)
    assert result.returncode == 0, result.stderr
    assert "file reads 3" in result.stdout
    assert "would start web slot 2" in result.stdout
    count.write_text("lots")
    assert "holds 'lots', not a count" in shipmate("plan", "-c", str(path), env=installed).stdout
    blocked = shipmate("check", "-c", str(path),
                       env={**installed, "SHIPMATE_BLOCK_PLUGINS": "example"})
    assert blocked.returncode == 1
    assert "unknown type 'file'" in blocked.stderr


def test_autoload_off_loads_only_builtins(installed):
    result = shipmate("plugins", "--json",
                      env={**installed, "SHIPMATE_DISABLE_PLUGIN_AUTOLOAD": "1"})
    names = {p["name"] for p in json.loads(result.stdout)}
    assert "example" not in names and "static" in names
