"""Loading plugins: built-ins through entry points, blocking, autoload, validation."""

from __future__ import annotations

import re
import types

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel

from agent import Source, SourceConfig, hookimpl
from agent.plugins import PluginError, load_plugins
from agent.reconcile import Action


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


# ---------------------------------------------------------------- calls through pluggy


def test_event_wrappers_run_around_the_implementations_and_see_no_failure(caplog):
    calls = []

    @hookimpl(wrapper=True)
    def around(service):
        calls.append(f"before {service}")
        result = yield
        calls.append(f"after {service}")
        return result

    def observe(service):
        calls.append("observed")

    def broken(service):
        raise RuntimeError("observer broke")

    plugins = load_plugins(extra=[("observe", _plugin(shipmate_desired_changed=observe)),
                                  ("broken", _plugin(shipmate_desired_changed=broken)),
                                  ("around", types.SimpleNamespace(
                                      shipmate_desired_changed=around))])
    plugins.call_event("shipmate_desired_changed", service="web", old=1, new=2, reason="t")
    assert calls == ["before web", "observed", "after web"]
    assert "plugin 'broken' failed in shipmate_desired_changed" in caplog.text


def test_a_failing_wrapper_is_named_and_the_implementations_still_run(caplog):
    calls = []

    @hookimpl(wrapper=True)
    def fails_after(service):
        yield
        raise ValueError("teardown broke")

    @hookimpl(wrapper=True)
    def fails_before(service):
        raise ValueError("setup broke")
        yield  # pragma: no cover - a generator that fails before its yield

    plugins = load_plugins(extra=[
        ("observe", _plugin(shipmate_desired_changed=lambda service: calls.append(service))),
        ("after", types.SimpleNamespace(shipmate_desired_changed=fails_after)),
        ("before", types.SimpleNamespace(shipmate_desired_changed=fails_before))])
    plugins.call_event("shipmate_desired_changed", service="web", old=1, new=2, reason="t")
    assert calls == ["web"]
    assert "plugin 'after' failed in shipmate_desired_changed: ValueError: teardown" in caplog.text
    assert "plugin 'before' failed in shipmate_desired_changed: ValueError: setup" in caplog.text


def test_trace_logs_every_hook_call_with_its_plugins_and_duration(monkeypatch, caplog):
    monkeypatch.setenv("SHIPMATE_TRACE_PLUGINS", "1")
    caplog.set_level("INFO", "shipmate.plugins.trace")
    plugins = load_plugins(extra=[("observe", _plugin(
        shipmate_instance_started=lambda instance: None))])
    plugins.call_event("shipmate_instance_started", instance="web-0")
    plugins.call_event("shipmate_leadership_gained", term=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "shipmate.plugins.trace"]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"hook shipmate_instance_started\(instance='web-0'\) by observe: "
                        r"\d+\.\d\d ms", lines[0]), lines[0]
    assert "shipmate_leadership_gained(term=1) by no plugin" in lines[1]


def test_without_trace_nothing_is_traced(monkeypatch, caplog):
    monkeypatch.delenv("SHIPMATE_TRACE_PLUGINS", raising=False)
    caplog.set_level("DEBUG")
    load_plugins().call_event("shipmate_leadership_gained", term=1)
    assert not [r for r in caplog.records if r.name == "shipmate.plugins.trace"]


def test_an_event_only_plugin_lists_its_hooks():
    plugins = load_plugins(extra=[("notify", _plugin(
        shipmate_deploy_finished=lambda service, deploy: None,
        shipmate_crash_loop=lambda service, slot: None))])
    assert plugins.infos["notify"].hooks == ["shipmate_crash_loop", "shipmate_deploy_finished"]
    assert plugins.infos["notify"].types == {}
    assert plugins.infos["static"].hooks == ["shipmate_source_types"]


# ---------------------------------------------------------------- lifecycle


class BlockModel(BaseModel):
    url: str
    retries: int = 3


def test_a_config_model_that_is_not_a_pydantic_model_names_its_plugin():
    with pytest.raises(PluginError, match="'odd'.*returned .*dict.*not a pydantic model"):
        load_plugins(extra=[("odd", _plugin(shipmate_config_model=lambda: dict))])


