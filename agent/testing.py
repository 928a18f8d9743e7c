"""Pytest fixtures for Shipmate and for authors of Shipmate plugins.

Installed as a pytest plugin (the ``pytest11`` entry point), so any project
with shipmate installed can use them:

- ``shipmate_plugins``: a fresh plugin manager with every installed plugin;
- ``embedded_store``: an empty embedded store in a temporary folder;
- ``write_config``: writes YAML text to a file and returns its path;
- ``load_test_config``: loads YAML text into a validated :class:`agent.config.Config`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import Config, load_config
from agent.plugins import Plugins, load_plugins
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
