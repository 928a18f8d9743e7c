"""Loading plugins: the plugin manager and the registry of types by kind.

Every plugin, built-in or third-party, loads from the ``shipmate`` entry-point
group, so all can be listed, blocked and replaced by name. Operators control
loading with:

- ``SHIPMATE_BLOCK_PLUGINS=a,b`` or ``agent.plugins.block: [a, b]``: never load these;
- ``SHIPMATE_DISABLE_PLUGIN_AUTOLOAD=1`` or ``agent.plugins.autoload: false``:
  load only the plugins of the ``shipmate`` distribution itself.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Literal

import pluggy
from pydantic import create_model

from agent import hookspecs
from agent.kinds import KINDS, PluginType

log = logging.getLogger("shipmate.plugins")
DISTRIBUTION = "shipmate"
KIND_HOOKS = {
    "source": "shipmate_source_types",
    "actuator": "shipmate_actuator_types",
    "announcer": "shipmate_announcer_types",
    "strategy": "shipmate_strategy_types",
}


class PluginError(Exception):
    """A plugin failed to load or offers something invalid; the message names it."""


@dataclass
class PluginInfo:
    """What ``shipmate plugins`` shows for one loaded plugin."""

    name: str
    distribution: str
    version: str
    module: str
    types: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class TypeEntry:
    """One registered type: its class, its config model with ``type`` added, its plugin."""

    kind: str
    name: str
    cls: type[PluginType]
    model: type
    plugin: str


def _env_list(name: str) -> list[str]:
    return [p.strip() for p in os.environ.get(name, "").split(",") if p.strip()]


def _autoload_from_env() -> bool:
    return os.environ.get("SHIPMATE_DISABLE_PLUGIN_AUTOLOAD", "").lower() in ("", "0", "false")


class Plugins:
    """The plugin manager plus the type registry built from its registration hooks."""

    def __init__(self, pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
        self.pm = pm
        self.hook = pm.hook
        self.infos = infos
        self.broken: dict[str, str] = {}
        "plugins left out because they failed to load (``strict=False``): name -> why"
        self.types: dict[str, dict[str, TypeEntry]] = {kind: {} for kind in KINDS}
        errors = []
        for kind, hook_name in KIND_HOOKS.items():
            caller = getattr(pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
                try:
                    offered = impl.function() or []
                except Exception as exc:  # noqa: BLE001 - a plugin's failure is reported by name
                    errors.append(f"plugin {plugin!r}: {hook_name}() failed: {exc}")
                    continue
                for cls in offered:
                    problem = self._add(kind, cls, plugin)
                    if problem:
                        errors.append(problem)
        if errors:
            raise PluginError("\n".join(errors))

    def _add(self, kind: str, cls: type, plugin: str) -> str | None:
        base = KINDS[kind]
        name = getattr(cls, "type_name", None)
        if not (isinstance(cls, type) and issubclass(cls, base)) or not name:
            return (f"plugin {plugin!r}: {cls!r} is not a {base.__name__} subclass with a "
                    "type_name")
        if name in self.types[kind]:
            other = self.types[kind][name].plugin
            return (f"{kind} type {name!r} is offered by both {other!r} and {plugin!r}; "
                    f"block one (SHIPMATE_BLOCK_PLUGINS={other})")
        model = create_model(f"{name.title().replace('-', '')}{kind.title()}Config",
                             __base__=cls.Config, type=(Literal[name], ...))
        self.types[kind][name] = TypeEntry(kind, name, cls, model, plugin)
        info = self.infos.get(plugin)
        if info is not None:
            info.types.setdefault(kind, []).append(name)
        return None

    def call_event(self, hook_name: str, **kwargs: object) -> None:
        """Call an event hook; a failing implementation is logged by name, never raised."""
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception:
                log.exception("plugin %r failed in %s", self.pm.get_name(impl.plugin), hook_name)


def _distribution(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    return (dist.name, dist.version) if dist is not None else ("?", "?")


def load_plugins(*, block: Iterable[str] = (), autoload: bool | None = None,
                 extra: Iterable[tuple[str, object]] = (), strict: bool = True) -> Plugins:
    """Build the plugin manager from the ``shipmate`` entry points.

    :param block: plugin names never to load (added to ``SHIPMATE_BLOCK_PLUGINS``).
    :param autoload: False loads only the ``shipmate`` distribution's own plugins;
        None reads ``SHIPMATE_DISABLE_PLUGIN_AUTOLOAD``.
    :param extra: ``(name, plugin)`` pairs registered after the entry points
        (tests and embedding programs).
    :param strict: False leaves a plugin that fails to import or names an unknown hook
        out (listed in :attr:`Plugins.broken`) instead of failing: ``status``,
        ``plugins`` and ``check`` report it and carry on; ``run`` is strict.
    :raises PluginError: naming each plugin that failed to import or validate.
    """
    broken: dict[str, str] = {}
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = set(block) | set(_env_list("SHIPMATE_BLOCK_PLUGINS"))
    if autoload is None:
        autoload = _autoload_from_env()
    infos: dict[str, PluginInfo] = {}
    found_builtin = False
    for ep in sorted(entry_points(group=hookspecs.PROJECT), key=lambda e: e.name):
        dist, version = _distribution(ep)
        found_builtin |= dist == DISTRIBUTION
        if ep.name in blocked:
            pm.set_blocked(ep.name)
            continue
        if not autoload and dist != DISTRIBUTION:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue  # the same distribution seen twice on sys.path
        try:
            plugin = ep.load()
            _register(pm, plugin, ep.name)
        except Exception as exc:
            message = (str(exc) if isinstance(exc, PluginError) else
                       f"Error importing plugin {ep.name!r} ({dist} {version}, {ep.value}): "
                       f"{type(exc).__name__}: {exc}")
            if strict:
                raise PluginError(message) from exc
            broken[ep.name] = message
            continue
        infos[ep.name] = PluginInfo(ep.name, dist, version, ep.value)
    if not found_builtin:
        raise PluginError("the built-in plugins are not installed: run `pip install -e .` "
                          "in the shipmate checkout (they load through entry points)")
    for name, plugin in extra:
        _register(pm, plugin, name)
        infos[name] = PluginInfo(name, "-", "-", getattr(plugin, "__name__", repr(plugin)))
    unknown = _unknown_hooks(pm)
    if unknown and strict:
        raise PluginError("\n".join(unknown.values()))
    for name, message in unknown.items():
        pm.unregister(name=name)
        infos.pop(name, None)
        broken[name] = message
    plugins = Plugins(pm, infos)
    plugins.broken = broken
    return plugins


def _unknown_hooks(pm: pluggy.PluginManager) -> dict[str, str]:
    """Plugins implementing a hook that no spec names (pluggy's ``check_pending``), each
    with a "did you mean" where a spec's name is close."""
    specs = [name for name in dir(hookspecs) if name.startswith(f"{hookspecs.PROJECT}_")]
    out: dict[str, list[str]] = {}
    for name in dir(pm.hook):
        caller = getattr(pm.hook, name)
        if name.startswith("_") or not isinstance(caller, pluggy.HookCaller):
            continue
        if caller.spec is not None:
            continue
        near = difflib.get_close_matches(name, specs, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
            out.setdefault(plugin, []).append(f"unknown hook {name}{hint}")
    return {plugin: f"plugin {plugin!r}: " + "; ".join(found) for plugin, found in out.items()}


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"plugin {name!r}: {exc}") from exc