def test_configure_gives_each_plugin_its_own_block_and_none_without_one():
    got = {}
    plugins = load_plugins(extra=[
        ("one", _plugin(shipmate_config_model=lambda: BlockModel,
                        shipmate_configure=lambda config, context: got.update(one=config))),
        ("two", _plugin(shipmate_configure=lambda config, context: got.update(
            two=(config, context))))])
    block = plugins.config_models["one"](url="http://x")
    plugins.configure({"one": block}, context="ctx")
    assert got == {"one": block, "two": (None, "ctx")}


def test_a_failing_configure_names_its_plugin_and_unconfigures_every_plugin():
    undone = []

    def refuse(config):
        raise ConnectionError("no route to the API")

    plugins = load_plugins(extra=[
        ("early", _plugin(shipmate_configure=lambda config: None,
                          shipmate_unconfigure=lambda: undone.append("early"))),
        ("refuses", _plugin(shipmate_configure=refuse,
                            shipmate_unconfigure=lambda: undone.append("refuses")))])
    with pytest.raises(PluginError, match="plugin 'refuses': shipmate_configure failed: "
                       "ConnectionError: no route to the API"):
        plugins.configure({}, context=None)
    assert sorted(undone) == ["early", "refuses"]


def test_a_failing_unconfigure_is_logged_and_the_others_still_run(caplog):
    undone = []

    def broken():
        raise OSError("flush failed")

    plugins = load_plugins(extra=[("a", _plugin(shipmate_unconfigure=lambda: undone.append(1))),
                                  ("b", _plugin(shipmate_unconfigure=broken))])
    plugins.unconfigure()
    assert undone == [1]
    assert "plugin 'b' failed in shipmate_unconfigure: OSError: flush failed" in caplog.text


# ---------------------------------------------------------------- veto


def _action(verb: str) -> Action:
    return Action(verb, "web", 2, "scale down to 2" if verb == "stop" else "scale up to 3")


def test_the_first_plugin_that_holds_an_action_is_named_with_its_reason():
    asked = []

    def allow(action):
        asked.append(action.verb)

    plugins = load_plugins(extra=[
        ("allows", _plugin(shipmate_allow_action=allow)),
        ("freeze", _plugin(shipmate_allow_action=lambda action: "change freeze"
                           if action.verb == "stop" else None))])
    held = plugins.allow_action(_action("stop"))
    assert (held, held.plugin, held.failed) == ("change freeze", "freeze", False)
    assert plugins.allow_action(_action("start")) is None
    assert asked == ["start"]  # the stop was held before "allows" was asked (first result)


def test_a_failing_veto_holds_stops_but_lets_starts_go(caplog):
    def broken(action):
        raise KeyError("calendar")

    plugins = load_plugins(extra=[("freeze", _plugin(shipmate_allow_action=broken))])
    held = plugins.allow_action(_action("stop"))
    assert held.plugin == "freeze" and held.failed
    assert held == "failed: KeyError: 'calendar'"
    assert plugins.allow_action(_action("start")) is None
    assert "plugin 'freeze' failed in shipmate_allow_action" in caplog.text


def test_a_veto_answering_neither_none_nor_a_reason_counts_as_failed():
    plugins = load_plugins(extra=[("yes", _plugin(shipmate_allow_action=lambda action: True))])
    held = plugins.allow_action(_action("stop"))
    assert held.failed and "returned True, not None or a reason" in held


def test_metrics_are_registered_and_a_clash_is_logged(caplog):
    registry = CollectorRegistry()

    def mine(registry):
        Counter("example_events", "events seen", registry=registry)

    def clash(registry):
        Counter("example_events", "the same name again", registry=registry)

    plugins = load_plugins(extra=[("mine", _plugin(shipmate_register_metrics=mine)),
                                  ("clash", _plugin(shipmate_register_metrics=clash))])
    plugins.register_metrics(registry)
    assert "example_events_total" in generate_latest(registry).decode()
    assert "failed in shipmate_register_metrics" in caplog.text
