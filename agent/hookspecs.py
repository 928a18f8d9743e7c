"""The whole plugin contract of Shipmate: every hook a plugin may implement.

A plugin is a module (or object) with functions marked ``@agent.hookimpl`` whose
names match the specs below. Plugins load from the ``shipmate`` entry-point
group, built-ins included; a function named ``shipmate_*`` that matches no spec
is an error at start-up.

Registration hooks return the *types* a plugin offers, keyed by the ``type:``
name used in YAML; each type is a class extending one of the kinds in
:mod:`agent.kinds` (``Source``, ``Actuator``, ``Announcer``, ``Strategy``).
The results of every plugin are collected (no hook here is ``firstresult``
or ``historic``).

Event hooks let a plugin observe the agent without owning anything. They are
called from the agent's threads (the loop, its start/stop workers, source
polls, deploy threads), possibly at the same time, so an implementation must
be thread-safe and return quickly. Each implementation is called on its own:
an exception in one is logged with the plugin's name and does not stop the
others or the agent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from agent.instances import Instance
    from agent.kinds import Actuator, Announcer, Source, Strategy

PROJECT = "shipmate"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Marks a function as the implementation of the hook spec of the same name."""


# -------------------------------------------------------------------------
# Registration: the types each plugin offers, one hook per kind
# -------------------------------------------------------------------------


@hookspec
def shipmate_source_types() -> list[type[Source]]:
    """Offer source types: where a service's desired count is read from.

    Called once when the plugin manager is built, and again for ``shipmate
    plugins`` and ``shipmate schema``.

    :returns: a list of :class:`agent.kinds.Source` subclasses, each with a
        unique ``type_name`` (the YAML ``source: {type: NAME}``) and a
        ``Config`` model. Results of all plugins are collected; two plugins
        offering the same name is a start-up error naming both.
    """


@hookspec
def shipmate_actuator_types() -> list[type[Actuator]]:
    """Offer actuator types: what lists, starts, stops and health-checks instances.

    Called like :func:`shipmate_source_types`.

    :returns: a list of :class:`agent.kinds.Actuator` subclasses (YAML
        ``actuator: {type: NAME}``).
    """


@hookspec
def shipmate_announcer_types() -> list[type[Announcer]]:
    """Offer announcer types: what publishes healthy instances for discovery.

    Called like :func:`shipmate_source_types`.

    :returns: a list of :class:`agent.kinds.Announcer` subclasses (YAML
        ``announce: {type: NAME}``).
    """


@hookspec
def shipmate_strategy_types() -> list[type[Strategy]]:
    """Offer deploy strategy types: how one release replaces another.

    Called like :func:`shipmate_source_types`.

    :returns: a list of :class:`agent.kinds.Strategy` subclasses (YAML
        ``deploy: {strategy: NAME}``).
    """


# -------------------------------------------------------------------------
# Events: observe without owning (every result is ignored)
# -------------------------------------------------------------------------


@hookspec
def shipmate_desired_changed(service: str, old: int | None, new: int, reason: str) -> None:
    """The desired count of a service changed and was written to the store.

    Called by the acting agent right after the write, only when the value
    changed.

    :param service: the service's name in the YAML.
    :param old: the previous desired count, or None if there was none.
    :param new: the count now in the store.
    :param reason: why, in words ("static count 3", "datadog 450 / target 100").
    """


@hookspec
def shipmate_instance_started(instance: Instance) -> None:
    """An instance was started by the agent (it may not be healthy yet).

    :param instance: the instance as the actuator returned it.
    """


@hookspec
def shipmate_instance_stopped(instance: Instance, reason: str) -> None:
    """An instance was stopped by the agent (and removed, unless ``reason`` is "kept").

    :param instance: the instance as it was last listed.
    :param reason: why ("scale down to 2", "exited", "deploy"...).
    """


@hookspec
def shipmate_deploy_started(service: str, deploy: dict[str, Any]) -> None:
    """A deploy of ``service`` began.

    :param service: the service's name.
    :param deploy: the journal as written to the store (phase, from, to, strategy).
    """


@hookspec
def shipmate_deploy_progressed(service: str, deploy: dict[str, Any]) -> None:
    """A deploy moved on: a phase changed or an instance was replaced.

    :param service: the service's name.
    :param deploy: the journal as just written to the store.
    """


@hookspec
def shipmate_deploy_finished(service: str, deploy: dict[str, Any]) -> None:
    """A deploy completed: the new release serves and is recorded as ``release``.

    :param service: the service's name.
    :param deploy: the final journal.
    """


@hookspec
def shipmate_deploy_rolled_back(service: str, deploy: dict[str, Any], reason: str) -> None:
    """A deploy failed and the previous release was restored.

    :param service: the service's name.
    :param deploy: the final journal.
    :param reason: the check or error that failed.
    """


# -------------------------------------------------------------------------
# CLI: commands a plugin adds to ``shipmate``
# -------------------------------------------------------------------------


@hookspec
def shipmate_register_commands(cli: click.Group) -> None:
    """Add commands to the ``shipmate`` command line (like datasette's and llm's).

    Called once per ``shipmate`` invocation, and only when it is needed: when
    the command asked for is not a built-in one, for shell completion, and by
    ``shipmate plugins`` (which lists each plugin's commands) and ``shipmate
    check``. The built-in commands and ``shipmate --help`` never import a
    plugin, so they stay fast; ``--help`` points to ``shipmate plugins``.

    A command whose name is taken, by a built-in command or by another
    plugin's, is an error naming both (fix or block one); so is an exception
    raised here. Commands read the config themselves (the ``-c`` option is
    theirs to offer) and use :mod:`agent`'s exports like any plugin code::

        @hookimpl
        def shipmate_register_commands(cli):
            @cli.command()
            @click.argument("service")
            def notify(service):
                '''Post SERVICE's status to the team's channel.'''

    :param cli: a :class:`click.Group` that collects this plugin's commands
        (``@cli.command()``, ``@cli.group()``, ``cli.add_command(cmd)``); each
        becomes ``shipmate NAME``. It holds only this plugin's commands.
    """
