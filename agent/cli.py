"""The ``shipmate`` command line.

Starting fast is part of the interface: ``shipmate --help`` and ``shipmate scale`` on the
embedded store import neither pydantic nor a plugin nor an etcd client (a test keeps it
so). Each command imports what it uses inside itself; ``console``, ``err`` and ``Table``
stand in for rich's until first used.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent.keys import Keys, parse_object
from agent.store import StoreError, StoreRefused

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table as RichTable

    from agent.plugins import Plugins


# Stand-ins that import on first call: the commands that need them pay for them.
def load_plugins(**options: Any) -> Plugins:
    from agent import plugins

    return plugins.load_plugins(**options)


def file_model(plugins: Plugins) -> Any:
    from agent import config

    return config.file_model(plugins)


def format_duration(seconds: float) -> str:
    from agent import durations

    return durations.format_duration(seconds)


class _LazyConsole:
    """A rich Console made on first use: rich costs ~30 ms to import, plain output none."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not a Console's: copy, pickle and the like probe these
            raise AttributeError(name)
        return getattr(self.get(), name)


console = _LazyConsole(soft_wrap=True)
err = _LazyConsole(stderr=True, soft_wrap=True)


def Table(*args: Any, **kwargs: Any) -> RichTable:  # noqa: N802 - rich's Table, imported late
    from rich.table import Table as RichTable

    return RichTable(*args, **kwargs)


def default_config() -> str:
    return os.environ.get("SHIPMATE_CONFIG") or "etc/agent.yaml"


config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), default=default_config,
    show_default="$SHIPMATE_CONFIG, else etc/agent.yaml", help="the config file")


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(code)


def friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one-line errors and exit 1, without a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            _fail_expected(exc)
            raise

    return wrapper


def _fail_expected(exc: Exception) -> None:
    """Exit 1 with a one-line error for the failures a user can fix; return for the others.
    (Imported here, on the way out, so that a command that fails on none pays nothing.)"""
    from agent.config import ConfigError
    from agent.plugins import PluginError

    if isinstance(exc, ConfigError):
        for line in exc.errors:
            err.print(line, highlight=False, markup=False, soft_wrap=True)
        n = len(exc.errors)
        fail(f"{n} error{'s' if n != 1 else ''} in the config")
    if isinstance(exc, PluginError):
        fail(str(exc))
    if isinstance(exc, StoreRefused):
        fail(f"the store refused us: {exc}")
    if isinstance(exc, StoreError):
        fail(f"store unreachable: {exc}")


