"""The ``shipmate`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from agent.config import ConfigError, file_model
from agent.durations import format_duration
from agent.keys import Keys, parse_object
from agent.plugins import PluginError, load_plugins
from agent.store import StoreError

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


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
        except ConfigError as exc:
            for line in exc.errors:
                err.print(line, highlight=False, markup=False, soft_wrap=True)
            n = len(exc.errors)
            fail(f"{n} error{'s' if n != 1 else ''} in the config")
        except PluginError as exc:
            fail(str(exc))
        except StoreError as exc:
            fail(f"store unreachable: {exc}")

    return wrapper


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                            handlers=[RichHandler(console=err, show_path=False)])
    else:
        logging.basicConfig(level=level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _open(config_path: str):
    from agent.runtime import open_config

    if not Path(config_path).is_file():
        fail(f"config file {config_path} not found (set -c or $SHIPMATE_CONFIG)")
    return open_config(config_path)


@click.group()
@click.version_option(package_name="shipmate")
def main() -> None:
    """Shipmate keeps containerized services at the right size, deploys them and
    announces them for discovery."""


@main.command()
@config_option
@click.option("--once", is_flag=True, help="one pass, then exit")
@click.option("--dry-run", is_flag=True, help="log what would change, change nothing")
@click.option("-v", "--verbose", is_flag=True)
@friendly
def run(config_path: str, once: bool, dry_run: bool, verbose: bool) -> None:
    """Run the agent."""
    from agent.runtime import Agent

    _setup_logging(verbose)
    _open(config_path)
    sys.exit(Agent(config_path, once=once, dry_run=dry_run).run())


@main.command()
@config_option
@friendly
def check(config_path: str) -> None:
    """Validate the config and the plugins; exit 1 listing every error."""
    config, plugins = _open(config_path)
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

    config, plugins = _open(config_path)
    store = connect(config)
    context = Context(cluster=config.agent.cluster, store=store,
                      state_dir=config.resolve(config.agent.state_dir))
    builder = Builder(plugins, context)
    services = builder.services(config)
    keys = Keys(config.key_prefix)
    reconciler = Reconciler(services=services, store=store, keys=keys)
    views = reconciler.observe(check_health=health)
    return config, store, keys, builder, reconciler, views


@main.command()
@config_option
@friendly
def plan(config_path: str) -> None:
    """Show what one pass would do now, changing nothing."""
    from agent.scaling import Scaler, describe, expiry, read_state

    config, store, keys, builder, reconciler, views = _views(config_path)

    try:
        scaler = Scaler(services=reconciler.services, store=store, keys=keys, dry_run=True)
        for name, runtime in reconciler.services.items():
            view = views[name]
            source = runtime.source
            last = describe(source.type_name, read_state(store, keys, name), time.time(),
                            expiry(source))
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
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def status(config_path: str, as_json: bool) -> None:
    """Per service: desired, override, running, healthy, release and deploy."""
    from agent.restarts import describe as describe_problem
    from agent.scaling import describe, expiry, read_state, summary

    config, store, keys, builder, reconciler, views = _views(config_path)
    try:
        leader = store.get(keys.leader)
        if leader is not None:
            holder = parse_object(leader.value)
            holder = {k: holder.get(k) for k in ("host", "pid", "since", "ttl")}
            holder["lease_left"] = store.lease_left(keys.leader)
        states = {name: read_state(store, keys, name) for name in views}
    finally:
        builder.close()
        store.close()
    rows, now = [], time.time()
    for name, view in views.items():
        reported = view.reported if isinstance(view.reported, dict) else {}
        unhealthy = reported.get("unhealthy") if isinstance(reported.get("unhealthy"),
                                                            dict) else {}
        problems = list(view.problems)
        for record in reported.get("problems") or []:
            text = describe_problem(record, now) if isinstance(record, dict) else str(record)
            if text not in problems:
                problems.append(text)
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
                           "kept": not i.running and i.version in view.kept}
                          for i in view.instances],
            "problems": problems,
            "source": reconciler.services[name].source.type_name,
            "policy": summary(states[name], now, expiry(reconciler.services[name].source)),
        })
    if as_json:
        click.echo(json.dumps({"cluster": config.agent.cluster,
                               "leader": holder if leader else None,
                               "services": rows}, indent=2))
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
                      f"{deploy.get('phase', '?')}" if deploy else "-")
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
    for name, runtime in reconciler.services.items():
        line = describe(runtime.source.type_name, states[name], now, expiry(runtime.source))
        console.print(f"{name}: {line}", highlight=False, soft_wrap=True)
    for row in rows:
        for problem in row["problems"]:
            console.print(f"[yellow]{row['service']}: {problem}[/yellow]", highlight=False)
        for instance in row["instances"]:
            if instance["unhealthy_for"] is not None:
                console.print(f"[yellow]{row['service']}: {instance['name']} unhealthy for "
                              f"{format_duration(instance['unhealthy_for'])}[/yellow]",
                              highlight=False)


def _since(when: Any, now: float) -> float | None:
    """Seconds since a wall-clock time recorded by the agent (None if it recorded none)."""
    if isinstance(when, int | float) and not isinstance(when, bool) and when == when:
        return round(max(0.0, now - when), 1)
    return None


def _known(config, service: str) -> None:
    if service not in config.services:
        fail(f"unknown service {service!r}; known: {', '.join(sorted(config.services))}")


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
    from agent.runtime import connect

    if (count is None) == (not auto):
        fail("give either a COUNT or --auto")
    config, _ = _open(config_path)
    _known(config, service)
    policy = config.services[service].policy
    if count is not None and not force:
        if policy.max is not None and count > policy.max:
            fail(f"{service}: {count} is above its policy.max ({policy.max}); "
                 "use --force to set it anyway")
        if count < policy.min:
            fail(f"{service}: {count} is below its policy.min ({policy.min}); "
                 "use --force to set it anyway")
    ceiling = config.agent.max_instances
    if count is not None and count > ceiling:
        err.print(f"[yellow]{service}: the agent runs at most agent.max_instances "
                  f"({ceiling}) instances of a service[/yellow]", highlight=False)
    store = connect(config)
    key = Keys(config.key_prefix).service(service, "override")
    try:
        if auto:
            store.delete(key)
            console.print(f"{service}: override cleared, the source decides", highlight=False)
        else:
            store.put(key, str(count))
            console.print(f"{service}: override set to {count}", highlight=False)
    finally:
        store.close()


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly
def plugins_cmd(as_json: bool) -> None:
    """List every loaded plugin with its distribution, version, kinds and types."""
    plugins = load_plugins()
    infos = list(plugins.infos.values())
    if as_json:
        click.echo(json.dumps([{"name": i.name, "distribution": i.distribution,
                                "version": i.version, "module": i.module,
                                "kinds": sorted(i.types), "types": i.types} for i in infos],
                              indent=2))
        return
    table = Table()
    for column in ("plugin", "distribution", "version", "types"):
        table.add_column(column)
    for info in infos:
        types = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.types.items())
        table.add_row(info.name, info.distribution, info.version, types or "(events only)")
    console.print(table)
    blocked = [name for name, plugin in plugins.pm.list_name_plugin() if plugin is None]
    if blocked:
        console.print(f"blocked: {', '.join(blocked)}")


@main.command()
@friendly
def schema() -> None:
    """Print the JSON Schema of the config file, plugin types included."""
    plugins = load_plugins()
    click.echo(json.dumps(file_model(plugins).model_json_schema(), indent=2))



def _follow(store, keys: Keys, service: str, deploy_id: str, timeout: float) -> None:
    """Show a deploy's progress from its journal until it ends; exit 1 unless it finished."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deploy_key, release_key = keys.service(service, "deploy"), keys.service(service, "release")
    started = time.monotonic()
    deadline = started + timeout
    warned = False
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[note]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
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
    if outcome.get("result") != "finished":
        fail(f"deploy of {service} rolled back: {outcome.get('reason')}")
    label = release.get("image") or release.get("version")
    console.print(f"{service}: deployed {label}"
                  + (f" ({outcome['reason']})" if outcome.get("reason") else ""), highlight=False)


