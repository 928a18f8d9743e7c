"""Loading plugins: the plugin manager and the registry of types by kind.

Every plugin, built-in or third-party, loads from the ``shipmate`` entry-point
group, so all can be listed, blocked and replaced by name. Operators control
loading with:

- ``SHIPMATE_BLOCK_PLUGINS=a,b`` or ``agent.plugins.block: [a, b]``: never load these;
- ``SHIPMATE_DISABLE_PLUGIN_AUTOLOAD=1`` or ``agent.plugins.autoload: false``:
  load only the plugins of the ``shipmate`` distribution itself;
- ``SHIPMATE_TRACE_PLUGINS=1``: log every hook call (its plugins and duration).

Every hook is called through pluggy (``pm.hook.NAME(...)``), wrappers
(``@hookimpl(wrapper=True)``) included. So that one plugin's failure never
stops the others or the agent, each implementation of an event, lifecycle or
veto hook is *guarded* when its plugin registers: its function is replaced by
one that catches what it raises and logs it with the plugin's name
(:func:`_guard`). pluggy itself stops a call at the first exception.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal

import pluggy
from pydantic import BaseModel, ConfigDict, create_model

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
CONFIG_HOOK = "shipmate_config_model"
LIFECYCLE = {"shipmate_configure": "named", "shipmate_unconfigure": "logged",
             "shipmate_register_metrics": "logged", "shipmate_allow_action": "veto"}
"""How a failure of each non-event hook is guarded (every event hook is ``logged``):
``named`` raises :class:`PluginError` naming the plugin, ``logged`` logs and carries
on, ``veto`` is :func:`_veto_outcome`'s."""
trace_log = logging.getLogger("shipmate.plugins.trace")


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
    hooks: list[str] = field(default_factory=list)
    "every hook the plugin implements, registration and events alike"


class Hold(str):
    """A reason to hold an action, from :func:`agent.hookspecs.shipmate_allow_action`,
    with the name of the plugin that gave it (``plugin``)."""

    plugin: str
    failed: bool

    def __new__(cls, reason: str, plugin: str, failed: bool = False) -> Hold:
        hold = super().__new__(cls, reason)
        hold.plugin, hold.failed = plugin, failed
        return hold


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
        self.config_models: dict[str, type[BaseModel]] = {}
        "plugin name -> the model of its ``plugins: {NAME: ...}`` block (unknown keys refused)"
        for impl in getattr(pm.hook, CONFIG_HOOK).get_hookimpls():
            plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
            try:
                model = impl.function()
            except Exception as exc:  # noqa: BLE001 - a plugin's failure is reported by name
                errors.append(f"plugin {plugin!r}: {CONFIG_HOOK}() failed: {exc}")
                continue
            if model is None:
                continue
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                errors.append(f"plugin {plugin!r}: {CONFIG_HOOK}() returned {model!r}, not a "
                              "pydantic model class")
                continue
            self.config_models[plugin] = _strict(model, plugin)
        self.skipped: set[str] = set()
        "plugins not loaded on purpose (blocked, or autoload off): their config blocks wait"
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
        """Call an event hook through pluggy (wrappers included); each implementation is
        guarded: a failing one is logged with its plugin's name, never raised."""
        getattr(self.pm.hook, hook_name)(**kwargs)

    def allow_action(self, action: object) -> Hold | None:
        """Ask :func:`agent.hookspecs.shipmate_allow_action` about ``action``: None to go
        ahead, else the first plugin's :class:`Hold` (its reason and name)."""
        held = self.pm.hook.shipmate_allow_action(action=action)
        if held is None or isinstance(held, Hold):
            return held
        return Hold(str(held), "(a wrapper)")  # a wrapper replaced the result

    def configure(self, blocks: Mapping[str, BaseModel], context: object) -> None:
        """Call ``shipmate_configure``: each plugin gets its own block (None without one).

        :raises PluginError: naming the plugin whose configure failed (every plugin is
            then unconfigured: ``shipmate_unconfigure`` must be safe to call then).
        """
        try:
            self.pm.hook.shipmate_configure(config=PerPlugin(blocks), context=context)
        except PluginError:
            self.unconfigure()
            raise

    def unconfigure(self) -> None:
        """Call every ``shipmate_unconfigure`` (each guarded: a failure is logged)."""
        self.pm.hook.shipmate_unconfigure()

    def register_metrics(self, registry: object) -> None:
        """Let plugins add their metrics to the agent's Prometheus ``registry``."""
        self.pm.hook.shipmate_register_metrics(registry=registry)


def _strict(model: type[BaseModel], plugin: str) -> type[BaseModel]:
    """``model`` refusing unknown keys (a misspelled key is a config error with its line)."""
    if model.model_config.get("extra") == "forbid":
        return model
    config = ConfigDict(**{**model.model_config, "extra": "forbid"})  # type: ignore[typeddict-item]
    return type(model.__name__, (model,), {"model_config": config, "__module__": model.__module__,
                                           "__doc__": model.__doc__ or f"plugin {plugin}"})


# ---------------------------------------------------------------- guards


class PerPlugin(dict[str, Any]):
    """A hook argument that each guarded implementation receives as the value of its own
    plugin's name (None if absent): one pluggy call hands every plugin its own block."""