def _setup_logging(verbose: int) -> None:
    """Log to stderr: INFO, DEBUG with -v, third-party libraries' debug output too with -vv;
    every configured secret masked (agent.masking)."""
    from agent import masking

    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                            handlers=[RichHandler(console=err.get(), show_path=False)])
    else:
        logging.basicConfig(level=level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    masking.install(verbose)


def _open(config_path: str, *, lenient: bool = False):
    """The config and plugins; ``lenient`` leaves broken plugins out, saying so (status,
    plan, check), where ``run`` and the commands that change things refuse them."""
    from agent.runtime import open_config

    if not Path(config_path).is_file():
        fail(f"config file {config_path} not found (set -c or $SHIPMATE_CONFIG)")
    if not lenient:
        return open_config(config_path)
    plugins = load_plugins(strict=False)
    _report_broken(plugins)
    return open_config(config_path, plugins=plugins)


def _report_broken(plugins) -> None:
    for message in plugins.broken.values():
        err.print(f"[yellow]warning:[/yellow] left out: {message}", highlight=False,
                  markup=True, soft_wrap=True)


# ---------------------------------------------------------------- plugin commands

PLUGIN_COMMANDS = "shipmate.plugin_commands"
"""Where an invocation keeps its plugins' commands (the root context's ``meta``)."""


class ShipmateGroup(click.Group):
    """``shipmate``: the built-in commands, and those of plugins (``shipmate_register_commands``).

    Plugins load only when their commands are needed: for a name that is not a
    built-in command, for shell completion, and in ``shipmate plugins`` and ``check``.
    ``shipmate --help`` lists the built-in commands and points to ``shipmate plugins``
    for the rest: importing every plugin (pydantic, then docker, boto3, datadog...)
    costs several times what the help itself does.
    """

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        return _plugin_commands_of(ctx, quiet=ctx.resilient_parsing).get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        if ctx.resilient_parsing:  # shell completion: the plugins' commands too
            names = sorted({*names, *_plugin_commands_of(ctx, quiet=True)})
        return names


def _plugin_commands_of(ctx: click.Context, quiet: bool = False) -> dict[str, click.Command]:
    """This invocation's plugin commands, loaded on first use; a plugin that fails to load
    is left out with a warning, a command that cannot be added is an error (exit 1)."""
    meta = ctx.find_root().meta
    if PLUGIN_COMMANDS not in meta:
        from agent.plugins import PluginError

        try:
            plugins = load_plugins(strict=False)
        except PluginError as exc:
            if quiet:
                return {}
            fail(str(exc))
        if not quiet:
            _report_broken(plugins)
        found, problems = plugin_commands(plugins, taken=main.commands)
        if problems and not quiet:
            fail("\n".join(problems.values()))
        meta[PLUGIN_COMMANDS] = {name: command for name, (_, command) in found.items()}
    return meta[PLUGIN_COMMANDS]


def plugin_commands(plugins: Plugins, taken: Iterable[str]
                    ) -> tuple[dict[str, tuple[str, click.Command]], dict[str, str]]:
    """Call each plugin's ``shipmate_register_commands`` with a group of its own.

    :param taken: the built-in command names, which no plugin may take.
    :returns: command name -> (plugin, command), and plugin -> what is wrong with its
        commands (a name already taken, or the hook failing); such commands are left out.
    """
    builtin = set(taken)
    found: dict[str, tuple[str, click.Command]] = {}
    problems: dict[str, list[str]] = {}
    for impl in plugins.pm.hook.shipmate_register_commands.get_hookimpls():
        if impl.hookwrapper or impl.wrapper:
            continue  # nothing to wrap: each plugin's commands are collected on their own
        plugin = plugins.pm.get_name(impl.plugin) or repr(impl.plugin)
        group = click.Group(name=plugin)
        offered = {"cli": group}
        try:
            impl.function(**{arg: offered[arg] for arg in impl.argnames})
        except Exception as exc:  # noqa: BLE001 - reported by the plugin's name
            problems.setdefault(plugin, []).append(
                f"shipmate_register_commands() failed: {type(exc).__name__}: {exc}")
            continue
        for name, command in group.commands.items():
            if name in builtin:
                problems.setdefault(plugin, []).append(
                    f"command {name!r} is a built-in command of shipmate; name it otherwise")
            elif name in found:
                problems.setdefault(plugin, []).append(
                    f"command {name!r} is offered by both {found[name][0]!r} and {plugin!r}; "
                    f"block one (SHIPMATE_BLOCK_PLUGINS={plugin})")
            else:
                found[name] = (plugin, command)
    return found, {plugin: f"plugin {plugin!r}: " + "; ".join(why)
                   for plugin, why in problems.items()}


@click.group(cls=ShipmateGroup, epilog="Plugins can add commands: `shipmate plugins` "
             "lists them, and `shipmate COMMAND --help` explains one.")
@click.version_option(package_name="shipmate")
def main() -> None:
    """Shipmate keeps containerized services at the right size, deploys them and
    announces them for discovery."""


@main.command()
@config_option
@click.option("--once", is_flag=True, help="one pass, then exit")
@click.option("--dry-run", is_flag=True, help="log what would change, change nothing")
@click.option("-v", "--verbose", count=True,
              help="-v: debug output; -vv: also the libraries' (secrets stay masked)")
@friendly
def run(config_path: str, once: bool, dry_run: bool, verbose: int) -> None:
    """Run the agent."""
    from agent.pidlock import AgentRunning, acquire
    from agent.runtime import Agent

    _setup_logging(verbose)
    config, _ = _open(config_path)
    _probe_store(config)
    lock = None
    if not dry_run:  # a dry run changes nothing: it may look on beside the agent
        try:
            lock = acquire(config.resolve(config.agent.state_dir) / "agent.pid",
                           config=str(Path(config_path).resolve()), http=config.agent.http)
        except AgentRunning as exc:
            fail(str(exc))
    try:
        code = Agent(config_path, once=once, dry_run=dry_run).run()
    finally:
        if lock is not None:
            lock.release()
    sys.exit(code)


def _probe_store(config: Any) -> None:
    """Read one key before starting: a store that refuses us (TLS, credentials) is a setup
    error, exit 1; a store that is down is waited for by the agent."""
    from agent.runtime import connect

    store = connect(config)
    try:
        store.get(Keys(config.key_prefix).leader)
    except StoreRefused:
        raise
    except StoreError as exc:
        logging.getLogger("agent.cli").warning("store unreachable, waiting for it: %s", exc)
    finally:
        store.close()


@main.command()
@config_option
@friendly
def check(config_path: str) -> None:
    """Validate the config and the plugins; exit 1 listing every error."""
    config, plugins = _open(config_path, lenient=True)
    if plugins.broken:
        n = len(plugins.broken)
        fail(f"{config_path} is valid without {n} broken plugin{'s' if n != 1 else ''} "
             f"({', '.join(plugins.broken)}), but `shipmate run` refuses to start until "
             f"{'they are' if n != 1 else 'it is'} fixed or blocked (SHIPMATE_BLOCK_PLUGINS)")
    _, problems = plugin_commands(plugins, taken=main.commands)
    if problems:
        fail("\n".join(problems.values()))
    console.print(f"{config_path}: ok: cluster {config.agent.cluster}, "
                  f"{len(config.services)} services, {len(plugins.infos)} plugins",
                  highlight=False)
    if config.agent.store.backend == "etcd2":
        err.print("note: the etcd2 backend (v2 API) has no multi-key transactions, so writes "
                  "are not fenced on the leader key: with more than one agent per cluster, "
                  "only each agent's own leadership deadline keeps a deposed agent from "
                  "writing; prefer backend: etcd (v3)", highlight=False)


def _views(config_path: str, *, health: bool = True):
    from agent.kinds import Context
    from agent.reconcile import Reconciler
    from agent.runtime import Builder, connect

    config, plugins = _open(config_path, lenient=True)
    store = connect(config)
    context = Context(cluster=config.agent.cluster, store=store,
                      state_dir=config.resolve(config.agent.state_dir))
    builder = Builder(plugins, context)
    services = builder.services(config)
    keys = Keys(config.key_prefix)
    reconciler = Reconciler(services=services, store=store, keys=keys)
    # orphans are listed by the command itself, not warned about in passing
    quiet = logging.getLogger("shipmate.reconcile")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        views = reconciler.observe(check_health=health)
    finally:
        quiet.setLevel(level)
    return config, store, keys, builder, reconciler, views


@main.command()
@config_option
@friendly
def plan(config_path: str) -> None:
    """Show what one pass would do now, changing nothing."""
    from agent.scaling import Scaler, describe, expiry, last_states, parse_state

    config, store, keys, builder, reconciler, views = _views(config_path)

    try:
        scaler = Scaler(services=reconciler.services, store=store, keys=keys, dry_run=True)
        states, _ = last_states(config.agent.http, list(reconciler.services),
                                lambda name: parse_state(reconciler.entry(name, "policy")))
        for name, runtime in reconciler.services.items():
            view = views[name]
            source = runtime.source
            last = describe(source.type_name, states[name], time.time(), expiry(source))
            decision = scaler.poll(name).decision  # reads the source now, writes nothing
            if decision.count is not None:
                view.desired = decision.count  # plan as the next pass would see it
            console.print(f"[bold]{name}[/bold]: now {decision.reason}", highlight=False,
                          soft_wrap=True)
            console.print(f"  last poll: {last}", highlight=False, soft_wrap=True)
            for problem in view.problems:
                console.print(f"  [yellow]! {problem}[/yellow]", highlight=False)
        actions = reconciler.plan(views)
        for action in actions:
            console.print(f"  would {action}", highlight=False)
        if not actions:
            console.print("nothing to do")
    finally:
        builder.close()
        store.close()


@main.command()
@config_option
@click.argument("service", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def status(config_path: str, service: str | None, as_json: bool) -> None:
    """Per service: desired, override, running, healthy, release and deploy; SERVICE up close."""
    from agent.orphans import announced_keys, candidate_announcers, default_announcer
    from agent.releases import yaml_differs
    from agent.restarts import describe as describe_problem
    from agent.scaling import (
        SourceGroup,
        describe,
        describe_sources,
        expiry,
        last_states,
        parse_state,
        sources_summary,
        summary,
    )

    config, store, keys, builder, reconciler, views = _views(config_path)
    if service is not None:
        _known(config, service)
        views = {service: views[service]}
    try:
        leader = store.get(keys.leader)
        if leader is not None:
            holder = parse_object(leader.value)
            holder = {k: holder.get(k) for k in ("host", "pid", "since", "ttl")}
            holder["lease_left"] = store.lease_left(keys.leader)
        # the same reads as a pass: the services prefix (observe read the policies too)
        # and the announcements' prefix, never one read per service
        states, readings = last_states(config.agent.http, list(views),
                                       lambda name: parse_state(reconciler.entry(name, "policy")))
        wanted = {}
        for name, view in views.items():
            announcer = reconciler.services[name].announcer
            for i in view.instances:
                wanted[i.name] = next(iter(announced_keys(i, [announcer] if announcer else [])),
                                      None)
        orphans, orphan_keys = [], {}
        if reconciler.unowned:
            announcers = candidate_announcers(reconciler.services,
                                              lambda: default_announcer(builder))
            orphan_keys = {i.name: announced_keys(i, announcers)
                           for i in reconciler.unowned.values()}
        present = _present(store, [k for k in wanted.values() if k]
                           + [k for ks in orphan_keys.values() for k in ks])
        announced = {name: key if key in present else None for name, key in wanted.items()}
        if reconciler.unowned:
            for i in sorted(reconciler.unowned.values(), key=lambda i: (i.service, i.slot)):
                keys_now = [k for k in orphan_keys[i.name] if k in present]
                orphans.append({"name": i.name, "service": i.service, "slot": i.slot,
                                "version": i.version, "host": i.host, "port": i.port,
                                "running": i.running, "announced": keys_now})
    finally:
        builder.close()
        store.close()
    rows, now = [], time.time()
    for name, view in views.items():
        reported = view.reported if isinstance(view.reported, dict) else {}
        unhealthy = reported.get("unhealthy") if isinstance(reported.get("unhealthy"),
                                                            dict) else {}
        problems = list(view.problems)
        recorded = reported.get("problems")
        for record in recorded if isinstance(recorded, list) else []:
            text = describe_problem(record, now) if isinstance(record, dict) else str(record)
            if text not in problems:
                problems.append(text)
        loops = {r.get("slot"): r for r in (recorded if isinstance(recorded, list) else [])
                 if isinstance(r, dict) and r.get("kind") == "crash-loop"
                 and isinstance(r.get("slot"), int)}
        held = [{k: r.get(k) for k in ("verb", "slot", "plugin", "reason")}
                for r in (recorded if isinstance(recorded, list) else [])
                if isinstance(r, dict) and r.get("kind") == "held"]
        differs = yaml_differs(view.release, reconciler.services[name].yaml_release)
        if differs:
            problems.append(differs)
        rows.append({
            "service": name, "desired": view.desired, "override": view.override,
            "effective": view.effective,
            "running": len(view.running) if view.listed else None,  # unknown, not zero
            "healthy": len(view.healthy) if view.listed else None,
            "release": view.release, "deploy": view.deploy,
            "instances": [{"name": i.name, "slot": i.slot, "version": i.version,
                           "host": i.host, "port": i.port, "running": i.running,
                           "healthy": i in view.healthy,
                           "unhealthy_for": _since(unhealthy.get(i.name), now)
                           if i not in view.healthy and i.running else None,
                           "kept": not i.running and i.version in view.kept,
                           "announced": announced.get(i.name),
                           "restarts": (loops.get(i.slot) or {}).get("restarts", 0),
                           "last_exit": (loops.get(i.slot) or {}).get("last_exit")}
                          for i in view.instances],
            "problems": problems,
            "held": held,
            "backing_off": [{"slot": slot, "restarts": r.get("restarts", 0),
                             "last_exit": r.get("last_exit")} for slot, r in sorted(
                                 loops.items(), key=lambda item: str(item[0]))
                            if slot not in {i.slot for i in view.instances}],
            "source": reconciler.services[name].source.type_name,
            "policy": summary(states[name], now, expiry(reconciler.services[name].source)),
        })
        group = reconciler.services[name].source
        if isinstance(group, SourceGroup):  # each source's reading, and which one decided
            rows[-1]["sources"] = sources_summary(group, states[name], now)
    if as_json:
        click.echo(json.dumps({"cluster": config.agent.cluster,
                               "leader": holder if leader else None, "readings": readings,
                               "services": rows, "orphans": orphans}, indent=2))
        return
    stored = ("" if readings["from"] == "agent" else
              f"readings as of the last change, from the store: {readings['why']}")
    if service is not None:
        _status_one(rows[0], describe(reconciler.services[service].source.type_name,
                                      states[service], now,
                                      expiry(reconciler.services[service].source)))
        if stored:
            console.print(f"  [dim]{stored}[/dim]", highlight=False, soft_wrap=True)
        return
    table = Table(title=f"cluster {config.agent.cluster}")
    for column in ("service", "desired", "override", "running", "healthy", "release", "deploy"):
        table.add_column(column)
    for row in rows:
        release = row["release"] or {}
        deploy = row["deploy"]
        table.add_row(row["service"], _n(row["desired"]), _n(row["override"]),
                      _n(row["running"], "?"), _n(row["healthy"], "?"),
                      str(release.get("image") or release.get("version") or "-"),
                      _deploy_word(deploy))
    console.print(table)
    if leader:
        since = holder.get("since")
        left = holder.get("lease_left")
        console.print(
            f"leader: {holder.get('host')} pid {holder.get('pid')}"
            + (f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
               if isinstance(since, int | float) and not isinstance(since, bool)
               and 0 < since < 1e11 else "")
            + (f", lease ends in {format_duration(left)}" if isinstance(left, float) else ""),
            highlight=False)
    if not leader:
        console.print("[yellow]no agent is acting for this cluster[/yellow]")
    if stored:
        console.print(f"[dim]{stored}[/dim]", highlight=False, soft_wrap=True)
    for name, runtime in reconciler.services.items():
        line = describe(runtime.source.type_name, states[name], now, expiry(runtime.source))
        console.print(f"{name}: {line}", highlight=False, soft_wrap=True)
        if isinstance(runtime.source, SourceGroup):
            for one in describe_sources(runtime.source, states[name], now):
                console.print(f"  {one}", highlight=False, soft_wrap=True)
    for row in rows:
        for problem in row["problems"]:
            console.print(f"[yellow]{row['service']}: {problem}[/yellow]", highlight=False)
        for instance in row["instances"]:
            if instance["unhealthy_for"] is not None:
                console.print(f"[yellow]{row['service']}: {instance['name']} unhealthy for "
                              f"{format_duration(instance['unhealthy_for'])}[/yellow]",
                              highlight=False)

    for orphan in orphans:
        state = "running" if orphan["running"] else "dead"
        where = ", ".join(orphan["announced"]) or "not announced"
        console.print(f"[yellow]orphan: {orphan['name']} (service {orphan['service']!r} is no "
                      f"longer in the config; {state}, {where}): `shipmate prune` stops it"
                      "[/yellow]", highlight=False)


def _since(when: Any, now: float) -> float | None:
    """Seconds since a wall-clock time recorded by the agent (None if it recorded none)."""
    if isinstance(when, int | float) and not isinstance(when, bool) and when == when:
        return round(max(0.0, now - when), 1)
    return None


def _deploy_word(deploy: dict[str, Any] | None) -> str:
    """A deploy's phase, with a failed or paused one's reason in a word or two."""
    if not deploy:
        return "-"
    phase = str(deploy.get("phase", "?"))
    if "invalid" in deploy:
        return "unreadable"
    error = str(deploy.get("error") or "")
    if phase not in ("failed", "paused", "rolling-back") or not error:
        return phase
    words = (("rollback failed", "rollback failed"), ("not healthy", "unhealthy"),
             ("stopped passing", "unhealthy"), ("exited", "exited"), ("aborted", "aborted"),
             ("cannot run strategy", "bad strategy"), ("no release", "no such release"))
    word = next((short for needle, short in words if needle in error),
                " ".join(error.split()[:2]))
    return f"{phase}: {word}"


def _status_one(row: dict[str, Any], source_line: str) -> None:
    """``shipmate status SERVICE``: the service up close."""
    name, release = row["service"], row["release"] or {}
    console.print(f"[bold]{name}[/bold]: desired {_n(row['desired'])}, override "
                  f"{_n(row['override'])}, running {_n(row['running'], '?')}, healthy "
                  f"{_n(row['healthy'], '?')}", highlight=False)
    if release:
        when = release.get("when")
        console.print(f"  release: {release.get('image') or '-'} version "
                      f"{release.get('version', '?')} on port {release.get('port')}, by "
                      f"{release.get('by', '?')}"
                      + (f", {_ago(when)}" if isinstance(when, (int, float)) else ""),
                      highlight=False)
    console.print(f"  source: {source_line}", highlight=False, soft_wrap=True)
    deploy = row["deploy"]
    if deploy:
        got = deploy.get("progress") or {}
        console.print(f"  deploy {deploy.get('id', '?')}: {deploy.get('phase', '?')}"
                      + (f", {got.get('note')}" if got.get("note") else "")
                      + (f" ({(deploy.get('from') or {}).get('version')} -> "
                         f"{(deploy.get('to') or {}).get('version')})" if deploy.get("to")
                         else ""), highlight=False)
        if deploy.get("error"):
            console.print(f"  deploy error: {deploy['error']}", highlight=False)
    table = Table()
    for column in ("slot", "version", "address", "health", "announced", "restarts",
                   "last exit", "instance"):
        table.add_column(column)
    for i in sorted(row["instances"], key=lambda i: (i["slot"], i["version"])):
        health = ("healthy" if i["healthy"] else "unhealthy") if i["running"] else (
            "kept (stopped)" if i["kept"] else "exited")
        if i.get("unhealthy_for") is not None:
            health += f" for {format_duration(i['unhealthy_for'])}"
        table.add_row(str(i["slot"]), i["version"], f"{i['host']}:{_n(i['port'])}", health,
                      i["announced"] or "-", str(i.get("restarts") or 0),
                      i.get("last_exit") or "-", i["name"])
    for slot in row.get("backing_off", []):  # a crash-looping slot waiting for its next start
        table.add_row(str(slot["slot"]), "-", "-", "backing off", "-", str(slot["restarts"]),
                      slot["last_exit"] or "-", "-")
    console.print(table)
    for problem in row["problems"]:
        console.print(f"[yellow]! {problem}[/yellow]", highlight=False)


def _ago(when: float) -> str:
    return f"{format_duration(max(0.0, time.time() - when))} ago"


def _present(store, wanted: list[str]) -> set[str]:
    """Which of ``wanted`` exist: one prefix read of what they share (a per-key read each
    only when they share no directory)."""
    if not wanted:
        return set()
    common = os.path.commonprefix(wanted)
    common = common[:common.rfind("/") + 1]
    if len(common) > 1:
        found = store.get_prefix(common)
        return {key for key in wanted if key in found}
    return {key for key in wanted if store.get(key) is not None}


def _known(config, service: str) -> None:
    if service not in config.services:
        from agent.counted import listed

        fail(f"unknown service {service!r}; known: {listed(config.services, 'service')}")


def _n(value: int | None, missing: str = "-") -> str:
    return missing if value is None else str(value)


@main.command(context_settings={"ignore_unknown_options": True})  # let -1 reach IntRange
@config_option
@click.argument("service")
@click.argument("count", type=click.IntRange(min=0), required=False)
@click.option("--auto", is_flag=True, help="clear the override: the source decides again")
@click.option("--force", is_flag=True, help="allow a count outside policy.min/policy.max")
@friendly
def scale(config_path: str, service: str, count: int | None, auto: bool, force: bool) -> None:
    """Set (or with --auto clear) a service's override count.

    A count outside the service's policy.min and policy.max is refused unless
    --force is given; the agent never runs more than agent.max_instances.
    """
    if (count is None) == (not auto):
        fail("give either a COUNT or --auto")
    low, high, ceiling, prefix, open_store = _scale_settings(config_path, service)
    if count is not None and not force:
        if high is not None and count > high:
            fail(f"{service}: {count} is above its policy.max ({high}); "
                 "use --force to set it anyway")
        if count < low:
            fail(f"{service}: {count} is below its policy.min ({low}); "
                 "use --force to set it anyway")
    if count is not None and count > ceiling:
        err.print(f"[yellow]{service}: the agent runs at most agent.max_instances "
                  f"({ceiling}) instances of a service[/yellow]", highlight=False)
    store = open_store()
    key = Keys(prefix).service(service, "override")
    try:
        if auto:
            store.delete(key)
            click.echo(f"{service}: override cleared, the source decides")
        else:
            store.put(key, str(count))
            click.echo(f"{service}: override set to {count}")
    finally:
        store.close()


def _scale_settings(config_path: str, service: str):
    """(policy.min, policy.max, agent.max_instances, key prefix, a store opener) of SERVICE:
    on the embedded store read quickly (agent.quickconfig), else from the whole config."""
    from agent.quickconfig import read_quick

    quick = read_quick(config_path)
    if quick is not None:
        _known(quick, service)
        low, high = quick.services[service]
        return low, high, quick.max_instances, quick.key_prefix, quick.open_store
    from agent.runtime import connect

    config, _ = _open(config_path)
    _known(config, service)
    policy = config.services[service].policy
    return (policy.min, policy.max, config.agent.max_instances, config.key_prefix,
            lambda: connect(config))


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def plugins_cmd(as_json: bool) -> None:
    """List every loaded plugin with its distribution, version, types and hooks."""
    plugins = load_plugins(strict=False)
    infos = list(plugins.infos.values())
    found, problems = plugin_commands(plugins, taken=main.commands)
    commands: dict[str, list[str]] = {}
    for name, (plugin, _) in sorted(found.items()):
        commands.setdefault(plugin, []).append(name)
    if as_json:
        click.echo(json.dumps([{"name": i.name, "distribution": i.distribution,
                                "version": i.version, "module": i.module,
                                "kinds": sorted(i.types), "types": i.types,
                                "hooks": i.hooks, "commands": commands.get(i.name, []),
                                **({"error": problems[i.name]} if i.name in problems else {})}
                               for i in infos]
                              + [{"name": name, "broken": why}
                                 for name, why in plugins.broken.items()], indent=2))
        return
    table = Table()
    for column in ("plugin", "distribution", "version", "types", "hooks"):
        table.add_column(column)
    for info in infos:
        types = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.types.items())
        if info.name in commands:
            types += ("; " if types else "") + f"commands: {', '.join(commands[info.name])}"
        hooks = ", ".join(h.removeprefix("shipmate_") for h in info.hooks
                          if not h.endswith("_types"))
        table.add_row(info.name, info.distribution, info.version, types or "-", hooks or "-")
    console.print(table)
    blocked = [name for name, plugin in plugins.pm.list_name_plugin() if plugin is None]
    if blocked:
        console.print(f"blocked: {', '.join(blocked)}")
    for name, why in plugins.broken.items():
        console.print(f"[red]broken[/red]: {name}: {why}", highlight=False)
    for why in problems.values():
        console.print(f"[red]error[/red]: {why}", highlight=False)


@main.command()
@friendly
def schema() -> None:
    """Print the JSON Schema of the config file, plugin types included."""
    plugins = load_plugins()
    click.echo(json.dumps(file_model(plugins).model_json_schema(), indent=2))



def _follow(store, keys: Keys, service: str, deploy_id: str, timeout: float,
            expect: str = "finished") -> None:
    """Show a deploy's progress from its journal until it ends; exit 1 unless it ended as
    ``expect`` (``finished``; an abort expects ``rolled-back``)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deploy_key, release_key = keys.service(service, "deploy"), keys.service(service, "release")
    started = time.monotonic()
    deadline = started + timeout
    warned = False
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[note]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=err.get(), transient=True) as progress:
        task = progress.add_task(f"deploy {service}", total=None, note="requested")
        while True:
            entry = store.get(deploy_key)
            journal = parse_object(entry.value) if entry else None
            if journal is None or journal.get("id") != deploy_id:
                break
            phase = journal.get("phase")
            got = journal.get("progress") or {}
            progress.update(task, total=got.get("total") or None, completed=got.get("done", 0),
                            note=f"{phase}: {got.get('note', '')}")
            if phase in ("paused", "failed"):
                progress.stop()
                fail(f"deploy of {service} {phase}: {journal.get('error')}")
            if phase == "requested" and not warned and time.monotonic() > started + 15:
                warned = True
                progress.console.print("[yellow]no agent has picked the deploy up yet; "
                                       "is `shipmate run` running?[/yellow]")
            if time.monotonic() > deadline:
                progress.stop()
                fail(f"gave up following after {timeout:g}s; the deploy goes on "
                     "(`shipmate status`)")
            time.sleep(0.3)
    entry = store.get(release_key)
    release = parse_object(entry.value) if entry else {}
    outcome = release.get("deploy") or {}
    if outcome.get("id") != deploy_id:
        fail(f"the deploy of {service} ended but left no outcome; see `shipmate status`")
    if outcome.get("result") != expect:
        result = "rolled back" if outcome.get("result") == "rolled-back" else outcome.get("result")
        fail(f"deploy of {service} {result}: {outcome.get('reason')}")
    if expect == "rolled-back":
        console.print(f"{service}: deploy {deploy_id} rolled back to "
                      f"{release.get('image') or release.get('version')}", highlight=False)
        return
    label = release.get("image") or release.get("version")
    console.print(f"{service}: deployed {label}"
                  + (f" ({outcome['reason']})" if outcome.get("reason") else ""), highlight=False)


def _request(config_path: str, service: str, image: str | None, port: int | None,
             strategy: str | None, reason: str, wait: bool, timeout: float,
             restore: str | None = None) -> None:
    from agent.deploys import request_deploy
    from agent.runtime import connect

    config, plugins = _open(config_path)
    _known(config, service)
    if strategy is not None and strategy not in plugins.types["strategy"]:
        fail(f"unknown strategy {strategy!r}; installed: "
             f"{', '.join(plugins.types['strategy'])}")
    block = config.services[service].deploy
    if strategy is not None and (block is None or block.type != strategy):
        from pydantic import ValidationError

        try:  # another strategy than the service's runs with its defaults: are there any?
            plugins.types["strategy"][strategy].model(type=strategy)
        except ValidationError as exc:
            keys = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
            fail(f"strategy {strategy} needs settings ({keys}): give {service} a "
                 f"`deploy: {{type: {strategy}, ...}}` block in the config")
    store = connect(config)
    keys = Keys(config.key_prefix)
    try:
        journal = request_deploy(store, keys, service, image=image, port=port,
                                 strategy=strategy, by=_who(), reason=reason, restore=restore)
        console.print(f"{service}: deploy {journal['id']} requested", highlight=False)
        if wait:
            _follow(store, keys, service, journal["id"], timeout)
    finally:
        store.close()


def _who() -> str:
    import getpass
    import socket

    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no user name in some containers
        return socket.gethostname()


wait_options = [
    click.option("--no-wait", is_flag=True, help="request it and return at once"),
    click.option("--timeout", type=float, default=3600, show_default=True,
                 help="seconds to follow the deploy"),
]


def _with(options):
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@main.command()
@config_option
@click.argument("service")
@click.option("--image", required=True, help="the image (or release) to deploy")
@click.option("--strategy", help="override the service's deploy strategy")
@_with(wait_options)
@friendly
def deploy(config_path: str, service: str, image: str, strategy: str | None, no_wait: bool,
           timeout: float) -> None:
    """Deploy IMAGE to SERVICE and follow it; exit 1 if it fails or rolls back."""
    from agent.deploys import DeployError

    try:
        _request(config_path, service, image, None, strategy, "deploy", not no_wait, timeout)
    except DeployError as exc:
        fail(str(exc))


@main.command()
@config_option
@click.argument("service")
@click.option("--to", "version", help="the version to bring back (default: the previous "
              "release; see `shipmate history`)")
@_with(wait_options)
@friendly
def rollback(config_path: str, service: str, version: str | None, no_wait: bool,
             timeout: float) -> None:
    """Bring back the release SERVICE ran before (or VERSION): its image, command, env and port."""
    from agent.deploys import DeployError
    from agent.history import find_release
    from agent.runtime import connect

    config, _ = _open(config_path)
    _known(config, service)
    store = connect(config)
    keys = Keys(config.key_prefix)
    try:
        stuck = store.get(keys.service(service, "deploy"))
        journal = parse_object(stuck.value) if stuck else {}
        if journal.get("phase") in ("paused", "failed"):  # finish it backwards
            if not store.replace(stuck.key, json.dumps({**journal, "phase": "rolling-back"}),
                                 stuck.revision):
                fail(f"the deploy of {service} changed meanwhile; see `shipmate status`")
            console.print(f"{service}: rolling back deploy {journal['id']}", highlight=False)
            if not no_wait:
                _follow(store, keys, service, journal["id"], timeout, expect="rolled-back")
            return
        entry = store.get(keys.service(service, "release"))
        current = parse_object(entry.value) if entry else {}
        target = find_release(store, keys, service, version)
    finally:
        store.close()
    if target is None:
        fail(f"{service} has no {'release ' + version if version else 'earlier release'} "
             f"recorded to roll back to (see `shipmate history {service}`)")
    if target.get("version") == current.get("version"):
        fail(f"{service} already runs {target.get('version')}")
    console.print(f"{service}: rolling back to {target.get('image') or 'version'} "
                  f"{target.get('version')}", highlight=False)
    try:
        _request(config_path, service, None, None, None, "rollback", not no_wait, timeout,
                 restore=str(target["version"]))
    except DeployError as exc:
        fail(str(exc))


@main.command()
@config_option
@click.argument("service")
@_with(wait_options)
@friendly
def abort(config_path: str, service: str, no_wait: bool, timeout: float) -> None:
    """Stop SERVICE's deploy where it is and roll it back; clear a failed or unreadable one.

    Every write is a compare-and-set on the journal as read, so an abort never
    overwrites what the acting agent wrote meanwhile.
    """
    from agent.runtime import connect

    config, _ = _open(config_path)
    _known(config, service)
    store = connect(config)
    keys = Keys(config.key_prefix)
    try:
        for _ in range(5):  # the acting agent may write the journal between read and write
            entry = store.get(keys.service(service, "deploy"))
            if entry is None:
                fail(f"no deploy of {service} is in progress")
            journal = parse_object(entry.value)
            phase = journal.get("phase")
            readable = "id" in journal and phase in (
                "requested", "running", "paused", "rolling-back", "failed", "finished",
                "rolled-back")
            if not readable or phase in ("failed", "requested"):
                if store.delete(entry.key, entry.revision):
                    what = ("cancelled the requested deploy" if phase == "requested" and readable
                            else f"cleared the {'failed' if readable else 'unreadable'} "
                            "deploy journal")
                    console.print(f"{service}: {what}; a new deploy can start"
                                  + (f" (it said: {journal['error']})" if journal.get("error")
                                     else ""), highlight=False)
                    return
                continue
            if phase in ("finished", "rolled-back"):
                console.print(f"{service}: the deploy is ending ({phase}); nothing to abort",
                              highlight=False)
                return
            if phase in ("running", "paused"):
                versions = [v for v in ((journal.get("from") or {}).get("version"),
                                        (journal.get("to") or {}).get("version")) if v]
                aborted = {**journal, "phase": "rolling-back",
                           "error": f"aborted by {_who()}", "announce": versions}
                if not store.replace(entry.key, json.dumps(aborted), entry.revision):
                    continue
                console.print(f"{service}: deploy {journal['id']} aborted; rolling back",
                              highlight=False)
            else:
                console.print(f"{service}: deploy {journal['id']} is already rolling back",
                              highlight=False)
            if not no_wait:
                _follow(store, keys, service, journal["id"], timeout, expect="rolled-back")
            return
        fail(f"the deploy journal of {service} kept changing; try again")
    finally:
        store.close()


@main.command()
@config_option
@click.argument("service")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def history(config_path: str, service: str, as_json: bool) -> None:
    """The last releases and scaling decisions of SERVICE, newest first."""
    from agent.history import read_history
    from agent.runtime import connect

    config, _ = _open(config_path)
    _known(config, service)
    store = connect(config)
    try:
        got = read_history(store, Keys(config.key_prefix), service)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps({"service": service, **got}, indent=2))
        return
    table = Table(title=f"{service}: releases")
    for column in ("when", "version", "image", "changed", "by", "agent", "outcome"):
        table.add_column(column)
    for item in reversed(got["releases"]):
        outcome = str(item.get("result") or "?")
        if item.get("reason") and outcome != "recorded":
            outcome += f": {item['reason']}"
        table.add_row(_when(item.get("when")), str(item.get("version", "?")),
                      str(item.get("image") or "-"), str(item.get("changed", "")),
                      str(item.get("by") or "-"), str(item.get("agent") or "-"), outcome)
    console.print(table)
    if not got["releases"]:
        console.print("no releases recorded yet")
    if got["scaling"]:
        table = Table(title=f"{service}: scaling")
        for column in ("when", "count", "reason"):
            table.add_column(column)
        for item in reversed(got["scaling"]):
            table.add_row(_when(item.get("when")), f"{_n(item.get('from'))} -> "
                          f"{_n(item.get('to'))}", str(item.get("reason", "")))
        console.print(table)


def _when(when: Any) -> str:
    if not isinstance(when, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


@main.command()
@config_option
@click.argument("service", required=False)
@click.option("--yes", is_flag=True, help="stop them without asking")
@friendly
def prune(config_path: str, service: str | None, yes: bool) -> None:
    """Stop the instances of services no longer in the config (withdrawn first)."""
    from agent import orphans

    config, store, keys, builder, reconciler, views = _views(config_path, health=False)
    try:
        if service is not None and service in config.services:
            fail(f"{service} is in the config: `shipmate scale {service} 0` stops its instances")
        actuators = [rt.actuator for rt in reconciler.services.values()]
        found = orphans.find_orphans(actuators, config.services, service)
        if not found:
            console.print("no orphans" + (f" of service {service!r}" if service else ""))
            return
        for orphan in found:
            i = orphan.instance
            console.print(f"orphan: {i.name} (service {i.service!r}, "
                          f"{'running' if i.running else 'dead'}, {i.host}:{_n(i.port)})",
                          highlight=False)
        if not yes and not click.confirm(f"stop these {len(found)} instances?"):
            fail("nothing stopped")
        announcers = orphans.candidate_announcers(
            reconciler.services, lambda: orphans.default_announcer(builder))
        failed = 0
        for orphan in found:
            try:
                orphans.stop(orphan, announcers, config.agent.grace)
                console.print(f"stopped {orphan.instance.name}", highlight=False)
            except Exception as exc:  # noqa: BLE001 - say which, go on with the others
                failed += 1
                err.print(f"cannot stop {orphan.instance.name}: {exc}", highlight=False)
        if failed:
            fail(f"{failed} of {len(found)} orphans not stopped")
    finally:
        builder.close()
        store.close()


# ---------------------------------------------------------------- the store


@main.group("store")
def store_cmd() -> None:
    """The store from the CLI, on every backend.

    A KEY without a leading / is relative to the cluster's keys
    (``<prefix>/<cluster>/``); with a leading / it is absolute (announcements).
    """


def _store_key(config, key: str) -> str:
    if not key:
        fail("give a key")
    return key if key.startswith("/") else f"{config.key_prefix}/{key}"


def _open_store(config_path: str):
    """(the config, its store): on the embedded store without loading the whole config."""
    from agent.quickconfig import read_quick

    quick = read_quick(config_path)
    if quick is not None:
        return quick, quick.open_store()
    from agent.runtime import connect

    config, _ = _open(config_path)
    return config, connect(config)


prefix_option = click.option("--prefix", is_flag=True, help="every key that starts with KEY")


@store_cmd.command("get")
@config_option
@prefix_option
@click.argument("key")
@friendly
def store_get(config_path: str, prefix: bool, key: str) -> None:
    """Print KEY's value (with --prefix: each key and its value)."""
    config, store = _open_store(config_path)
    try:
        full = _store_key(config, key)
        if prefix:
            for name, entry in sorted(store.get_prefix(full).items()):
                click.echo(f"{name}\t{entry.value}")
            return
        entry = store.get(full)
    finally:
        store.close()
    if entry is None:
        fail(f"no key {full}")
    click.echo(entry.value)


@store_cmd.command("put")
@config_option
@click.argument("key")
@click.argument("value")
@friendly
def store_put(config_path: str, key: str, value: str) -> None:
    """Write VALUE at KEY."""
    config, store = _open_store(config_path)
    try:
        full = _store_key(config, key)
        store.put(full, value)
    finally:
        store.close()
    click.echo(f"{full} = {value}")


@store_cmd.command("del")
@config_option
@prefix_option
@click.argument("key")
@friendly
def store_del(config_path: str, prefix: bool, key: str) -> None:
    """Delete KEY (with --prefix: every key under it)."""
    config, store = _open_store(config_path)
    try:
        full = _store_key(config, key)
        names = sorted(store.get_prefix(full)) if prefix else [full]
        gone = [name for name in names if store.delete(name)]
    finally:
        store.close()
    if not gone and not prefix:
        fail(f"no key {full}")
    for name in gone:
        click.echo(f"deleted {name}")
    if prefix and not gone:
        click.echo(f"no keys under {full}")


@store_cmd.command("watch")
@config_option
@prefix_option
@click.argument("key")
@friendly
def store_watch(config_path: str, prefix: bool, key: str) -> None:
    """Print each change of KEY (with --prefix: of every key under it) until Ctrl-C."""
    import threading

    config, store = _open_store(config_path)
    full = _store_key(config, key)
    stop = threading.Event()

    def show(events) -> None:
        for event in events:
            if not prefix and event.key != full:
                continue
            if event.value is None:
                click.echo(f"DELETE {event.key}")
            else:
                click.echo(f"PUT {event.key} {event.value}")
            sys.stdout.flush()

    watch = store.watch(full, show)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        watch.cancel()
        store.close()


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    from agent.durations import parse_duration

    try:
        return None if value is None else parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@config_option
@click.argument("service")
@click.option("--readings", type=click.Path(dir_okay=False),
              help="CSV of time,value (or time,name,value for several sources)")
@click.option("--since", callback=_duration, help="replay the sources' own history (7d)")
@click.option("--step", callback=_duration, help="time between decisions (default: the "
                                                 "source's interval)")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="try a change, like policy.max_step=2 (repeatable)")
