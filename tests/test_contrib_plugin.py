"""A third-party plugin, installed with pip, is listed and used from YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "contrib" / "shipmate-example-plugin"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, timeout=300)


def shipmate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def installed():
    pip("install", "--no-deps", str(PACKAGE))
    yield
    pip("uninstall", "-y", "shipmate-example-plugin")


def test_listed_with_its_distribution_and_types(installed):
    listed = json.loads(shipmate("plugins", "--json").stdout)
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
    result = shipmate("plan", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert "file reads 3" in result.stdout
    assert "would start web slot 2" in result.stdout
    count.write_text("lots")
    assert "holds 'lots', not a count" in shipmate("plan", "-c", str(path)).stdout
    blocked = subprocess.run([sys.executable, "-m", "agent", "check", "-c", str(path)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "SHIPMATE_BLOCK_PLUGINS": "example"})
    assert blocked.returncode == 1
    assert "unknown type 'file'" in blocked.stderr


def test_autoload_off_loads_only_builtins(installed):
    result = subprocess.run([sys.executable, "-m", "agent", "plugins", "--json"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SHIPMATE_DISABLE_PLUGIN_AUTOLOAD": "1"})
    names = {p["name"] for p in json.loads(result.stdout)}
    assert "example" not in names and "static" in names
