"""Every built-in plugin module offers its types through its registration hook."""

from __future__ import annotations

import pytest

from agent.kinds import Actuator, Announcer, Source, Strategy
from agent.plugins import KIND_HOOKS, load_plugins

BASES = {"source": Source, "actuator": Actuator, "announcer": Announcer, "strategy": Strategy}


@pytest.mark.parametrize("kind", sorted(KIND_HOOKS))
def test_registration_hooks_return_classes_of_their_kind(kind):
    plugins = load_plugins()
    hook = getattr(plugins.pm.hook, KIND_HOOKS[kind])
    assert KIND_HOOKS[kind] in ("shipmate_source_types", "shipmate_actuator_types",
                                "shipmate_announcer_types", "shipmate_strategy_types")
    for offered in hook():
        for cls in offered:
            assert issubclass(cls, BASES[kind])
            assert plugins.types[kind][cls.type_name].cls is cls


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