@click.option("--compare", type=click.Path(dir_okay=False), help="another config: its "
                                                                  "policy side by side")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="write a PNG of the readings and the count (needs shipmate[plot])")
@friendly
def simulate(config_path: str, service: str, readings: str | None, since: float | None,
             step: float | None, settings: tuple[str, ...], compare: str | None,
             as_json: bool, plot_path: str | None) -> None:
    """Replay SERVICE's policy over past readings and summarise what it would have done."""
    from agent import simulate as sim

    if not Path(config_path).is_file():
        fail(f"config file {config_path} not found (set -c or $SHIPMATE_CONFIG)")
    try:
        results = sim.run(config_path, service, readings=readings, since=since, step=step,
                          settings=settings, compare=compare)
        if plot_path:
            sim.plot(results, plot_path)
    except sim.SimulateError as exc:
        fail(str(exc))
    summaries = {label: result.summary() for label, result in results.items()}
    first = next(iter(summaries))
    if as_json:
        others = {k: v for k, v in summaries.items() if k != first}
        click.echo(json.dumps({**summaries[first], "config": first,
                               **({"compared": others} if others else {})}, indent=2))
        return
    table = Table(title=f"{service}: replay of {summaries[first]['decisions']} decisions")
    table.add_column("")
    for label in summaries:
        table.add_column(label)
    for key, what in (("actions_up", "scale-ups"), ("actions_down", "scale-downs"),
                      ("largest_step", "largest step"), ("min", "min count"),
                      ("max", "max count"), ("mean", "mean count"),
                      ("instance_hours", "instance-hours"),
                      ("under_provisioned_minutes", "minutes under-provisioned")):
        table.add_row(what, *(_num(s[key]) for s in summaries.values()))
    console.print(table)
    console.print(sim.chart(results[first]), highlight=False, markup=False)
    if plot_path:
        console.print(f"plot written to {plot_path}", highlight=False)


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, int) else f"{value:.2f}".rstrip("0").rstrip(".")
