"""The running agent: wiring config, plugins, store, signals and HTTP to the loop.

:class:`Agent` builds things (the config, the plugins and the objects they
offer, the store, leadership, the HTTP endpoint, the store watch) and hands
them to :class:`agent.loop.Loop`, which runs them. SIGTERM and Ctrl-C stop the
agent and leave every instance running; SIGHUP reloads the config (a bad new
config is reported and the old one kept). Signal handlers only set a flag; the
loop wakes through ``signal.set_wakeup_fd`` on its self-pipe.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.config import Config, ConfigError, load_config
from agent.keys import Keys
from agent.kinds import Context, PluginType
from agent.leader import FencedStore, Leadership
from agent.loop import Loop, Settings
from agent.metrics import Metrics, serve
from agent.orphans import default_announcer
from agent.plugins import PluginError, Plugins, load_plugins
from agent.reconcile import ServiceRuntime
from agent.scaling import service_source
from agent.store import Store, open_store

log = logging.getLogger("shipmate")


def open_config(path: str | Path, *, plugins: Plugins | None = None) -> tuple[Config, Plugins]:
    """Load plugins and the config; reload the plugins if the config blocks some.

    :raises ConfigError, PluginError: with every problem named.
    """
    plugins = plugins or load_plugins()
    config = load_config(path, plugins)
    settings = config.agent.plugins
    if settings.block or not settings.autoload:
        plugins = load_plugins(block=settings.block, autoload=settings.autoload or None)
        config = load_config(path, plugins)
    return config, plugins


def connect(config: Config) -> Store:
    """Open the configured store (its paths relative to the config file)."""
    settings = config.agent.store
    settings = settings.model_copy(update={"path": config.resolve(settings.path),
                                           "tls": settings.tls.resolved(config.base_dir)})
    return open_store(settings)


class Builder:
    """Builds plugin objects, one per distinct config, reusing them across reloads."""

    def __init__(self, plugins: Plugins, context: Context) -> None:
        self.plugins, self.context = plugins, context
        self.shared: dict[tuple[str, str], PluginType] = {}
        self.owned: list[PluginType] = []  # one per service (sources, strategies)

    def make(self, kind: str, cfg: Any, share: bool = True) -> Any:
        if cfg is None:
            return None
        name = cfg.type
        entry = self.plugins.types[kind][name]
        key = (kind, cfg.model_dump_json())
        if share and key in self.shared:
            return self.shared[key]
        try:
            made = entry.cls(cfg, self.context)
        except Exception as exc:
            raise PluginError(f"cannot set up the {name} {kind} (plugin {entry.plugin!r}): "
                              f"{type(exc).__name__}: {exc}") from exc
        if share:
            self.shared[key] = made
        else:
            self.owned.append(made)
        return made

    def strategy(self, cfg: Any, name: str | None = None, default: str = "rolling") -> Any:
        """The strategy of a service's ``deploy`` block (none: ``default``, the YAML's
        ``agent.default_strategy``); ``name`` picks another type (with that type's defaults
        unless the block is of that type)."""
        name = name or (cfg.type if cfg is not None else default)
        entry = self.plugins.types["strategy"].get(name)
        if entry is None:
            raise PluginError(f"unknown deploy strategy {name!r}; installed: "
                              f"{', '.join(self.plugins.types['strategy'])}")
        if cfg is None or cfg.type != name:
            cfg = entry.model(type=name)
        return self.make("strategy", cfg, share=False)

    def services(self, config: Config) -> dict[str, ServiceRuntime]:
        """One runtime per service; objects the previous build made and this one does not
        use are closed (only once the whole build succeeded)."""
        used = set()
        out = {}
        previous, self.owned = self.owned, []
        for name, svc in config.services.items():
            actuator = self.make("actuator", svc.actuator)
            announcer = self.make("announcer", svc.announce)
            used |= {id(actuator), id(announcer)}
            out[name] = ServiceRuntime(
                name=name, config=svc, cluster=config.agent.cluster,
                source=service_source(svc, lambda cfg: self.make("source", cfg, share=False)),
                actuator=actuator, announcer=announcer,
                strategy=self.strategy(svc.deploy, default=config.agent.default_strategy))
        for key, obj in list(self.shared.items()):
            if id(obj) not in used:
                obj.close()
                del self.shared[key]
        for obj in previous:
            obj.close()
        return out

    def close(self) -> None:
        for obj in [*self.shared.values(), *self.owned]:
            obj.close()
        self.shared.clear()
        self.owned.clear()


class Agent:
    """The agent process. ``run()`` blocks until stopped and returns an exit code."""

    def __init__(self, config_path: str | Path, *, dry_run: bool = False, once: bool = False,
                 plugins: Plugins | None = None) -> None:
        self.config_path = Path(config_path)
        self.dry_run, self.once = dry_run, once
        self._given_plugins = plugins  # kept across reloads (tests, embedding programs)
        self.config, self.plugins = open_config(self.config_path, plugins=plugins)
        self.store = connect(self.config)
        self.keys = Keys(self.config.key_prefix)
        self.metrics = Metrics()
        self.plugins.register_metrics(self.metrics.registry)
        self.leadership = Leadership(self.store, self.keys.leader,
                                     ttl=self.config.agent.leader_ttl,
                                     on_change=lambda leading: self.loop.request_pass())
        # what acts for the leader writes through the fence (the raw store stays for reads
        # of the CLI and for leadership itself); a dry run writes nothing
        acting = self.store if dry_run else FencedStore(self.store, self.leadership)
        self.context = context = Context(cluster=self.config.agent.cluster, store=acting,
                          state_dir=self.config.resolve(self.config.agent.state_dir),
                          wake=lambda: self.loop.request_pass())
        self.builder = Builder(self.plugins, context)
        self.loop = Loop(store=acting, keys=self.keys,
                         services=self.builder.services(self.config),
                         leadership=self.leadership, settings=self._settings(),
                         metrics=self.metrics, emit=self._emit, allow=self._allow,
                         strategies=self._strategy,
                         reload=self.reload)
        # issue 11: orphans are withdrawn through the default announcer too (agent/orphans.py)
        self.loop.orphans.default = lambda: default_announcer(self.builder)

    def _settings(self) -> Settings:
        return Settings.from_config(self.config.agent, dry_run=self.dry_run, once=self.once)

    def _emit(self, hook: str, **kwargs: Any) -> None:
        self.plugins.call_event(hook, **kwargs)  # the plugins of the config in force

    def _allow(self, action: Any) -> str | None:
        return self.plugins.allow_action(action)

    @property
    def services(self) -> dict[str, ServiceRuntime]:
        return self.loop.services

    @property
    def deploys(self) -> Any:
        return self.loop.deploys

    def reload(self) -> None:
        """Re-read the config and rebuild the services; keep the old ones on any error.

        The loop calls it only while no deploy runs: a deploy's plugin objects
        must not be closed under it.
        """
        try:
            config, plugins = open_config(self.config_path, plugins=self._given_plugins)
            for key in ("store", "cluster", "state_dir"):
                if getattr(config.agent, key) != getattr(self.config.agent, key):
                    raise ConfigError([f"agent.{key} cannot change while the agent runs: "
                                       "restart it"])
            self.builder.plugins = plugins
            services = self.builder.services(config)
        except Exception as exc:  # noqa: BLE001 - a bad reload never stops the agent
            self.builder.plugins = self.plugins
            log.error("reload failed, keeping the running config:\n%s", exc)
            return
        self.plugins.unconfigure()
        self.config, self.plugins = config, plugins
        try:
            plugins.configure(config.plugins, self.context)
        except PluginError as exc:  # the others are configured: the agent runs on
            log.error("reload: %s", exc)
        self.loop.configure(services, self._settings())
        self.loop.poll_all()
        log.info("config reloaded: %d services", len(services))

    def _strategy(self, service: str, name: str | None) -> Any:
        runtime = self.services[service]
        if name is None or name == runtime.strategy.type_name:
            return runtime.strategy
        return self.builder.strategy(runtime.config.deploy, name)

    def _on_watch(self, events: list[Any]) -> None:
        # an empty list is a resync (the watch reconnected, or fell behind): look again.
        # The next pass re-reads only the services named (agent/reconcile.py); the scaler
        # reads again what others changed. The agent's own policy and problems writes need
        # no pass.
        self.loop.scaler.changed(events)
        self.loop.store_changed(events)
        if events and all((self.keys.parse(e.key) or ("", ""))[1] in ("policy", "problems")
                          for e in events):
            return
        self.loop.request_pass()

    # ---------------------------------------------------------------- running
    def stop(self) -> None:
        """Stop the agent (any thread); instances keep running."""
        self.loop.request_stop()

    def request_reload(self) -> None:
        """Reload at the next turn of the loop, or once the running deploys end."""
        if self.loop.deploying():
            log.info("the reload waits for the running deploy to end")
        self.loop.request_reload()

    def _signals(self) -> Any:
        """Handlers that only set flags (never a lock); the wakeup fd wakes the loop."""
        if threading.current_thread() is not threading.main_thread():
            return None
        loop = self.loop
        signal.signal(signal.SIGTERM, lambda *_: setattr(loop, "stop_requested", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(loop, "stop_requested", True))
        signal.signal(signal.SIGHUP, lambda *_: setattr(loop, "reload_requested", True))
        return signal.set_wakeup_fd(loop.waker.write_fd, warn_on_full_buffer=False)

    def run(self) -> int:
        """Run until stopped (or one pass with ``once``); return the exit code."""
        self.plugins.configure(self.config.plugins, self.context)  # PluginError: no start
        previous_fd = self._signals()
        server = watch = None
        try:
            if self.config.agent.http and not self.once:
                server = self._serve()
            watch = self.store.watch(self.keys.services, self._on_watch)
            if not self.once and not self.dry_run:
                self.leadership.watch(self.loop.campaign_now)
            if self.once:
                return self.loop.run_once()
            log.info("cluster %s, store %s", self.config.agent.cluster,
                     self.config.agent.store.backend)
            self.loop.run()
            return 0
        finally:
            self.loop.close()
            self.plugins.unconfigure()
            if previous_fd is not None:
                signal.set_wakeup_fd(previous_fd)
            if watch is not None:
                watch.cancel()
            if server is not None:
                server.shutdown()
            self.builder.close()
            if not self.dry_run:  # a start still under way: let the lease run out first
                self.leadership.resign(revoke=not self.loop.actuation.in_flight)
            self.store.close()
            log.info("agent stopped; instances left running")

    def _status(self) -> dict[str, Any]:
        """What /status answers: whether this agent acts, and the scaler's last readings."""
        return {"leading": self.dry_run or self.leadership.is_leader,
                "services": {name: asdict(state)
                             for name, state in self.loop.scaler.live().items()}}

    def _serve(self) -> Any:
        address = self.config.agent.http
        try:
            return serve(address, self.metrics, stale_after=max(3 * self.config.agent.interval, 30),
                         status=self._status)
        except OSError as exc:
            raise ConfigError([f"{self.config.path}: agent.http {address}: cannot listen: "
                               f"{exc.strerror or exc}"]) from None
