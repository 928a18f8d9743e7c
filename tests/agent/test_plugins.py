"""Loading plugins: built-ins through entry points, blocking, autoload, validation."""

from __future__ import annotations

import types

import pytest

from agent import Source, SourceConfig, hookimpl
from agent.plugins import PluginError, load_plugins


def test_builtins_load_through_entry_points():
    plugins = load_plugins()
    assert plugins.infos["static"].distribution == "shipmate"
    assert plugins.types["source"]["static"].plugin == "static"
    assert "process" in plugins.types["actuator"]
    assert "etcd" in plugins.types["announcer"]


def test_a_blocked_plugin_and_its_types_are_gone(monkeypatch):
    assert "static" not in load_plugins(block=["static"]).types["source"]
    monkeypatch.setenv("SHIPMATE_BLOCK_PLUGINS", "static, process")
    plugins = load_plugins()
    assert "static" not in plugins.types["source"]
    assert "process" not in plugins.types["actuator"]
    assert plugins.pm.is_blocked("static")


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})


class EchoSource(Source):
    type_name = "echo"
    Config = SourceConfig

    def read(self) -> float:
        return 1


def test_an_extra_plugin_offers_a_type():
    plugins = load_plugins(extra=[("echo", _plugin(shipmate_source_types=lambda: [EchoSource]))])
    assert plugins.types["source"]["echo"].cls is EchoSource
    assert plugins.infos["echo"].types == {"source": ["echo"]}


def test_two_plugins_offering_one_type_name_is_an_error_naming_both():
    with pytest.raises(PluginError, match="'static' is offered by both 'static' and 'dup'"):
        load_plugins(extra=[("dup", _plugin(shipmate_source_types=lambda: [_renamed("static")]))])


def _renamed(name: str) -> type[Source]:
    return type("Renamed", (EchoSource,), {"type_name": name})


def test_replacing_a_builtin_by_blocking_it():
    plugins = load_plugins(block=["static"],
                           extra=[("mine", _plugin(shipmate_source_types=lambda: [
                               _renamed("static")]))])
    assert plugins.types["source"]["static"].plugin == "mine"


def test_an_unknown_hook_is_rejected_at_start():
    with pytest.raises(PluginError, match="'typo'.*shipmate_sorce_types; did you mean "
                       "shipmate_source_types"):
        load_plugins(extra=[("typo", _plugin(shipmate_sorce_types=lambda: []))])


def test_without_strict_a_broken_plugin_is_left_out_and_named():
    plugins = load_plugins(strict=False,
                           extra=[("typo", _plugin(shipmate_sorce_types=lambda: []))])
    assert "did you mean shipmate_source_types?" in plugins.broken["typo"]
    assert "typo" not in plugins.infos and plugins.pm.get_plugin("typo") is None
    assert "static" in plugins.types["source"]  # the others carry on


def test_a_type_that_is_not_of_its_kind_is_rejected():
    with pytest.raises(PluginError, match="'bad'.*not a Source subclass"):
        load_plugins(extra=[("bad", _plugin(shipmate_source_types=lambda: [object]))])


def test_a_failing_registration_hook_names_its_plugin():
    def boom():
        raise RuntimeError("kaput")

    with pytest.raises(PluginError, match="'boom'.*kaput"):
        load_plugins(extra=[("boom", _plugin(shipmate_actuator_types=boom))])


def test_event_hooks_are_called_and_a_failing_one_is_contained(caplog):
    seen = []

    def good(service, old, new, reason):
        seen.append((service, old, new, reason))

    def bad(service):
        raise RuntimeError("observer broke")

    plugins = load_plugins(extra=[("good", _plugin(shipmate_desired_changed=good)),
                                  ("bad", _plugin(shipmate_desired_changed=bad))])
    plugins.call_event("shipmate_desired_changed", service="web", old=1, new=2, reason="test")
    assert seen == [("web", 1, 2, "test")]
    assert "plugin 'bad' failed in shipmate_desired_changed" in caplog.text