def _guard(hook: str, plugin: str, impl: pluggy.HookImpl) -> Callable[..., Any]:
    """The guarded stand-in of one implementation's function (see the module docstring).

    pluggy calls it with the implementation's positional arguments (``impl.argnames``,
    read from the original function at registration), so the signature may differ.
    """
    how = LIFECYCLE.get(hook, "logged")
    function = impl.function

    def own(args: Sequence[Any]) -> list[Any]:
        return [a.get(plugin) if isinstance(a, PerPlugin) else a for a in args]

    def failed(exc: BaseException, args: Sequence[Any]) -> Any:
        if how == "named":
            if isinstance(exc, PluginError):
                raise exc
            raise PluginError(f"plugin {plugin!r}: {hook} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        log.error("plugin %r failed in %s: %s: %s", plugin, hook, type(exc).__name__, exc,
                  exc_info=exc)
        if how == "veto":
            return _veto_outcome(plugin, args, f"failed: {type(exc).__name__}: {exc}")
        return None

    if impl.wrapper or impl.hookwrapper:
        @functools.wraps(function)
        def wrapper(*args: Any) -> Generator[None, Any, Any]:
            gen = function(*own(args))
            try:
                next(gen)
            except StopIteration:
                failed(RuntimeError("the wrapper did not yield"), ())
                return (yield)
            except Exception as exc:
                failed(exc, ())
                return (yield)
            try:
                result = yield
            except Exception as exc:  # an inner implementation raised (a named hook)
                return _finish(gen, lambda exc=exc: gen.throw(exc), None, failed)
            return _finish(gen, lambda: gen.send(result), result, failed)

        return wrapper

    @functools.wraps(function)
    def guarded(*args: Any) -> Any:
        try:
            result = function(*own(args))
        except Exception as exc:
            return failed(exc, args)
        if how == "veto" and result is not None:
            if not isinstance(result, str):
                return failed(TypeError(f"returned {result!r}, not None or a reason"), args)
            return Hold(result or "held (no reason given)", plugin)
        return result

    return guarded


def _finish(gen: Generator[None, Any, Any], step: Callable[[], Any], fallback: Any,
            failed: Callable[[BaseException, Sequence[Any]], Any]) -> Any:
    """Run a wrapper's part after its ``yield``; its result, else ``fallback``."""
    try:
        step()
    except StopIteration as stop:
        return stop.value
    except Exception as exc:
        failed(exc, ())
        return fallback
    gen.close()
    failed(RuntimeError("the wrapper yielded more than once"), ())
    return fallback


def _veto_outcome(plugin: str, args: Sequence[Any], why: str) -> Hold | None:
    """A veto that failed: hold a stop (nothing is taken down on a check that cannot
    answer), let a start go (crash recovery and scale-ups never wait on a broken plugin)."""
    action = args[0] if args else None
    if getattr(action, "verb", None) == "start":
        return None
    return Hold(why, plugin, failed=True)


def _guard_plugin(pm: pluggy.PluginManager, plugin: object, name: str) -> list[str]:
    """Guard every event, lifecycle and veto implementation of ``plugin``; return the
    names of all the hooks it implements."""
    hooks = []
    for caller in pm.get_hookcallers(plugin) or []:
        hooks.append(caller.name)
        if caller.spec is None or not _guarded_hook(caller.name):
            continue  # registration hooks are called one by one by Plugins, naming it
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                # HookImpl.function is public (and Final only to type checkers): pluggy has
                # no hook of its own to keep one implementation's failure from the others
                impl.function = _guard(caller.name, name, impl)  # type: ignore[misc]
    return sorted(hooks)


NOT_GUARDED = {*KIND_HOOKS.values(), CONFIG_HOOK, "shipmate_register_commands"}
"hooks whose callers handle failures themselves; every other hook is a lifecycle hook or an event"


def _guarded_hook(name: str) -> bool:
    return name not in NOT_GUARDED


# ---------------------------------------------------------------- tracing


def _trace(pm: pluggy.PluginManager) -> None:
    """Log every hook call with its plugins and duration (``SHIPMATE_TRACE_PLUGINS=1``)."""
    started = threading.local()

    def before(hook: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        stack = getattr(started, "stack", None)
        if stack is None:
            stack = started.stack = []
        stack.append(time.perf_counter())

    def after(outcome: Any, hook: str, impls: Sequence[pluggy.HookImpl],
              kwargs: Mapping[str, Any]) -> None:
        took = time.perf_counter() - started.stack.pop()
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
        failed = f" raised {outcome.exception!r}" if outcome.exception is not None else ""
        trace_log.info("hook %s(%s) by %s: %.2f ms%s", hook, args,
                       ", ".join(i.plugin_name for i in impls) or "no plugin", took * 1000,
                       failed)

    pm.add_hookcall_monitoring(before, after)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _tracing_from_env() -> bool:
    return os.environ.get("SHIPMATE_TRACE_PLUGINS", "").lower() not in ("", "0", "false")


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
    skipped: set[str] = set()
    found_builtin = False
    for ep in sorted(entry_points(group=hookspecs.PROJECT), key=lambda e: e.name):
        dist, version = _distribution(ep)
        found_builtin |= dist == DISTRIBUTION
        if ep.name in blocked:
            pm.set_blocked(ep.name)
            skipped.add(ep.name)
            continue
        if not autoload and dist != DISTRIBUTION:
            skipped.add(ep.name)
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
    for name, info in infos.items():
        info.hooks = _guard_plugin(pm, pm.get_plugin(name), name)
    if _tracing_from_env():
        _trace(pm)
    plugins = Plugins(pm, infos)
    plugins.broken = broken
    plugins.skipped = skipped | blocked
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
