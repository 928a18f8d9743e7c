"""Plugins add ``shipmate`` commands with ``shipmate_register_commands(cli)``."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import types

import click
import pytest
from click.testing import CliRunner

import agent.plugins
from agent import hookimpl
from agent.cli import main
from tests.helpers import shipmate_imports


def _plugin(register) -> types.SimpleNamespace:
    return types.SimpleNamespace(shipmate_register_commands=hookimpl(register))


def _greeter(cli: click.Group) -> None:
    @cli.command()
    @click.argument("name")
    @click.option("--loud", is_flag=True)
    def hello(name: str, loud: bool) -> None:
        """Greet NAME."""
        click.echo(f"hello {name}{'!' if loud else ''}")


@pytest.fixture
def with_plugins(monkeypatch):
    """``with_plugins(name=register, ...)``: the CLI loads these in-test plugins too."""

    def install(**registers) -> None:
        extra = [(name, _plugin(register)) for name, register in registers.items()]
        monkeypatch.setattr(agent.plugins, "load_plugins",
                            functools.partial(agent.plugins.load_plugins, extra=extra))

    return install


def test_a_plugin_command_runs_with_its_arguments_and_help(with_plugins):
    with_plugins(greeter=_greeter)
    result = CliRunner().invoke(main, ["hello", "world", "--loud"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello world!\n"
    shown = CliRunner().invoke(main, ["hello", "--help"])
    assert "Usage: main hello [OPTIONS] NAME" in shown.output and "Greet NAME." in shown.output


def test_shipmate_plugins_lists_each_plugins_commands(with_plugins):
    with_plugins(greeter=_greeter)
    listed = json.loads(CliRunner().invoke(main, ["plugins", "--json"]).output)
    mine = next(p for p in listed if p["name"] == "greeter")
    assert mine["commands"] == ["hello"] and "error" not in mine
    assert next(p for p in listed if p["name"] == "static")["commands"] == []
    table = CliRunner().invoke(main, ["plugins"]).output
    assert "commands: hello" in table


def test_a_plugin_taking_a_builtin_name_is_an_error_naming_it(with_plugins, write_config,
                                                              tmp_path):
    def clash(cli: click.Group) -> None:
        @cli.command("scale")
        def scale() -> None:
            """Not the real one."""

    with_plugins(greeter=_greeter, clash=clash)
    expected = "plugin 'clash': command 'scale' is a built-in command of shipmate"
    result = CliRunner().invoke(main, ["hello", "world"])
    assert result.exit_code == 1 and expected in result.output
    path = write_config("""
        agent: {cluster: clash, store: {path: state.db}}
        services:
          web: {command: [sleep, "1"], actuator: {type: process},
                source: {type: static, count: 1}}
        """)
    checked = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert checked.exit_code == 1 and expected in checked.output
    listed = json.loads(CliRunner().invoke(main, ["plugins", "--json"]).output)
    assert expected in next(p for p in listed if p["name"] == "clash")["error"]
    scaled = CliRunner().invoke(main, ["scale", "-c", str(path), "web", "1"])
    assert scaled.output == "web: override set to 1\n"  # the built-in one, still


def test_two_plugins_offering_one_command_is_an_error_naming_both(with_plugins):
    with_plugins(greeter=_greeter, copycat=lambda cli: _greeter(cli))
    result = CliRunner().invoke(main, ["hello", "x"])
    assert result.exit_code == 1
    assert "command 'hello' is offered by both 'greeter' and 'copycat'" in result.output
    assert "SHIPMATE_BLOCK_PLUGINS=copycat" in result.output


def test_a_failing_register_hook_is_an_error_naming_the_plugin(with_plugins):
    def broken(cli: click.Group) -> None:
        raise RuntimeError("no token configured")

    with_plugins(broken=broken)
    result = CliRunner().invoke(main, ["anything"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert ("plugin 'broken': shipmate_register_commands() failed: RuntimeError: "
            "no token configured") in result.output


def test_an_unknown_command_is_still_unknown_after_the_plugins_load(with_plugins):
    with_plugins(greeter=_greeter)
    result = CliRunner().invoke(main, ["helo"])
    assert result.exit_code == 2 and "No such command 'helo'" in result.output


# -- an installed plugin, in real subprocesses -------------------------------------------


PLUGIN = '''
    import click
    from agent import hookimpl

    @hookimpl
    def shipmate_register_commands(cli):
        @cli.command()
        @click.argument("name")
        def hello(name):
            """Greet NAME."""
            click.echo(f"hello {name} from a plugin")
    '''


@pytest.fixture
def installed(tmp_path) -> dict[str, str]:
    """A distribution ``shipmate-hello`` on PYTHONPATH: its module and entry point."""
    (tmp_path / "shipmate_hello.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "shipmate_hello-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shipmate-hello\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[shipmate]\nhello = shipmate_hello\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path}


def shipmate(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60, env={**env, **extra})


def test_an_installed_plugin_command_runs_and_help_does_not_import_it(installed):
    ran, modules, _ = shipmate_imports("hello", "you", env=installed)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello you from a plugin\n"
    assert "shipmate_hello" in modules
    helped, modules, _ = shipmate_imports("--help", env=installed)
    assert helped.returncode == 0 and "`shipmate plugins` lists them" in helped.stdout
    assert "shipmate_hello" not in modules and "pydantic" not in modules
    assert "hello" not in helped.stdout  # plugin commands are listed by `shipmate plugins`
    listed = shipmate(installed, "plugins")
    assert "commands: hello" in listed.stdout


def test_shell_completion_offers_plugin_commands(installed):
    completed = shipmate(installed, _SHIPMATE_COMPLETE="bash_complete", COMP_WORDS="shipmate ",
                         COMP_CWORD="1")
    assert completed.returncode == 0, completed.stderr
    offered = completed.stdout.splitlines()
    assert "plain,hello" in offered and "plain,scale" in offered
