"""Pytest fixtures for Shipmate and for authors of Shipmate plugins.

Installed as a pytest plugin (the ``pytest11`` entry point), so any project
with shipmate installed can use them:

- ``shipmate_plugins`` -> :class:`agent.plugins.Plugins`: a fresh plugin manager with
  every installed plugin;
- ``embedded_store`` -> :class:`agent.store.embedded.EmbeddedStore`: an empty embedded
  store in a temporary folder;
- ``write_config(text: str, name: str = "agent.yaml") -> Path``: writes dedented YAML
  text to a file in ``tmp_path`` and returns its path;
- ``load_test_config(text: str) -> Config``: loads YAML text into a validated
  :class:`agent.config.Config`;
- ``run_agent(text: str, plugins: Plugins | None = None) -> Agent``: runs a real agent
  on YAML text in a thread until the test ends.

docs/plugins.md has an example test.
"""

from __future__ import annotations

import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import Config, load_config
from agent.plugins import Plugins, load_plugins
from agent.runtime import Agent
from agent.store.embedded import EmbeddedStore


@pytest.fixture
def shipmate_plugins() -> Plugins:
    """Every installed plugin, loaded afresh for this test."""
    return load_plugins()


@pytest.fixture
def embedded_store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    """An empty embedded store, closed after the test."""
    store = EmbeddedStore(tmp_path / "state.db")
    yield store
    store.close()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """``write_config(yaml_text)`` -> the path of ``agent.yaml`` holding the dedented text."""

    def write(text: str, name: str = "agent.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


@pytest.fixture
def load_test_config(write_config: Callable[[str], Path],
                     shipmate_plugins: Plugins) -> Callable[[str], Config]:
    """``load_test_config(yaml_text)`` -> a validated config (raises ConfigError)."""

    def load(text: str) -> Config:
        return load_config(write_config(text), shipmate_plugins)

    return load


@pytest.fixture
def run_agent(write_config: Callable[[str], Path]) -> Iterator[Callable[..., Agent]]:
    """``run_agent(yaml_text, plugins=None)`` -> a real :class:`Agent` running in a thread.

    Every agent started is stopped when the test ends (its instances keep
    running, as after Ctrl-C: clean them up in the test).
    """
    started: list[tuple[Agent, threading.Thread]] = []

    def start(text: str, plugins: Plugins | None = None) -> Agent:
        agent = Agent(write_config(text), plugins=plugins)
        thread = threading.Thread(target=agent.run, daemon=True, name="agent")
        thread.start()
        started.append((agent, thread))
        return agent

    yield start
    for agent, thread in started:
        agent.stop()
        thread.join(15)