def _request(config_path: str, service: str, image: str | None, port: int | None,
             strategy: str | None, reason: str, wait: bool, timeout: float) -> None:
    from agent.deploys import request_deploy
    from agent.runtime import connect

    config, plugins = _open(config_path)
    _known(config, service)
    if strategy is not None and strategy not in plugins.types["strategy"]:
        fail(f"unknown strategy {strategy!r}; installed: "
             f"{', '.join(plugins.types['strategy'])}")
    block = config.services[service].deploy
    if strategy is not None and (block is None or block.strategy != strategy):
        from pydantic import ValidationError

        try:  # another strategy than the service's runs with its defaults: are there any?
            plugins.types["strategy"][strategy].model(strategy=strategy)
        except ValidationError as exc:
            keys = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
            fail(f"strategy {strategy} needs settings ({keys}): give {service} a "
                 f"`deploy: {{strategy: {strategy}, ...}}` block in the config")
    store = connect(config)
    keys = Keys(config.key_prefix)
    try:
        journal = request_deploy(store, keys, service, image=image, port=port,
                                 strategy=strategy, by=_who(), reason=reason)
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
@_with(wait_options)
@friendly
def rollback(config_path: str, service: str, no_wait: bool, timeout: float) -> None:
    """Deploy the release SERVICE ran before the current one."""
    from agent.deploys import DeployError
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
                _follow(store, keys, service, journal["id"], timeout)
            return
        entry = store.get(keys.service(service, "release"))
    finally:
        store.close()
    previous = (parse_object(entry.value) if entry else {}).get("previous")
    if not previous:
        fail(f"{service} has no previous release recorded to roll back to")
    try:
        _request(config_path, service, previous.get("image"), previous.get("port"), None,
                 "rollback", not no_wait, timeout)
    except DeployError as exc:
        fail(str(exc))
