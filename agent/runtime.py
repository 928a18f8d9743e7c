"""The running agent: wiring config, plugins, store and loop together.

:class:`Agent` owns the threads: the main loop (passes, reloads, leadership),
the store watch that wakes it, the source polls on their own schedules, and
the HTTP endpoint. SIGTERM and Ctrl-C stop the agent and leave every instance
running; SIGHUP reloads the config (a bad new config is reported and the old
one kept).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import schedule

from agent.config import Config, ConfigError, load_config
from agent.deploys import ACTIVE, DeployError, DeployRunner, request_deploy
from agent.keys import Keys
from agent.kinds import Context, PluginType
from agent.leader import Leadership
from agent.metrics import Metrics, serve
from agent.plugins import PluginError, Plugins, load_plugins
from agent.reconcile import Reconciler, ServiceRuntime, ServiceView
from agent.releases import parse_release
from agent.scaling import Scaler
from agent.store import Store, StoreError, open_store

log = logging.getLogger("shipmate")
QUICK_PASS = 1.0  # seconds to the next pass while instances are starting


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
    """Open the configured store (the embedded path relative to the config file)."""
    settings = config.agent.store
    if settings.backend == "embedded":
        settings = settings.model_copy(update={"path": config.resolve(settings.path)})
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
        name = cfg.strategy if kind == "strategy" else cfg.type
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

    def strategy(self, cfg: Any, name: str | None = None) -> Any:
        """The strategy of a service's ``deploy`` block; ``name`` picks another type
        (with that type's defaults unless the block is of that type)."""
        name = name or (cfg.strategy if cfg is not None else "rolling")
        entry = self.plugins.types["strategy"].get(name)
        if entry is None:
            raise PluginError(f"unknown deploy strategy {name!r}; installed: "
                              f"{', '.join(self.plugins.types['strategy'])}")
        if cfg is None or cfg.strategy != name:
            cfg = entry.model(strategy=name)
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
                source=self.make("source", svc.source, share=False),
                actuator=actuator, announcer=announcer, strategy=self.strategy(svc.deploy))
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
        self.leadership = Leadership(self.store, self.keys.leader)
        context = Context(cluster=self.config.agent.cluster, store=self.store,
                          state_dir=self.config.resolve(self.config.agent.state_dir),
                          wake=lambda: self._wake.set())
        self.builder = Builder(self.plugins, context)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reload = False
        self._polls: dict[str, Future[Any]] = {}
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="source")
        self._next_pass = 0.0
        self.deploys = DeployRunner(store=self.store, keys=self.keys,
                                    emit=self.plugins.call_event, grace=self.config.agent.grace,
                                    strategies=self._strategy,
                                    leading=lambda: self.dry_run or self.leadership.is_leader)
        self._apply_config(self.builder.services(self.config))

    # ---------------------------------------------------------------- wiring
    def _apply_config(self, services: dict[str, ServiceRuntime]) -> None:
        agent = self.config.agent
        self.services = services
        emit = self.plugins.call_event
        self.deploys.emit, self.deploys.grace = emit, agent.grace
        self.reconciler = Reconciler(services=self.services, store=self.store, keys=self.keys,
                                     emit=emit, grace=agent.grace, parallelism=agent.parallelism)
        self.scaler = Scaler(services=self.services, store=self.store, keys=self.keys,
                             emit=emit, dry_run=self.dry_run)
        self.scheduler = schedule.Scheduler()
        for name, runtime in self.services.items():
            self.scheduler.every(runtime.source.config.interval).seconds.do(self._poll, name)

    def reload(self) -> None:
        """Re-read the config and rebuild the services; keep the old ones on any error.

        The main loop calls it only while no deploy runs: a deploy's plugin
        objects must not be closed under it.
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
        self.config, self.plugins = config, plugins
        self._apply_config(services)
        self._poll_all()
        log.info("config reloaded: %d services", len(self.services))

    # ---------------------------------------------------------------- work
    def _poll(self, name: str) -> None:
        if not (self.leadership.is_leader or self.dry_run):
            return
        running = self._polls.get(name)
        if running is None or running.done():
            self._polls[name] = self._pool.submit(self._poll_now, name)

    def _poll_now(self, name: str) -> None:
        try:
            self.scaler.poll(name)
        except StoreError as exc:
            self.metrics.errors.labels("store").inc()
            log.warning("%s: store unreachable, desired count unchanged: %s", name, exc)
        except Exception:
            self.metrics.errors.labels("scaling").inc()
            log.exception("%s: the poll failed; the desired count is unchanged", name)

    def _poll_all(self) -> None:
        for name in self.services:
            self._poll(name)

    def run_pass(self) -> None:
        """One reconcile pass; with the store unreachable it changes nothing.

        A failed pass is retried shortly, never fatal: the agent keeps running
        what runs.
        """
        self._next_pass = time.monotonic() + QUICK_PASS
        try:
            self._pass()
        except StoreError as exc:
            self.metrics.errors.labels("store").inc()
            log.warning("store unreachable, changing nothing: %s", exc)
        except Exception:
            self.metrics.errors.labels("pass").inc()
            log.exception("the pass failed; it is retried shortly")

    def _pass(self) -> None:
        started = time.monotonic()
        views = self.reconciler.observe()
        if self.dry_run:  # nothing was written: plan with the counts the policy decided
            for name, reading in self.scaler.readings.items():
                if reading.decision.count is not None and name in views:
                    views[name].desired = reading.decision.count
        actions = self.reconciler.plan(views)
        if self.dry_run:
            for action in actions:
                log.info("would %s", action)
            errors: list[str] = []
        else:
            errors = self.reconciler.apply(actions)
            stopped = {a.instance.name for a in actions if a.instance is not None}
            errors += self.reconciler.announce(views, stopped)
            errors += self._deploys(views)
        for error in errors + [p for v in views.values() for p in v.problems]:
            self.metrics.errors.labels("pass").inc()
            log.warning("%s", error)
        for name, view in views.items():
            self.metrics.desired.labels(name).set(
                view.effective if view.effective is not None else math.nan)
            unknown = math.nan  # an actuator that could not list: unknown, not zero
            self.metrics.running.labels(name).set(len(view.running) if view.listed else unknown)
            self.metrics.healthy.labels(name).set(len(view.healthy) if view.listed else unknown)
        self.metrics.passes.inc()
        self.metrics.pass_seconds.set(time.monotonic() - started)
        self.metrics.last_pass = time.time()
        settling = any(a.verb == "start" for a in actions) or any(
            len(v.healthy) < len(v.running) or (v.deploy or {}).get("phase") in ACTIVE
            for v in views.values())
        interval = QUICK_PASS if settling else self.config.agent.interval
        self._next_pass = time.monotonic() + interval

    def _strategy(self, service: str, name: str | None) -> Any:
        runtime = self.services[service]
        if name is None or name == runtime.strategy.type_name:
            return runtime.strategy
        return self.builder.strategy(runtime.config.deploy, name)

    def _deploys(self, views: dict[str, ServiceView]) -> list[str]:
        """Run requested deploys; request one where the YAML no longer matches the release."""
        if self.once:  # a deploy needs an agent that stays to finish it
            return []
        errors = []
        for name, view in views.items():
            runtime = self.services[name]
            if not view.listed:
                continue
            if view.deploy is not None:
                self.deploys.launch(runtime, view)
                continue
            release, wanted = parse_release(view.release), runtime.yaml_release
            try:
                if release is None and all(i.version == wanted.version for i in view.running):
                    self.store.create(self.keys.service(name, "release"),
                                      json.dumps(wanted.to_json(by="config")))
                elif release is None or release.spec != wanted.spec:
                    request_deploy(self.store, self.keys, name, image=wanted.image,
                                   by="config", reason="config changed")
                    log.info("%s: the config changed: deploying it", name)
                    self._wake.set()
            except (DeployError, StoreError) as exc:
                errors.append(f"{name}: {exc}")
        return errors

    def _on_watch(self, events: list[Any]) -> None:
        # the scaler's own policy-state writes (one per poll) need no pass
        if all((self.keys.parse(e.key) or ("", ""))[1] == "policy" for e in events):
            return
        self._wake.set()

    # ---------------------------------------------------------------- main loop
    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Reload at the next turn of the loop, or once the running deploys end."""
        if self._deploying():
            log.info("the reload waits for the running deploy to end")
        self._reload = True
        self._wake.set()

    def _deploying(self) -> bool:
        return any(self.deploys.busy(name) for name in self.services)

    def run(self) -> int:
        """Run until stopped (or one pass with ``once``); return the exit code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
            signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        server = watch = None
        try:
            if self.config.agent.http and not self.once:
                server = self._serve()
            watch = self.store.watch(self.keys.services, self._on_watch)
            if self.once:
                return self._run_once()
            self._loop()
            return 0
        finally:
            self.deploys.stop()
            if watch is not None:
                watch.cancel()
            if server is not None:
                server.shutdown()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.builder.close()
            if not self.dry_run:
                self.leadership.resign()
            self.store.close()
            log.info("agent stopped; instances left running")

    def _serve(self) -> Any:
        address = self.config.agent.http
        try:
            return serve(address, self.metrics, stale_after=max(3 * self.config.agent.interval, 30))
        except OSError as exc:
            raise ConfigError([f"{self.config.path}: agent.http {address}: cannot listen: "
                               f"{exc.strerror or exc}"]) from None

    def _run_once(self) -> int:
        if not self.dry_run and not self.leadership.campaign():
            log.error("another agent leads this cluster; --once changes nothing")
            return 1
        for name in self.services:
            self._poll_now(name)
        self.run_pass()
        return 0

    def _loop(self) -> None:
        log.info("agent started: cluster %s, %d services, store %s", self.config.agent.cluster,
                 len(self.services), self.config.agent.store.backend)
        next_campaign = 0.0
        while not self._stop.is_set():
            if self._reload and not self._deploying():
                self._reload = False
                self.reload()
            now = time.monotonic()
            leading = self.dry_run or self.leadership.is_leader
            if not leading and now >= next_campaign:
                next_campaign = now + self.leadership.ttl / 3
                try:
                    leading = self.leadership.campaign()
                except StoreError as exc:
                    log.warning("store unreachable, cannot campaign: %s", exc)
                if leading:
                    self._poll_all()
                    self._next_pass = 0.0
            self.metrics.leader.set(1 if leading else 0)
            if leading:
                self.scheduler.run_pending()
                if self._wake.is_set() or now >= self._next_pass:
                    self._wake.clear()
                    self.run_pass()
            else:
                self.metrics.last_pass = time.time()  # a healthy standby
            timeout = max(0.0, min(self._next_pass - time.monotonic(),
                                   self.scheduler.idle_seconds or 1.0, 1.0))
            self._wake.wait(timeout)
