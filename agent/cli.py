"""The ``shipmate`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from agent.config import ConfigError, file_model
from agent.keys import Keys
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
    from agent.policy import decide

    config, store, keys, builder, reconciler, views = _views(config_path)

    try:
        for name, runtime in reconciler.services.items():
            view = views[name]
            try:
                value, error = float(runtime.source.read()), None
            except Exception as exc:  # noqa: BLE001
                value, error = None, str(exc)
            decision = decide(value, error, view.desired, runtime.config.policy, None)
            if view.deploy is not None:
                decision_text = "paused: a deploy is in progress"
            else:
                decision_text = decision.reason
                if decision.count is not None:
                    view.desired = decision.count  # plan as the next pass would see it
            console.print(f"[bold]{name}[/bold]: source {runtime.source.type_name}: "
                          f"{'error: ' + error if error else format(value, 'g')}; "
                          f"desired {decision_text}", highlight=False)
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
    config, store, keys, builder, reconciler, views = _views(config_path)
    try:
        leader = store.get(keys.leader)
    finally:
        builder.close()
        store.close()
    rows = []
    for name, view in views.items():
        rows.append({
            "service": name, "desired": view.desired, "override": view.override,
            "effective": view.effective, "running": len(view.running),
            "healthy": len(view.healthy), "release": view.release, "deploy": view.deploy,
            "instances": [{"name": i.name, "slot": i.slot, "version": i.version,
                           "host": i.host, "port": i.port, "running": i.running,
                           "healthy": i in view.healthy} for i in view.instances],
            "problems": view.problems,
        })
    if as_json:
        click.echo(json.dumps({"cluster": config.agent.cluster,
                               "leader": json.loads(leader.value) if leader else None,
                               "services": rows}, indent=2))
        return
    table = Table(title=f"cluster {config.agent.cluster}")
    for column in ("service", "desired", "override", "running", "healthy", "release", "deploy"):
        table.add_column(column)
    for row in rows:
        release = row["release"] or {}
        deploy = row["deploy"]
        table.add_row(row["service"], _n(row["desired"]), _n(row["override"]),
                      str(row["running"]), str(row["healthy"]),
                      str(release.get("image") or release.get("version") or "-"),
                      f"{deploy.get('phase', '?')}" if deploy else "-")
    console.print(table)
    if not leader:
        console.print("[yellow]no agent is acting for this cluster[/yellow]")
    for row in rows:
        for problem in row["problems"]:
            console.print(f"[yellow]{row['service']}: {problem}[/yellow]", highlight=False)


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


@main.command()
@config_option
@click.argument("service")
@click.argument("count", type=click.IntRange(min=0), required=False)
@click.option("--auto", is_flag=True, help="clear the override: the source decides again")
@friendly
def scale(config_path: str, service: str, count: int | None, auto: bool) -> None:
    """Set (or with --auto clear) a service's override count."""
    from agent.runtime import connect

    if (count is None) == (not auto):
        fail("give either a COUNT or --auto")
    config, _ = _open(config_path)
    if service not in config.services:
        fail(f"unknown service {service!r}; known: {', '.join(sorted(config.services))}")
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

