"""The four plugin kinds: the small base class each type of a kind extends.

A *type* (``static``, ``docker``, ``etcd``, ``rolling``...) is a class with a
``type_name``, a pydantic ``Config`` model for its YAML block, and the one or
two role methods of its kind. A plugin offers types through the registration
hooks in :mod:`agent.hookspecs`; the agent builds one object per distinct
config and calls the role methods.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from agent.durations import Duration, Interval, Timeout

if TYPE_CHECKING:
    from agent.deploys import Deployment
    from agent.instances import Instance, InstanceSpec
    from agent.store import Store


class TypeConfig(BaseModel):
    """Base of every type's config model: unknown keys are errors.

    The registry adds the ``type`` field (a literal of the type's name), so a
    type's model lists only its own keys.
    """

    model_config = ConfigDict(extra="forbid")
    shape_fields: ClassVar[tuple[str, ...]] = ()
    "an actuator's settings that shape an instance: part of a release and its version"


class SourceConfig(TypeConfig):
    """Keys every source has."""

    name: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    "names the source among a service's ``sources`` (combine, status); default: its type"
    interval: Interval = 30.0
    "how often the source is read, on its own schedule"
    expiry: Duration | None = None
    "a reading older than this is an error (default: three intervals)"


@dataclass
class Context:
    """What the agent hands every plugin object it builds."""

    cluster: str
    store: Store
    state_dir: Path
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("shipmate"))
    wake: Callable[[], None] | None = None
    """Asks the running agent for a pass now (say, an instance died); None outside the agent."""


class PluginType:
    """Common base: ``type_name``, ``Config``, and the constructor the agent calls."""

    kind: ClassVar[str]
    type_name: ClassVar[str]
    Config: ClassVar[type[TypeConfig]] = TypeConfig
    requires: ClassVar[dict[str, str]] = {}
    "modules the type imports lazily -> what to pip install; checked by `shipmate check`"

    @classmethod
    def requirements(cls, config: Any) -> dict[str, str]:
        """The modules this ``config`` needs (default: :attr:`requires`)."""
        return cls.requires

    def __init__(self, config: Any, context: Context) -> None:
        self.config = config
        self.context = context

    def close(self) -> None:  # noqa: B027 - optional
        """Release clients and threads when the agent stops or reloads."""


class SourceError(Exception):
    """A source could not give a reading; the message says why (no secrets)."""


class Source(PluginType, ABC):
    """Reads how many instances a service should have."""

    kind = "source"
    Config: ClassVar[type[TypeConfig]] = SourceConfig

    @abstractmethod
    def read(self) -> float:
        """The number of instances wanted now (fractions are rounded up).

        Raise :class:`SourceError` (or any exception) when there is no good
        reading; never return 0 for "unknown". None and NaN are errors too.
        """

    def from_raw(self, value: float) -> float:
        """Instances for one raw value of the source's metric (a replayed reading):
        the conversion :meth:`read` applies, such as ``value / target``. Default: as is."""
        return value

    def history(self, start: float, end: float, step: float) -> list[tuple[float, float]]:
        """Raw values ``(time, value)`` from ``start`` to ``end``, about every ``step``
        seconds, for ``shipmate simulate --since`` (converted by :meth:`from_raw`).

        Optional: the default raises :class:`SourceError` (no history).
        """
        raise SourceError(f"the {self.type_name} source keeps no history: give the readings "
                          "in a CSV file (--readings)")


class Actuator(PluginType, ABC):
    """Lists, starts, stops and health-checks instances.

    One object serves every service with the same actuator config, so
    :meth:`list` is called once per pass for all of them.
    """

    kind = "actuator"
    parallelism: int = 1
    "how many starts or stops the loop may run at once on this actuator"

    @abstractmethod
    def list(self) -> list[Instance]:
        """Every instance of this cluster this actuator can see, running or exited."""

    @abstractmethod
    def start(self, spec: InstanceSpec) -> Instance:
        """Start one instance and return it (it need not be healthy yet)."""

    @abstractmethod
    def stop(self, instance: Instance, grace: float) -> None:
        """Stop and remove ``instance``: ask nicely, force after ``grace`` seconds."""

    def output(self, instance: Instance, lines: int = 5) -> str | None:
        """The last ``lines`` of ``instance``'s output, if the actuator keeps it (logged
        when an instance exits, to say why); None by default."""
        return None

    def healthy(self, instance: Instance, check: Any) -> bool:
        """Whether ``instance`` passes ``check`` (the service's ``health`` block, or None).

        The default probes ``instance.host:instance.port`` over HTTP or TCP;
        an actuator with a better source of truth (a container's HEALTHCHECK)
        overrides it.
        """
        from agent.health import probe

        return probe(instance, check)


@runtime_checkable
class Parking(Protocol):
    """An actuator's optional capability: keep a stopped instance, to start it again at once.

    An actuator that has both methods has it (``isinstance(actuator, Parking)``; docker: a
    stopped container, kept); blue/green's ``keep_old`` needs it, checked when the config
    loads. A parked instance is listed with ``running=False``; the loop leaves it alone
    while its version is ``kept`` (see :mod:`agent.reconcile`).
    """

    def park(self, instance: Instance, grace: float) -> None:
        """Stop ``instance`` (ask nicely, force after ``grace`` seconds) but keep it."""

    def unpark(self, instance: Instance) -> Instance:
        """Start a parked ``instance`` again and return it (it need not be healthy yet)."""


def can_park(actuator: Any) -> bool:
    """Whether ``actuator`` (an object or a class) keeps stopped instances (:class:`Parking`)."""
    if isinstance(actuator, type):
        return issubclass(actuator, Parking)
    return isinstance(actuator, Parking)


class AnnouncerConfig(TypeConfig):
    """Keys every announcer has."""

    drain: Duration = Field(2.0, ge=0)
    "how long an instance keeps running after its withdrawal, before its stop (0: no wait)"


class Announcer(PluginType, ABC):
    """Publishes healthy instances for service discovery.

    One object serves every service with the same announce config. The agent
    keeps these promises to the announcer's consumers (a load balancer fed by
    confd, say): a new instance is announced (:meth:`announce`) as soon as it
    passes its health check and before anything it replaces is withdrawn; an
    instance is withdrawn (:meth:`withdraw`) ``drain`` seconds before its stop
    begins; a withdrawn instance is not announced again until it is gone.
    """

    kind = "announcer"
    Config: ClassVar[type[TypeConfig]] = AnnouncerConfig

    @property
    def drain(self) -> float:
        """Seconds between an instance's withdrawal and its stop (``drain`` in the config)."""
        return float(getattr(self.config, "drain", 0.0) or 0.0)

    def announce(self, instance: Instance) -> None:  # noqa: B027 - optional
        """Announce one instance now: it has just passed its health check.

        Called by the code that saw it pass (a deploy step, before anything
        old is withdrawn), so that discovery never waits for the next pass.
        It ends a withdrawal of the same name (an instance started again).
        The default does nothing: the next :meth:`sync` announces it.
        """

    @abstractmethod
    def sync(self, healthy: dict[str, list[Instance]]) -> None:
        """Make the announced set of each service equal its healthy instances.

        Called once per pass with every service this announcer serves (services
        with no healthy instance map to an empty list): write what is missing,
        remove what is stale, keep the rest alive. Also called between passes
        with only the services whose health just changed (an instance passed or
        failed its check): leave the announcements of services not named as
        they are. Calls never overlap.
        """

    @abstractmethod
    def withdraw(self, instance: Instance) -> None:
        """Remove one instance's announcement; called ``drain`` seconds before it is stopped.

        The withdrawal holds, however long the stop takes: a :meth:`sync`
        that follows may still list the instance (a pass that looked before
        the withdrawal, or while the instance was being stopped), and must not
        announce it again until :meth:`stopped` said its stop ended and a sync
        no longer lists it (or :meth:`announce` names it).
        """

    def stopped(self, instance: Instance, gone: bool) -> None:  # noqa: B027 - optional
        """The stop that followed :meth:`withdraw` ended: ``gone`` if it succeeded.

        After a failed stop (``gone`` False) the instance may still run and
        serve: its withdrawal ends, and a later :meth:`sync` may announce it
        again. The default does nothing.
        """


class StrategyConfig(TypeConfig):
    """Keys every deploy strategy has."""

    health_timeout: Timeout = 60.0
    "how long a new instance may take to pass its health check"
    images: list[Annotated[str, Field(min_length=1, max_length=300)]] = []
    "patterns (registry/web:*) of the images a deploy may run; default: the YAML image's repository"


class Strategy(PluginType, ABC):
    """Replaces one release of a service by another.

    A strategy must be resumable: the agent may die at any point, and the next
    acting agent calls :meth:`run` (or :meth:`rollback`) again with the same
    journal. Work from what runs (``deploy.instances()``) and from what the strategy
    saved (``deploy.state``, written by ``deploy.save_state``), not from memory. Reach
    the service only through the :class:`agent.Deployment`'s methods; let its
    :class:`agent.Interrupted` and :class:`agent.LockLost` through.
    """

    kind = "strategy"
    Config: ClassVar[type[TypeConfig]] = StrategyConfig

    @classmethod
    def actuator_problem(cls, config: Any, actuator: type) -> str | None:
        """Why this strategy, set up by ``config``, cannot deploy a service whose actuator is
        of class ``actuator``, or None (default). Checked when the config loads: a problem is
        a config error naming the service (blue/green's ``keep_old`` needs :class:`Parking`)."""
        return None

    def initial_port(self, port: int | None) -> int | None:
        """The base port of a service's first release, given the YAML's ``port`` (default:
        that one; a strategy that moves releases between ports picks its first)."""
        return port

    def target_port(self, current: int | None, configured: int | None) -> int | None:
        """The base port the new release listens on, given the current release's and the
        YAML's ``port`` (default: the YAML's, so a changed port is deployed too)."""
        return configured

    @abstractmethod
    def run(self, deploy: Deployment) -> None:
        """Bring ``deploy`` from its old release (``deploy.source``) to its new one
        (``deploy.target``); raise :class:`agent.DeployError` (or anything) to fail: the
        runner then calls :meth:`rollback` (or pauses, with ``on_failure: pause``)."""

    def rollback(self, deploy: Deployment, reason: str) -> None:
        """Restore the old release after a failure (``reason``); by default, run backwards
        (:meth:`run` with ``deploy.reversed()``)."""
        self.run(deploy.reversed())


KINDS: dict[str, type[PluginType]] = {
    "source": Source, "actuator": Actuator, "announcer": Announcer, "strategy": Strategy,
}
