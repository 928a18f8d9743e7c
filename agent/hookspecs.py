"""The whole plugin contract of Shipmate: every hook a plugin may implement.

A plugin is a module (or object) with functions marked ``@agent.hookimpl`` whose
names match the specs below. Plugins load from the ``shipmate`` entry-point
group, built-ins included; a function named ``shipmate_*`` that matches no spec
is an error at start-up (mark it ``@hookimpl(optionalhook=True)`` to implement a
hook that only newer agents have). docs/plugins.md is the guide for authors.

The hooks, by group:

- *Registration* hooks return the *types* a plugin offers, keyed by the
  ``type:`` name used in YAML; each type is a class extending one of the kinds
  in :mod:`agent.kinds` (``Source``, ``Actuator``, ``Announcer``, ``Strategy``).
  The results of every plugin are collected.
- *Lifecycle*: a plugin declares the model of its own config block
  (``plugins: {NAME: {...}}`` in the YAML, ``NAME`` being its entry-point
  name) with :func:`shipmate_config_model`, gets that block in
  :func:`shipmate_configure` when the agent starts, and closes what it opened
  in :func:`shipmate_unconfigure` when it stops. A reload (SIGHUP) unconfigures
  every plugin and configures them again with the new file.
- *Veto*: :func:`shipmate_allow_action` may hold a start or stop the reconcile
  pass planned (a change freeze, a maintenance window); the only ``firstresult``
  hook.
- *Metrics*: :func:`shipmate_register_metrics` adds a plugin's metrics to the
  agent's ``/metrics``.
- *Events* let a plugin observe the agent without owning anything. They are
  called from the agent's threads (the loop, its start/stop workers, source
  polls, deploy threads), possibly at the same time, so an implementation must
  be thread-safe and return quickly.

Every hook is called through pluggy, so ``@hookimpl(wrapper=True)`` and
``tryfirst``/``trylast`` work as pluggy documents. An exception in an event,
``shipmate_unconfigure`` or ``shipmate_register_metrics`` implementation is
logged with the plugin's name and does not stop the others or the agent; one in
``shipmate_configure`` stops the agent's start, naming the plugin; one in
``shipmate_allow_action`` is described there. ``SHIPMATE_TRACE_PLUGINS=1``
logs every hook call with the plugins it ran and its duration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click
    from prometheus_client import CollectorRegistry
    from pydantic import BaseModel

    from agent.deploys import DeployJournal
    from agent.instances import Instance
    from agent.kinds import Actuator, Announcer, Context, Source, Strategy
    from agent.reconcile import Action

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
        ``deploy: {type: NAME}``).
    """


# -------------------------------------------------------------------------
# Lifecycle: a plugin's own config block, configure and unconfigure
# -------------------------------------------------------------------------


@hookspec
def shipmate_config_model() -> type[BaseModel] | None:
    """Declare the pydantic model of the plugin's block ``plugins: {NAME: {...}}``.

    ``NAME`` is the plugin's entry-point name (as ``shipmate plugins`` lists it).
    Called once when the plugin manager is built, like the registration hooks.
    The block is validated by this model when the config is loaded, unknown
    keys refused, each error naming file, line and key like the rest of the
    config; the model is part of ``shipmate schema``. Without this hook, a
    block for the plugin is a config error.

    :returns: a :class:`pydantic.BaseModel` subclass (``SecretStr`` fields stay
        masked in logs), or None for no block.
    """


@hookspec
def shipmate_configure(config: BaseModel | None, context: Context) -> None:
    """Set the plugin up: open clients, start threads.

    Called from the main thread when the agent starts (``shipmate run``),
    before the loop's first turn, and again after each reload (SIGHUP) that
    succeeded, following :func:`shipmate_unconfigure`. Called once per
    plugin, with that plugin's own block, whether it leads the cluster or
    stands by. The CLI's other commands do not call it.

    :param config: the plugin's block validated by its
        :func:`shipmate_config_model`, or None when the YAML has no block for it
        (an unconfigured plugin should stay idle).
    :param context: the agent's :class:`agent.kinds.Context` (cluster, store,
        state_dir, log, wake).
    :raises: anything, to refuse to start: the agent exits naming the plugin (on
        a reload, the error is logged and the agent runs on).
    """


@hookspec
def shipmate_unconfigure() -> None:
    """Tear down what :func:`shipmate_configure` set up: flush, close clients.

    Called from the main thread when the agent stops (instances keep running),
    before each reload configures the plugins again, and when the
    :func:`shipmate_configure` of any plugin failed: make it safe to call
    without a configure before it (close only what is open). It should return
    within a few seconds.
    """


