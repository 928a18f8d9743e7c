"""The plugin contract is documented and tested, hook by hook."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from agent import hookspecs

HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("shipmate_"))
TESTS = Path(__file__).parents[1]


def test_there_are_hooks_of_every_group():
    assert {"shipmate_source_types", "shipmate_actuator_types", "shipmate_announcer_types",
            "shipmate_strategy_types", "shipmate_desired_changed", "shipmate_instance_started",
            "shipmate_instance_stopped", "shipmate_deploy_started", "shipmate_deploy_progressed",
            "shipmate_deploy_finished", "shipmate_deploy_rolled_back",
            "shipmate_config_model", "shipmate_configure", "shipmate_unconfigure",
            "shipmate_allow_action", "shipmate_register_metrics", "shipmate_leadership_gained",
            "shipmate_leadership_lost", "shipmate_override_changed", "shipmate_health_changed",
            "shipmate_crash_loop"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert len(doc.splitlines()) >= 3, f"{name} needs a docstring: summary, when, params"
    params = [p for p in inspect.signature(getattr(hookspecs, name)).parameters]
    for param in params:
        assert f":param {param}:" in doc, f"{name} does not document {param}"
    if name.endswith("_types") or name == "shipmate_config_model":
        assert ":returns:" in doc
    opts = getattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec", {})
    if opts.get("firstresult"):
        assert ":returns:" in doc and "first non-None result" in doc, name


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_test(name):
    mentioned = [path for path in TESTS.rglob("test_*.py")
                 if path.name != "test_hookspecs.py" and name in path.read_text()]
    assert mentioned, f"no test calls or implements {name}"
