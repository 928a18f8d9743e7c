"""Orphans: instances of this cluster whose service is no longer in the YAML.

The loop sees them in every pass (:attr:`agent.reconcile.Reconciler.unowned`)
and hands them to :class:`Orphans`, which

- withdraws each from discovery at once, through every announcer that may
  have announced it: the configured services' announcers (a service that used
  the ``defaults`` block shares its announcer with every other such service)
  and the built-in ``etcd`` announcer with its default settings. An orphan is
  never announced again, since no service owns it;
- removes the records of dead ones (an exited process's record, a stopped
  container), withdraw first;
- with ``agent.orphans: stop``, stops the running ones once they have been
  orphans for :data:`GRACE` seconds (withdraw, then stop); with ``keep`` (the
  default) leaves them running: ``shipmate prune`` stops them.

Every function takes its collaborators as arguments, so that the loop, the
CLI and the tests wire them as they like. Nothing here ever touches an
instance of a configured service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.instances import Instance
from agent.kinds import Actuator, Announcer

log = logging.getLogger("shipmate.orphans")
GRACE = 60.0
"seconds an instance stays an orphan before ``agent.orphans: stop`` stops it"


@dataclass(frozen=True)
class Orphan:
    """An orphan and the actuator that listed it (which can stop it)."""

    instance: Instance
    actuator: Actuator


def find_orphans(actuators: Iterable[Actuator], configured: Iterable[str],
                 service: str | None = None) -> list[Orphan]:
    """The instances no configured service owns, listed by each of ``actuators`` once.

    :param service: only the orphans of this service.
    :raises Exception: whatever an actuator's ``list`` raises.
    """
    configured = set(configured)
    out: dict[str, Orphan] = {}
    for actuator in dict.fromkeys(actuators):  # each object once, in order
        for instance in actuator.list():
            if instance.service in configured or instance.name in out:
                continue
            if service is None or instance.service == service:
                out[instance.name] = Orphan(instance, actuator)
    return sorted(out.values(), key=lambda o: (o.instance.service, o.instance.slot))


def default_announcer(builder: Any) -> Announcer | None:
    """The built-in ``etcd`` announcer with its default settings, made by ``builder``
    (an :class:`agent.runtime.Builder`); None if that type is not installed."""
    entry = builder.plugins.types["announcer"].get("etcd")
    if entry is None:
        return None
    return builder.make("announcer", entry.model(type="etcd"))


def candidate_announcers(services: dict[str, Any],
                         default: Callable[[], Announcer | None] | None = None
                         ) -> list[Announcer]:
    """Every announcer that may have announced an orphan (see the module docstring):
    the services' own, and what ``default`` makes (e.g. ``lambda: default_announcer(b)``)."""
    found = [rt.announcer for rt in services.values() if rt.announcer is not None]
    made = default() if default is not None else None
    if made is not None:
        found.append(made)
    return list(dict.fromkeys(found))


def announced_keys(instance: Instance, announcers: Iterable[Announcer]) -> list[str]:
    """The keys ``instance`` would be announced under by ``announcers`` (those that say)."""
    keys = []
    for announcer in announcers:
        key = getattr(announcer, "key", None)
        if callable(key):
            keys.append(key(instance))
    return list(dict.fromkeys(keys))


def withdraw(instance: Instance, announcers: Iterable[Announcer]) -> None:
    """Withdraw ``instance`` from every one of ``announcers``.

    :raises Exception: the first announcer failure (the store away, say), after trying all.
    """
    failure: Exception | None = None
    for announcer in announcers:
        try:
            announcer.withdraw(instance)
        except Exception as exc:  # noqa: BLE001 - try the others, then say so
            failure = failure or exc
    if failure is not None:
        raise failure


def stop(orphan: Orphan, announcers: Iterable[Announcer], grace: float) -> None:
    """Withdraw, then stop (and remove) an orphan."""
    withdraw(orphan.instance, announcers)
    orphan.actuator.stop(orphan.instance, grace)


@dataclass
class Orphans:
    """What the loop does with orphans, pass after pass (see the module docstring)."""

    default: Callable[[], Announcer | None] | None = None
    "makes the default announcer (the runtime: ``lambda: default_announcer(builder)``)"
    clock: Callable[[], float] = time.monotonic
    grace: float = GRACE
    withdrawn: set[str] = field(default_factory=set)
    first_seen: dict[str, float] = field(default_factory=dict)

    def handle(self, unowned: dict[str, Instance], services: dict[str, Any], *,
               policy: str = "keep", stop_grace: float = 10.0) -> list[str]:
        """One pass over the orphans in ``unowned``; returns the errors, raises nothing.

        :param services: the configured services (``ServiceRuntime`` by name).
        :param policy: ``agent.orphans``: ``keep`` or ``stop``.
        :param stop_grace: seconds between SIGTERM and SIGKILL when stopping one.
        """
        now = self.clock()
        self.withdrawn &= unowned.keys()
        self.first_seen = {n: self.first_seen.get(n, now) for n in unowned}
        if not unowned:
            return []
        errors: list[str] = []
        try:
            announcers = candidate_announcers(services, self.default)
        except Exception as exc:  # noqa: BLE001
            return [f"orphans: cannot set up the default announcer: {exc}"]
        for name, instance in unowned.items():
            if name in self.withdrawn:
                continue
            try:
                withdraw(instance, announcers)
            except Exception as exc:  # noqa: BLE001 - retried at the next pass
                errors.append(f"orphan {name}: cannot withdraw it from discovery: {exc}")
                continue
            self.withdrawn.add(name)
            log.warning("instance %s of service %r, no longer in the config, is withdrawn from "
                        "discovery; %s", name, instance.service,
                        f"it is stopped after {self.grace:g}s" if policy == "stop"
                        else "`shipmate prune` stops it")
        due = {n for n, i in unowned.items() if not i.running or (
            policy == "stop" and now - self.first_seen[n] >= self.grace)}
        if not due:
            return errors
        actuators = [rt.actuator for rt in services.values()]
        try:
            found = {o.instance.name: o for o in find_orphans(actuators, services)}
        except Exception as exc:  # noqa: BLE001
            return errors + [f"orphans: cannot list instances: {exc}"]
        for name in sorted(due & found.keys()):
            orphan = found[name]
            what = "removed the record of dead" if not orphan.instance.running else "stopped"
            try:
                stop(orphan, announcers, stop_grace)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"orphan {name}: cannot stop it: {exc}")
                continue
            log.info("%s orphan %s (service %r, no longer in the config)", what, name,
                     orphan.instance.service)
        return errors