# -------------------------------------------------------------------------
# Veto: hold an action the reconcile pass planned
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def shipmate_allow_action(action: Action) -> str | None:
    """May the reconcile pass start or stop this instance now?

    Called from the loop's thread for each start and stop a pass is about to
    hand to the actuator (not for the steps of a deploy, which its strategy
    runs), on the acting agent only, after the agent's own reasons to wait
    (a busy slot, a crash-loop backoff). Stops at the first non-None result.
    A held action is not run; ``shipmate status`` shows it with the plugin's
    name and reason (``held`` in ``--json``), and the next pass asks again
    (at least every ``agent.interval``; call ``context.wake()`` when a hold
    ends sooner).

    An implementation that raises, or returns something other than None or a
    string, is logged with its name and counts as holding a *stop* (nothing
    is taken down on a check that cannot answer) but not a *start* (crash
    recovery and scale-ups never wait on a broken plugin).

    :param action: the action (:class:`agent.reconcile.Action`): ``verb``
        ("start" or "stop"), ``service``, ``slot``, ``reason`` (why the pass
        wants it: "scale down to 2", "exited", "duplicate of its slot"...),
        ``instance`` (what a stop stops) and ``spec`` (what a start starts).
    :returns: None to allow it, or the reason to hold it ("change freeze
        until 18:00").
    """


# -------------------------------------------------------------------------
# Metrics
# -------------------------------------------------------------------------


@hookspec
def shipmate_register_metrics(registry: CollectorRegistry) -> None:
    """Add the plugin's Prometheus metrics to the agent's ``/metrics``.

    Called once per agent process, from the main thread, when the agent is
    built (before :func:`shipmate_configure`; not again on a reload). Create
    metrics with ``registry=registry`` and keep them (a module global, say)
    to update them from other hooks. A name already taken is logged as this
    plugin's failure; prefix yours with the plugin's name.

    :param registry: the agent's
        :class:`prometheus_client.CollectorRegistry`.
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
def shipmate_leadership_gained(term: int) -> None:
    """This agent now acts for the cluster (it won the leader key).

    Called from the loop's thread at the start of the first turn that leads,
    before that turn's polls and pass.

    :param term: how many times this agent process has won (1, 2...).
    """


@hookspec
def shipmate_leadership_lost(term: int, reason: str) -> None:
    """This agent no longer acts for the cluster; another may take over.

    Called from the loop's thread at the first turn that no longer leads, or
    when the agent stops while leading. Starts and stops already handed to
    the actuator may still end after it.

    :param term: the term that ended (as given to
        :func:`shipmate_leadership_gained`).
    :param reason: why, in words ("the lease expired: ...", "the agent
        stopped").
    """


@hookspec
def shipmate_override_changed(service: str, old: int | None, new: int | None) -> None:
    """A service's ``override`` (``shipmate scale``) was set, changed or cleared.

    Called from the loop's thread by the acting agent, in the first pass that
    sees the change (not for the value it finds when it starts leading).

    :param service: the service's name.
    :param old: the override before, or None if there was none.
    :param new: the override now, or None if it was cleared (``--auto``) or
        holds no count.
    """


@hookspec
def shipmate_health_changed(instance: Instance, healthy: bool) -> None:
    """An instance passed its health check after failing it, or failed it after passing.

    Called from the loop's thread by the acting agent, in the pass that sees
    the change (not when it first sees an instance: a new one starts
    unhealthy and is reported when it first passes).

    :param instance: the instance as listed in that pass.
    :param healthy: True if it passes now, False if it fails now.
    """


@hookspec
def shipmate_crash_loop(service: str, slot: int, restarts: int, last_exit: str,
                        next_try_in: float) -> None:
    """A slot started crash-looping: its instance exited or failed to start, and the
    slot waits before its next start (``restart.backoff``, doubling).

    Called from the loop's thread (an exit) or a start worker (a failed start)
    at the first failure after the slot was fine (new, or up and healthy
    since), not at each further failure of the same loop; ``shipmate status``
    shows the loop until the slot recovers.

    :param service: the service's name.
    :param slot: the slot.
    :param restarts: the slot's failures in a row so far (since it was last reset).
    :param last_exit: what ended it ("exited (exit code 1)", "start failed: ...").
    :param next_try_in: seconds until the slot's next start.
    """


@hookspec
def shipmate_deploy_started(service: str, deploy: DeployJournal) -> None:
    """A deploy of ``service`` began: its journal now says ``running``.

    :param service: the service's name.
    :param deploy: the journal as just written (:class:`agent.DeployJournal`): ``id``,
        ``phase`` (an :class:`agent.Phase`), ``strategy``, ``from_`` and ``to`` (the old
        and new :class:`agent.Release`), ``desired``, ``by``, ``reason``.
    """


@hookspec
def shipmate_deploy_progressed(service: str, deploy: DeployJournal) -> None:
    """A deploy moved on: a batch replaced, a blue/green step begun, a rollback's step.

    :param service: the service's name.
    :param deploy: the journal as just written (:class:`agent.DeployJournal`); its
        ``progress`` says how far (``done`` of ``total`` instances, and a ``note``), its
        ``phase`` which way (``running``, ``rolling-back``).
    """


@hookspec
def shipmate_deploy_finished(service: str, deploy: DeployJournal) -> None:
    """A deploy completed: the new release serves and is recorded as ``release``.

    :param service: the service's name.
    :param deploy: the final journal (:class:`agent.DeployJournal`, phase ``finished``):
        ``deploy.to`` is the release now running.
    """


@hookspec
def shipmate_deploy_rolled_back(service: str, deploy: DeployJournal, reason: str) -> None:
    """A deploy failed (or was aborted) and the previous release was restored.

    :param service: the service's name.
    :param deploy: the final journal (:class:`agent.DeployJournal`, phase
        ``rolled-back``): ``deploy.from_`` is the release running again, ``deploy.error``
        what failed.
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
