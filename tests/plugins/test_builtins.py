"""Every built-in plugin module offers its types through its registration hook, and a
third party's announcer and strategy types come in through theirs."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from agent import Instance, hookimpl
from agent.config import ConfigError, load_config
from agent.kinds import Actuator, Announcer, Source, Strategy, StrategyConfig
from agent.plugins import KIND_HOOKS, load_plugins
from agent.runtime import Agent
from tests.helpers import kill_recorded

BASES = {"source": Source, "actuator": Actuator, "announcer": Announcer, "strategy": Strategy}


@pytest.mark.parametrize("kind", sorted(KIND_HOOKS))
def test_registration_hooks_return_classes_of_their_kind(kind):
    plugins = load_plugins()
    hook = getattr(plugins.pm.hook, KIND_HOOKS[kind])
    offered = [cls for result in hook() for cls in result]
    assert offered, f"no built-in {kind} type"
    for cls in offered:
        assert issubclass(cls, BASES[kind])
        assert plugins.types[kind][cls.type_name].cls is cls


class Recorder(Announcer):
    """A third party's announcer: keeps what each pass asks it to announce."""

    type_name = "recorder"
    synced: ClassVar[list[dict[str, list[str]]]] = []

    def sync(self, healthy: dict[str, list[Instance]]) -> None:
        self.synced.append({name: sorted(i.name for i in group)
                            for name, group in healthy.items()})

    def withdraw(self, instance: Instance) -> None:
        pass


class CarefulConfig(StrategyConfig):
    batch: int = 1
    "how many instances it replaces at once"


class Careful(Strategy):
    """A third party's strategy (its deploys are not run here, only its registration)."""

    type_name = "careful"
    Config = CarefulConfig

    def run(self, deploy: Any) -> None:
        raise AssertionError("not deployed in this test")


class ThirdParty:
    @hookimpl
    def shipmate_announcer_types(self) -> list[type[Announcer]]:
        return [Recorder]

    @hookimpl
    def shipmate_strategy_types(self) -> list[type[Strategy]]:
        return [Careful]


def test_an_announcer_type_from_shipmate_announcer_types_is_synced_by_a_pass(
        write_config, tmp_path):
    plugins = load_plugins(extra=[("third-party", ThirdParty())])
    assert plugins.types["announcer"]["recorder"].plugin == "third-party"
    Recorder.synced.clear()
    path = write_config("""
        agent: {cluster: hooks, store: {backend: embedded, path: state.db}}
        services:
          web:
            command: [sleep, "300"]
            source: {type: static, count: 1}
            actuator: {type: process}
            announce: {type: recorder}
        """)
    try:
        assert Agent(path, once=True, plugins=plugins).run() == 0
        assert Agent(path, once=True, plugins=plugins).run() == 0  # sees it running now
    finally:
        kill_recorded(tmp_path)
    ((name,),) = Recorder.synced[-1].values()  # the running instance, announced
    assert list(Recorder.synced[-1]) == ["web"] and name.startswith("hooks-web-0-")


def test_a_strategy_type_from_shipmate_strategy_types_is_chosen_and_validated(write_config):
    plugins = load_plugins(extra=[("third-party", ThirdParty())])
    assert plugins.types["strategy"]["careful"].cls is Careful
    text = """
        agent: {{cluster: hooks}}
        services:
          web:
            command: [sleep, "300"]
            source: {{type: static, count: 1}}
            actuator: {{type: process}}
            deploy: {{type: careful, {key}: 3}}
        """
    config = load_config(write_config(text.format(key="batch")), plugins)
    deploy = config.services["web"].deploy
    assert isinstance(deploy, CarefulConfig) and deploy.batch == 3
    with pytest.raises(ConfigError, match="batchh"):
        load_config(write_config(text.format(key="batchh")), plugins)


def test_builtins_import_only_the_public_api_of_agent():
    import ast
    from pathlib import Path

    import agent

    public = set(agent.__all__)
    root = Path(__file__).parents[2] / "plugins"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "agent"):
                assert node.module == "agent", f"{path}: imports {node.module}"
                assert {a.name for a in node.names} <= public, path
