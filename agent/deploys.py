"""Deploys: the request, the journal, and the runner that drives strategies.

A deploy is asked for by writing ``<prefix>/<cluster>/services/<service>/deploy``
(``shipmate deploy`` does; so does the agent when a reloaded YAML changed a
service's spec). The acting agent picks the request up and owns it from then
on: the key becomes the deploy's journal (phase, from, to, desired count,
progress), written only by compare-and-set, so an agent that lost leadership
cannot write over its successor. The key itself is durable (not on a lease):
if the agent dies, the journal must survive for the next acting agent, which
resumes it. The lock it carries is the leader's lease.

Phases: ``requested`` -> ``running`` -> done (the key is deleted and ``release``
records the result), or on failure ``rolling-back`` -> done, or ``paused``
(``on_failure: pause``; ops decide with ``shipmate rollback``), or ``failed``
(even the rollback failed: the key stays and scaling stays paused until
``shipmate abort`` clears it). While the key exists the service is not scaled or
reconciled by count.

A rollback is a deploy with ``restore`` naming the version to bring back; the
runner takes that release (image, command, env, port, shape) from the
``release`` key's ``previous`` or from the history (:mod:`agent.history`), never
from the request itself. ``shipmate abort`` writes ``rolling-back`` into a
running journal (compare-and-set); the runner notices within a second (every
step re-reads the journal's revision), lets go, and the next pass resumes the
journal backwards. A deploy that rolled back, or a rollback, marks the YAML's
spec ``held`` in the release, so the YAML is not deployed again until it changes.

Strategies keep their own resume points in the journal's ``strategy_state``
(blue/green's ``step``: ``starting``, ``switching``, ``baking``, ``draining``;
``lb_before``, ``baking_since``), written with :meth:`Deployment.save_state`; a
journal written before ``strategy_state`` existed keeps them at the top level, and
is read as if they were under it (a deploy in flight through an upgrade resumes).
A strategy may narrow ``announce``, the versions the loop announces while the
deploy runs. ``kept`` names a version whose stopped instances are kept for an
instant rollback (blue/green's ``keep_old``): the loop neither removes nor counts
them, and a finished deploy copies it into ``release``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    model_validator,
)

from agent import history
from agent.actuation import withdraw_then_stop
from agent.instances import Instance
from agent.keys import Keys, parse_object
from agent.kinds import Parking, Strategy, can_park
from agent.releases import (
    VERSION,
    Release,
    config_deploy,
    image_problem,
    make_release,
    parse_release,
    restore_release,
)
from agent.store import Store, StoreError

log = logging.getLogger("shipmate.deploy")


class Phase(StrEnum):
    """A deploy's phase, as stored in its journal and shown by ``shipmate status``."""

    REQUESTED = "requested"
    "asked for (``shipmate deploy``, a changed YAML); not picked up yet"
    RUNNING = "running"
    "the strategy brings the service from the old release to the new one"
    ROLLING_BACK = "rolling-back"
    "it failed (or was aborted): the strategy brings the old release back"
    FINISHED = "finished"
    "the new release serves; the journal is removed as soon as ``release`` records it"
    ROLLED_BACK = "rolled-back"
    "the old release serves again; the journal is removed likewise"
    PAUSED = "paused"
    "it failed with ``on_failure: pause``: nothing moves until ``shipmate rollback``"
    FAILED = "failed"
    "even the rollback failed: scaling stays paused until ``shipmate abort``"


ACTIVE = (Phase.REQUESTED, Phase.RUNNING, Phase.ROLLING_BACK, Phase.FINISHED, Phase.ROLLED_BACK)
"""Phases the runner picks up; the last two mean: the agent died while recording the end."""
KNOWN = (*ACTIVE, Phase.PAUSED, Phase.FAILED, "refused")
LEGACY_STATE = ("step", "lb_before", "baking_since")
"""Strategy state that journals written before ``strategy_state`` kept at the top level."""


REFUSED = "refused"
"""The phase of a request or journal from the store that failed validation: nothing acts on
it, the service runs on as before, and a new request may replace it."""
MAX_JOURNAL = 64 * 1024  # bytes: a journal the agent writes is a few hundred


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


_ID = r"^[A-Za-z0-9_.-]{1,64}$"
_NAME = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
_Version = Field(pattern=VERSION.pattern)
_When = Field(None, allow_inf_nan=False)


class StoredRelease(_Strict):
    """A release inside a journal (``from``, ``to``)."""

    image: str | None = Field(None, max_length=300)
    port: int | None = Field(None, ge=1, le=65535)
    version: str = _Version
    spec: str = Field("", max_length=64)
    when: float | None = _When
    command: list[Annotated[str, Field(max_length=4096)]] | None = Field(None, max_length=256)
    env: dict[str, Annotated[str, Field(max_length=65536)]] | None = Field(None, max_length=256)
    secret_env: list[str] | None = Field(None, max_length=256)
    shape: dict[str, Any] | None = None


class Progress(_Strict):
    done: int = Field(ge=0, le=1_000_000)
    total: int = Field(ge=0, le=1_000_000)
    note: str = Field("", max_length=500)
    at: float | None = _When


class DeployRequest(_Strict):
    """A deploy request as ``shipmate deploy`` (or anyone with write access) writes it."""

    id: str = Field(pattern=_ID)
    phase: Literal["requested"]
    strategy: str | None = Field(None, pattern=_NAME, max_length=63)
    image: str | None = Field(None, max_length=300)
    port: int | None = Field(None, ge=1, le=65535)
    by: str | None = Field(None, max_length=200)
    reason: str | None = Field(None, max_length=2000)
    requested_at: float | None = _When
    restore: str | None = Field(None, pattern=VERSION.pattern)
    "a rollback: the version (from the history) to run again"


def _stored_release(value: Any) -> Release:
    """A journal's ``from``/``to``: validated as :class:`StoredRelease`, held as a Release."""
    if isinstance(value, Release):
        return value
    stored = StoredRelease.model_validate(value)
    return Release(stored.image, stored.port, stored.version, stored.spec,
                   command=stored.command, env=stored.env, shape=stored.shape,
                   secret_env=tuple(stored.secret_env or ()))


JournalRelease = Annotated[Release, PlainValidator(_stored_release),
                           PlainSerializer(lambda release: release.to_json())]


class DeployJournal(DeployRequest):
    """A deploy's journal, as the acting agent wrote it (and the next one resumes).

    What strategies read as :attr:`Deployment.journal` and deploy events receive.
    ``from_`` and ``to`` (``from`` and ``to`` in the stored JSON) are the release being
    replaced and the one being installed, as the deploy began (a rollback does not swap
    them); ``desired`` is the count the deploy keeps; ``announce`` the versions the loop
    announces meanwhile (None: all); ``kept`` a version whose stopped instances are kept;
    ``progress`` the last :meth:`Deployment.progress`; ``error`` why it failed;
    ``strategy_state`` the strategy's own resume points (:meth:`Deployment.save_state`).
    """

    phase: Phase  # type: ignore[assignment]
    started_at: float | None = _When
    desired: int = Field(ge=0, le=100_000)
    from_: JournalRelease = Field(alias="from")
    to: JournalRelease
    announce: list[str] | None = Field(None, max_length=4)
    progress: Progress | None = None
    kept: str | None = None
    error: str | None = Field(None, max_length=20_000)
    strategy_state: dict[str, Any] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _legacy_state(cls, data: Any) -> Any:
        """A journal of an older agent: its strategy's keys at the top level (``step``,
        ``lb_before``, ``baking_since``) are read as ``strategy_state``."""
        state = data.get("strategy_state", {}) if isinstance(data, dict) else None
        if isinstance(state, dict) and any(k in data for k in LEGACY_STATE):
            data, state = dict(data), dict(state)
            for key in LEGACY_STATE:
                if key in data:
                    value = data.pop(key)
                    if value is not None:
                        state.setdefault(key, value)
            data["strategy_state"] = state
        return data

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> DeployJournal:
        """The typed journal of ``data`` (a journal as stored); ValidationError if it is not
        one."""
        return cls.model_validate_json(json.dumps(data))


def check_journal(text: str, runtime: Any, max_instances: int = 100_000) -> str | None:
    """Why the deploy key's ``text`` may not be acted on for ``runtime``'s service, or None.

    A request or journal is parsed by a strict model (no unknown fields, no strings for
    numbers); its image must be one the service allows (:func:`agent.releases.image_problem`),
    its count within the service's bounds, every version a version hash."""
    if len(text) > MAX_JOURNAL:
        return f"the deploy key holds {len(text)} bytes (at most {MAX_JOURNAL})"
    phase = parse_object(text).get("phase")
    model = DeployRequest if phase == "requested" else DeployJournal
    try:
        journal = model.model_validate_json(text)
    except ValidationError as exc:
        return "; ".join(_problem(e) for e in exc.errors()[:5])
    config = runtime.config
    problem = image_problem(config, journal.image)
    if problem:
        return problem
    if isinstance(journal, DeployJournal):
        problem = image_problem(config, journal.to.image)
        if problem:
            return f"to: {problem}"
        for name in [*(journal.announce or []), *([journal.kept] if journal.kept else [])]:
            if not VERSION.match(name):
                return f"{name[:40]!r} is not a version hash"
        policy = getattr(config, "policy", None)
        ceiling = min(max_instances, policy.max if policy is not None and policy.max is not None
                      else max_instances)
        if journal.desired > ceiling:
            return f"desired {journal.desired} is above the service's maximum ({ceiling})"
    return None


def _unreadable(text: str) -> str | None:
    """Why a journal's JSON ``text`` is not a :class:`DeployJournal`, or None."""
    try:
        DeployJournal.model_validate_json(text)
    except ValidationError as exc:
        return "; ".join(_problem(e) for e in exc.errors()[:3])
    return None


def _problem(error: Any) -> str:
    where = ".".join(str(part) for part in error.get("loc", ())) or "the value"
    return f"{where}: {error.get('msg', 'invalid')}"[:300]


class DeployError(Exception):
    """A deploy step failed; the message says which check, for the CLI to print."""


class LockLost(DeployError):
    """Another agent now owns the journal: stop without touching anything."""


class Interrupted(DeployError):
    """The agent is stopping: leave the journal for the next agent to resume."""


def request_deploy(store: Store, keys: Keys, service: str, *, image: str | None = None,
                   port: int | None = None, strategy: str | None = None, by: str,
                   reason: str, restore: str | None = None) -> dict[str, Any]:
    """Write a deploy request; DeployError if one is already in progress.

    ``restore`` names a recorded release's version to bring back (a rollback).
    """
    journal = {"id": uuid.uuid4().hex[:12], "phase": "requested", "strategy": strategy,
               "image": image, "port": port, "by": by, "reason": reason,
               "requested_at": time.time()}
    if restore is not None:
        journal["restore"] = restore
    key = keys.service(service, "deploy")
    if not store.create(key, json.dumps(journal)):
        current = store.get(key)
        phase = parse_object(current.value).get("phase", "?") if current else "?"
        if phase == REFUSED and current is not None and store.replace(
                key, json.dumps(journal), current.revision):
            return journal  # a refused request is only there to be read: replace it
        if phase in ("paused", "failed"):
            raise DeployError(f"the last deploy of {service} is {phase}: `shipmate rollback "
                              f"{service}` finishes it backwards, `shipmate abort {service}` "
                              "clears it (see `shipmate status`)")
        raise DeployError(f"a deploy of {service} is already in progress (phase {phase}); "
                          "follow it with `shipmate status`")
    return journal


def _release(data: dict[str, Any]) -> Release:
    release = parse_release(data)
    if release is None:
        raise DeployError(f"the journal holds no readable release: {str(data)[:80]}")
    return release


def follow_yaml(store: Store, keys: Keys, service: str, view: Any, wanted: Release) -> bool:
    """Keep the release in step with the YAML, for a service with no deploy running.

    Records the YAML's release if nothing is recorded and it runs; requests a
    deploy if the YAML changed since the release was made (unless that YAML's
    deploy rolled back: see :func:`agent.releases.config_deploy`).

    :returns: True if a deploy was requested.
    :raises DeployError, StoreError: as :func:`request_deploy` and the store do.
    """
    todo = config_deploy(view.release, wanted, [i.version for i in view.running])
    if todo == "record":
        record = wanted.to_json(by="config")
        if store.create(keys.service(service, "release"), json.dumps(record)):
            read = getattr(getattr(view, "state", None), "entries", None)  # this pass's read
            known = {} if read is None else {"current": read.get("history")}
            history.append(store, keys, service, "releases", _entry(
                record, None, wanted, {"result": "recorded", "reason": "running the YAML"}),
                **known)
        return False
    if todo == "deploy":
        request_deploy(store, keys, service, image=wanted.image, by="config",
                       reason="config changed")
        return True
    return False


def record_releases(store: Store, keys: Keys, todo: list[tuple[str, Any, Release]]) -> None:
    """Record the YAML's release of each ``(service, view, wanted)`` whose ``release`` key
    :func:`follow_yaml` would record, with its history entry, in batched writes
    (:meth:`agent.store.Store.create_many`): a first start of 10,000 services is a few
    hundred round trips, not 20,000. A key written meanwhile by another is left alone.

    :raises StoreError: as the store does (what was written stays written).
    """
    records = {service: wanted.to_json(by="config") for service, _, wanted in todo}
    created = store.create_many({keys.service(service, "release"): json.dumps(record)
                                 for service, record in records.items()})
    fresh, appended = {}, []
    for service, view, wanted in todo:
        if keys.service(service, "release") not in created:
            continue
        entry = _entry(records[service], None, wanted,
                       {"result": "recorded", "reason": "running the YAML"})
        read = getattr(getattr(view, "state", None), "entries", None)  # this pass's read
        if read is not None and "history" not in read:
            fresh[service] = entry
        else:
            appended.append((service, entry, {} if read is None else {
                "current": read.get("history")}))
    made = store.create_many({keys.service(service, "history"): json.dumps(
        {"releases": [entry]}, separators=(",", ":")) for service, entry in fresh.items()})
    appended += [(service, entry, {}) for service, entry in fresh.items()
                 if keys.service(service, "history") not in made]  # one appeared meanwhile
    for service, entry, known in appended:
        history.append(store, keys, service, "releases", entry, **known)


def _entry(record: dict[str, Any], old: Release | None, new: Release,
           outcome: dict[str, Any]) -> dict[str, Any]:
    """A history entry for ``record`` (a release as stored) and its outcome."""
    from agent.leader import agent_id

    me = agent_id()
    keep = ("version", "image", "port", "command", "env", "secret_env", "shape", "spec",
            "when", "by")
    changed = history.changes(old, new)
    if outcome.get("request") == "rollback":
        changed = f"rollback: {changed}"
    return {**{k: record[k] for k in keep if k in record}, "changed": changed,
            "agent": f"{me['host']}:{me['pid']}", "result": outcome.get("result"),
            "reason": outcome.get("reason", ""), "deploy": outcome.get("id")}


@dataclass
class Journal:
    """The journal as last written, and its revision (shared by a deploy and its reverse)."""

    data: dict[str, Any]
    revision: int


@dataclass
class Deployment:
    """What a strategy works with: one service, its two releases, and safe steps.

    A strategy reaches the service only through these methods: :meth:`instances`,
    :meth:`healthy`, :meth:`start`, :meth:`stop`, :meth:`park`..., :meth:`announce`,
    :meth:`withdraw`, :meth:`sleep`, :meth:`progress`, :meth:`save_state`. Each checks
    that the agent still owns the journal (else :class:`LockLost`) and is not stopping
    (else :class:`Interrupted`); a strategy lets both through, never catches them.

    :attr:`source` (also :attr:`release_from`) is the release being replaced,
    :attr:`target` (:attr:`release_to`) the one being installed (swapped by
    :meth:`reversed` for a rollback), :attr:`desired` the count to keep.
    """

    runtime: Any  # agent.reconcile.ServiceRuntime: the core's, never a strategy's to use
    store: Store
    keys: Keys
    record: Journal
    source: Release
    target: Release
    desired: int
    emit: Callable[..., None] = lambda *a, **k: None
    grace: float = 10.0
    stopping: threading.Event = field(default_factory=threading.Event)
    leading: Callable[[], bool] = lambda: True
    port_problem: Callable[[str, int], str | None] = lambda service, port: None
    "why a slot may not listen on a port (another service's, past 65535), or None"
    _checked: float = 0.0

    @property
    def service(self) -> str:
        """The service's name in the YAML."""
        return self.runtime.name

    @property
    def data(self) -> dict[str, Any]:
        """The journal as stored (a dict; the runner's): strategies read :attr:`journal`."""
        return self.record.data

    @property
    def journal(self) -> DeployJournal:
        """The journal as last written, typed (phase, from, to, desired, strategy_state...)."""
        return DeployJournal.of(self.record.data)

    @property
    def revision(self) -> int:
        """The store revision of the journal as last written."""
        return self.record.revision

    @property
    def config(self) -> Any:
        """The strategy's config block (its ``Config`` model), defaults filled in."""
        return self.runtime.strategy.config

    @property
    def release_from(self) -> Release:
        """The release being replaced (the target, in a rollback's :meth:`reversed`)."""
        return self.source

    @property
    def release_to(self) -> Release:
        """The release being installed (the old one, in a rollback's :meth:`reversed`)."""
        return self.target

    @property
    def phase(self) -> Phase:
        """The journal's phase: ``running`` forward, ``rolling-back`` backward."""
        return Phase(self.record.data["phase"])

    @property
    def state(self) -> dict[str, Any]:
        """The strategy's own resume points, as last saved by :meth:`save_state` (a copy;
        an older agent's top-level ``step``, ``lb_before``, ``baking_since`` included)."""
        data = self.record.data
        state = dict(data.get("strategy_state") or {})
        for key in LEGACY_STATE:
            if data.get(key) is not None:
                state.setdefault(key, data[key])
        return state

    @property
    def parallelism(self) -> int:
        """How many starts or stops the service's actuator takes at once."""
        return max(1, int(getattr(self.runtime.actuator, "parallelism", 1) or 1))

    @property
    def can_park(self) -> bool:
        """Whether the actuator keeps stopped instances (:class:`agent.Parking`)."""
        return can_park(self.runtime.actuator)

    def reversed(self) -> Deployment:
        """The same deploy pointed back at the old release (for rollbacks)."""
        return replace(self, source=self.target, target=self.source)

    # ------------------------------------------------------------- journal
    def save(self, **changes: Any) -> None:
        """Update the journal by compare-and-set; LockLost if another agent owns it.

        The runner's: a strategy writes with :meth:`save_state`."""
        self.check()
        journal = {**self._migrated(), **changes}
        text = json.dumps(journal)
        if journal.get("phase") in (Phase.RUNNING, Phase.ROLLING_BACK):  # what is resumed
            problem = (f"{len(text)} bytes (at most {MAX_JOURNAL})" if len(text) > MAX_JOURNAL
                       else _unreadable(text))
            if problem is not None:
                raise DeployError(f"not saved: the next agent could not resume the journal "
                                  f"of {self.service} ({problem})")
        key = self.keys.service(self.service, "deploy")
        if not self.store.replace(key, text, self.revision):
            raise LockLost(f"the deploy journal of {self.service} was changed by someone else")
        entry = self.store.get(key)
        if entry is None or entry.value != text:  # someone wrote in between
            raise LockLost(f"the deploy journal of {self.service} was changed by someone else")
        self.record.data, self.record.revision = journal, entry.revision

    def _migrated(self) -> dict[str, Any]:
        """The stored journal with an older agent's top-level strategy keys moved under
        ``strategy_state`` (what the next write stores)."""
        data = self.record.data
        if not any(key in data for key in LEGACY_STATE):
            return dict(data)
        state = self.state
        return {**{k: v for k, v in data.items() if k not in LEGACY_STATE},
                "strategy_state": state}

    def save_state(self, *, announce: Sequence[str] | None = None, kept: str | None = None,
                   **state: Any) -> None:
        """Record the strategy's resume points in one write (compare-and-set).

        :param state: keys merged into ``strategy_state`` (JSON values; None removes a
            key), read back by :attr:`state` when the deploy resumes, here or on the next
            acting agent.
        :param announce: if given, the versions the loop announces from now on (blue/green
            holds the new color back until its switch).
        :param kept: if given, a version whose stopped instances are kept for an instant
            rollback (see :meth:`park`); a finished deploy records it in ``release``.
        :raises LockLost, Interrupted: as every step.
        """
        merged = {k: v for k, v in {**self.state, **state}.items() if v is not None}
        changes: dict[str, Any] = {"strategy_state": merged}
        if announce is not None:
            changes["announce"] = list(announce)
        if kept is not None:
            changes["kept"] = kept
        self.save(**changes)

    def progress(self, done: int, total: int, note: str) -> None:
        """Record progress (``done`` of ``total`` instances, and a note for ``shipmate
        status``) and tell observers (``shipmate_deploy_progressed``)."""
        self.save(progress={"done": done, "total": total, "note": note[:500], "at": time.time()})
        self.emit("shipmate_deploy_progressed", service=self.service, deploy=self.journal)
        log.info("%s: deploy %s: %s (%d/%d)", self.service, self.data["id"], note, done, total)

    def check(self) -> None:
        """Raise Interrupted if the agent is stopping or no longer acts for the cluster, and
        LockLost if someone else changed the journal (``shipmate abort``; read once a second)."""
        if self.stopping.is_set():
            raise Interrupted("the agent is stopping; the next agent resumes this deploy")
        if not self.leading():
            raise Interrupted("this agent no longer leads; the acting agent resumes this deploy")
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            entry = self.store.get(self.keys.service(self.service, "deploy"))
            if entry is None or entry.revision != self.revision:
                raise LockLost(f"the deploy journal of {self.service} was changed by someone "
                               "else (aborted?)")

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a pause between batches, a bake), but no longer than the agent
        runs: Interrupted at once when it stops, LockLost if the journal changed."""
        self.check()
        if self.stopping.wait(max(0.0, seconds)):
            raise Interrupted("the agent is stopping; the next agent resumes this deploy")
        self.check()

    # ------------------------------------------------------------- instances
    def instances(self) -> list[Instance]:
        """This service's instances as the actuator reports them now, running or not."""
        return [i for i in self.runtime.actuator.list() if i.service == self.service]


    def healthy(self, instance: Instance) -> bool:
        """Whether ``instance`` passes the service's health check now (an error: no)."""
        try:
            return bool(self.runtime.actuator.healthy(instance, self.runtime.config.health))
        except Exception:  # noqa: BLE001 - a failing check is an unhealthy instance
            return False

    def start(self, slot: int, release: Release | None = None) -> Instance:
        """Start ``slot`` of ``release`` (default: the target) and return it, not yet
        healthy (see :meth:`wait_healthy`); DeployError if its port is not the service's."""
        self.check()
        spec = self.runtime.spec(slot, release or self.target)
        problem = self.port_problem(self.service, spec.port) if spec.port is not None else None
        if problem:
            raise DeployError(f"slot {slot}: {problem}")
        instance = self.runtime.actuator.start(spec)
        self.emit("shipmate_instance_started", instance=instance)
        return instance

    def stop(self, instance: Instance, reason: str = "deploy") -> None:
        """Withdraw ``instance`` from discovery, wait the drain, then stop and remove it."""
        self.retire([(instance, reason)])

    def stop_all(self, instances: list[Instance], reason: str = "deploy") -> None:
        """Withdraw ``instances``, wait the drain once, then stop each: a batch drains together."""
        self.retire([(instance, reason) for instance in instances])

    def park(self, instance: Instance) -> None:
        """Withdraw ``instance`` from discovery, wait the drain, then stop it but keep it, for
        :meth:`unpark` (only where :attr:`can_park`; name its version with
        ``save_state(kept=...)`` so the loop leaves it alone)."""
        self.retire([(instance, None)])

    def retire(self, jobs: list[tuple[Instance, str | None]], parallel: int = 1) -> None:
        """Withdraw every instance of ``jobs`` from discovery, wait the announcer's drain once
        (if any of them runs), then stop each with its reason, or park it where the reason
        is None; ``parallel`` at a time. The first failure is raised once all were tried."""
        self.check()
        reasons = {instance.name: reason for instance, reason in jobs}
        actuator = self.runtime.actuator
        if any(r is None for r in reasons.values()) and not isinstance(actuator, Parking):
            raise DeployError(f"the {actuator.type_name} actuator cannot keep stopped instances")

        def stop(instance: Instance) -> None:
            reason = reasons[instance.name]
            if reason is None:
                actuator.park(instance, self.grace)
            else:
                actuator.stop(instance, self.grace)
            self.emit("shipmate_instance_stopped", instance=instance, reason=reason or "kept")

        withdraw_then_stop(self.runtime, [instance for instance, _ in jobs], self.grace,
                           stop=stop, before_stop=self.check, parallel=parallel)

    def unpark(self, instance: Instance) -> Instance:
        """Start a parked instance again and return it (not yet healthy)."""
        self.check()
        actuator = self.runtime.actuator
        if not isinstance(actuator, Parking):
            raise DeployError(f"the {actuator.type_name} actuator cannot keep stopped instances")
        started = actuator.unpark(instance)
        self.emit("shipmate_instance_started", instance=started)
        return started

    def kept(self) -> set[str]:
        """Versions whose stopped instances are kept: ``kept`` in ``release`` and the journal."""
        entry = self.store.get(self.keys.service(self.service, "release"))
        found = ((parse_object(entry.value) if entry else {}).get("kept"), self.data.get("kept"))
        return {v for v in found if isinstance(v, str)}

    # ------------------------------------------------------------- discovery
    def announce(self, *instances: Instance) -> None:
        """Announce ``instances`` now (they passed their health check), unless the journal's
        ``announce`` holds their version back (blue/green before its switch). A failure is
        logged, not raised: the loop's next pass announces them too."""
        announcer, shown = self.runtime.announcer, self.data.get("announce")
        if announcer is None:
            return
        for instance in instances:
            if shown is not None and instance.version not in shown:
                continue
            try:
                announcer.announce(instance)
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: cannot announce %s now (the next pass will): %s",
                            self.service, instance.name, exc)

    def withdraw(self, *instances: Instance) -> None:
        """Remove ``instances``' announcements now, without stopping them (:meth:`stop`
        withdraws, drains and stops in one). A failure is logged, not raised."""
        self.check()
        announcer = self.runtime.announcer
        if announcer is None:
            return
        for instance in instances:
            try:
                announcer.withdraw(instance)
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: cannot withdraw %s now: %s", self.service, instance.name, exc)

    def wait_healthy(self, instances: list[Instance], timeout: float) -> None:
        """Wait until every one of ``instances`` passes its health check; announce each as
        soon as it passes (:meth:`announce`), before the caller withdraws anything old.

        :raises DeployError: naming the instances that did not, and the check.
        """
        deadline = time.monotonic() + timeout
        waiting = {i.name for i in instances}
        while waiting:
            self.check()
            now = {i.name: i for i in self.instances()}
            exited = [name for name in waiting if name in now and not now[name].running]
            gone = [name for name in waiting if name not in now]
            if exited or gone:
                raise DeployError(f"{', '.join(sorted(exited + gone))} exited before passing "
                                  f"its health check ({self.check_text()})")
            passed = [now[name] for name in waiting if self.healthy(now[name])]
            self.announce(*passed)
            waiting -= {i.name for i in passed}
            if waiting and time.monotonic() > deadline:
                raise DeployError(f"{', '.join(sorted(waiting))} not healthy after "
                                  f"{timeout:g}s ({self.check_text()})")
            if waiting:
                self.sleep(0.2)

    def check_text(self) -> str:
        """The service's health check in words, for error messages."""
        health = self.runtime.config.health
        if health is None:
            return "no health check: the instance must keep running"
        return f"GET {health.http}" if health.http else "TCP connect"


class DeployRunner:
    """Runs the deploys of the acting agent, one thread per service."""

    def __init__(self, *, store: Store, keys: Keys, emit: Callable[..., None],
                 strategies: Callable[[str, str | None], Strategy], grace: float,
                 leading: Callable[[], bool] = lambda: True,
                 wake: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 ceiling: Callable[[], int] = lambda: 100_000,
                 port_problem: Callable[[str, int], str | None] = lambda s, p: None) -> None:
        self.store, self.keys, self.emit, self.grace = store, keys, emit, grace
        self.strategies, self.leading, self.wake, self.clock = strategies, leading, wake, clock
        self.ceiling, self.port_problem = ceiling, port_problem
        "no deploy runs more than ``ceiling()`` instances, nor on another service's ports"
        self.threads: dict[str, threading.Thread] = {}
        self.stopping = threading.Event()
        self.broken: dict[str, tuple[str, int, float]] = {}
        "service -> (what is wrong, failures, next try): a journal the runner cannot use"

    def busy(self, service: str) -> bool:
        thread = self.threads.get(service)
        return thread is not None and thread.is_alive()

    def launch(self, runtime: Any, view: Any) -> str | None:
        """Start (or resume) the deploy in ``view.deploy`` unless it already runs here.

        A journal that could not be run is retried after a delay doubling from 1 s
        to 5 min; meanwhile this returns what is wrong with it (a problem for status).
        """
        name = runtime.name
        broken = self.broken.get(name)
        if broken is not None and self.clock() < broken[2]:
            return broken[0]
        phase = view.deploy.get("phase")
        if self.busy(name) or (phase in KNOWN and phase not in ACTIVE):
            return None  # garbage (no known phase) is run too: to be marked refused
        thread = threading.Thread(target=self._run, args=(runtime, view), daemon=True,
                                  name=f"deploy-{name}")
        self.threads[name] = thread
        thread.start()
        return None

    def _broken(self, service: str, what: str) -> None:
        failures = self.broken.get(service, ("", 0, 0.0))[1] + 1
        delay = min(2.0 ** (failures - 1), 300.0)
        key = self.keys.service(service, "deploy")
        self.broken[service] = (f"deploy journal {key} cannot be run: {what}", failures,
                                self.clock() + delay)
        log.error("%s: deploy journal %s cannot be run: %s; next try in %.0fs", service, key,
                  what, delay)

    def stop(self, timeout: float = 1.0) -> None:
        """Tell running deploys to stop where they are; wait ``timeout`` in all. A deploy
        still busy (a slow start) is left to its daemon thread: its journal resumes."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads.values():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------- one deploy
    def _run(self, runtime: Any, view: Any) -> None:
        try:
            self.execute(runtime, view)
            self.broken.pop(runtime.name, None)
        except (LockLost, Interrupted) as exc:
            log.warning("%s: deploy left as it is: %s", runtime.name, exc)
        except StoreError as exc:
            log.warning("%s: deploy paused, the store is unreachable: %s", runtime.name, exc)
        except Exception as exc:  # noqa: BLE001 - a bad journal is one problem, not a loop
            self._broken(runtime.name, f"{type(exc).__name__}: {exc}")
        finally:
            self.wake()

    def execute(self, runtime: Any, view: Any) -> None:
        """Begin, resume or roll back the deploy of one service, to the end."""
        key = self.keys.service(runtime.name, "deploy")
        entry = self.store.get(key)
        if entry is None:
            return
        journal = parse_object(entry.value)
        phase = journal.get("phase")
        if phase in KNOWN and phase not in ACTIVE:
            return
        if phase in ACTIVE:
            problem = check_journal(entry.value, runtime, self.ceiling())
        elif journal:
            problem = f"phase {str(phase)[:40]!r} is not a deploy phase"
        else:
            problem = "the deploy key does not hold a JSON object"
        if problem is not None:
            self._refuse(runtime.name, key, entry, journal, problem)
            return
        try:
            strategy = self.strategies(runtime.name, journal.get("strategy"))
        except Exception as exc:  # noqa: BLE001 - say so once, in the journal, not every pass
            failed = {**journal, "phase": "failed",
                      "error": f"cannot run strategy {journal.get('strategy')!r}: {exc}"}
            self.store.replace(key, json.dumps(failed), entry.revision)
            log.error("%s: %s", runtime.name, failed["error"])
            return
        runtime = replace(runtime, strategy=strategy)
        deploy = Deployment(runtime=runtime, store=self.store, keys=self.keys,
                            record=Journal(journal, entry.revision), source=runtime.release(view),
                            target=runtime.release(view), desired=0, emit=self.emit,
                            grace=self.grace, stopping=self.stopping, leading=self.leading,
                            port_problem=self.port_problem)
        if journal["phase"] == "requested":
            try:
                self._begin(deploy, view)
            except DeployError as exc:
                if deploy.data.get("phase") != "failed":
                    raise
                log.error("%s: %s", runtime.name, exc)
                return
        else:
            deploy.source = _release(journal["from"])
            deploy.target = _release(journal["to"])
            deploy.desired = min(int(journal["desired"]), self.ceiling())
            log.info("%s: resuming deploy %s at phase %s", runtime.name, journal["id"],
                     journal["phase"])
        phase = deploy.data["phase"]
        if phase in ("finished", "rolled-back"):  # the last agent died recording the end
            self._finish(deploy, phase, deploy.data.get("error", ""))
            return
        if deploy.source.version == deploy.target.version:
            self._finish(deploy, "finished", "already running this release")
            return
        if phase == "running":
            try:
                strategy.run(deploy)
            except (LockLost, Interrupted):
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: roll back or pause
                reason = (str(exc) or type(exc).__name__)[:5000]
                log.error("%s: deploy %s failed: %s", runtime.name, journal["id"], reason)
                if getattr(strategy.config, "on_failure", "rollback") == "pause":
                    deploy.save(phase="paused", error=reason)
                    return
                deploy.save(phase="rolling-back", error=reason,
                            announce=[deploy.source.version, deploy.target.version])
            else:
                self._finish(deploy, "finished")
                return
        reason = deploy.data.get("error") or "rolled back"
        try:
            strategy.rollback(deploy, reason)
        except (LockLost, Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001
            deploy.save(phase="failed",
                        error=f"{reason}; the rollback failed too: {str(exc)[:5000]}")
            log.error("%s: rollback failed: %s; scaling stays paused until the deploy key "
                      "is removed", runtime.name, exc)
            return
        self._finish(deploy, "rolled-back", reason)

    def _refuse(self, service: str, key: str, entry: Any, journal: dict[str, Any],
                problem: str) -> None:
        """Mark the deploy key refused (compare-and-set) with the reason; nothing else."""
        marked = {"id": journal.get("id") if isinstance(journal.get("id"), str) else None,
                  "phase": REFUSED, "error": f"refused: {problem}", "refused_at": time.time(),
                  "was": str(journal.get("phase"))[:20]}
        if self.store.replace(key, json.dumps(marked), entry.revision):
            log.error("%s: deploy key refused, nothing done: %s", service, problem)

    def _begin(self, deploy: Deployment, view: Any) -> None:
        journal, runtime = deploy.data, deploy.runtime
        current = deploy.source
        if journal.get("restore"):
            recorded = parse_release(history.find_release(
                self.store, self.keys, runtime.name, str(journal["restore"])))
            if recorded is None:
                deploy.save(phase="failed", error=f"no release {journal['restore']} is "
                            "recorded to roll back to")
                raise DeployError(deploy.data["error"])
            port = runtime.strategy.target_port(current.port, recorded.port)
            deploy.target = restore_release(recorded, runtime.config, port)
        else:
            port = journal.get("port")
            if port is None:
                port = runtime.strategy.target_port(current.port, runtime.config.port)
            image = journal.get("image") or current.image
            deploy.target = make_release(runtime.config, image=image, port=port)
        running = len(view.running)
        deploy.desired = min(view.effective if view.effective is not None else running,
                             self.ceiling())
        deploy.save(phase="running", started_at=time.time(), desired=deploy.desired,
                    strategy=runtime.strategy.type_name,
                    **{"from": current.to_json(), "to": deploy.target.to_json()},
                    announce=[current.version, deploy.target.version])
        self.emit("shipmate_deploy_started", service=runtime.name, deploy=deploy.journal)
        log.info("%s: deploy %s started: %s -> %s (%s, %d instances)", runtime.name,
                 journal["id"], current.label, deploy.target.label,
                 runtime.strategy.type_name, deploy.desired)

    def _finish(self, deploy: Deployment, result: str, reason: str = "") -> None:
        """Record the outcome in ``release``, then remove the journal.

        The journal is saved first (compare-and-set), so only its owner gets
        here; if the agent dies between the two writes, the next one resumes a
        deploy that has nothing left to do and finishes it again.
        """
        if deploy.data["phase"] != result:
            deploy.save(phase=result)
        live = deploy.target if result == "finished" else deploy.source
        outcome = {"id": deploy.data["id"], "result": result, "reason": reason}
        release_key = self.keys.service(deploy.service, "release")
        entry = self.store.get(release_key)
        current = parse_object(entry.value) if entry else {}
        same = deploy.source.version == deploy.target.version
        # never the release itself as its own previous: a no-op deploy keeps the one before
        previous = (deploy.source.to_json() if result == "finished" and not same
                    else current.get("previous"))
        # stopped instances kept for an instant rollback: the deploy's, or (rolled back) as before
        kept = deploy.data.get("kept") if result == "finished" else current.get("kept")
        extra = {"kept": kept} if isinstance(kept, str) and kept != live.version else {}
        # a YAML whose deploy rolled back, or that ops rolled back from, is not deployed again
        # until it changes again
        yaml_spec = deploy.runtime.yaml_release.spec
        if (result == "rolled-back" or deploy.data.get("restore")) and yaml_spec != live.spec:
            extra["held"] = yaml_spec
        elif same and current.get("held"):
            extra["held"] = current["held"]
        record = live.to_json(by=deploy.data.get("by"), deploy=outcome, previous=previous,
                              **extra)
        value = json.dumps(record)
        written = (self.store.replace(release_key, value, entry.revision) if entry
                   else self.store.create(release_key, value))
        if not written:
            raise LockLost(f"the release of {deploy.service} changed while the deploy ended; "
                           "the next pass records it again")
        if not self.store.delete(self.keys.service(deploy.service, "deploy"), deploy.revision):
            raise LockLost(f"the deploy journal of {deploy.service} changed as it ended")
        if not same:
            history.append(self.store, self.keys, deploy.service, "releases", _entry(
                deploy.target.to_json(by=deploy.data.get("by")), deploy.source,
                deploy.target, {**outcome, "request": deploy.data.get("reason")}))
        if result == "finished":
            self.emit("shipmate_deploy_finished", service=deploy.service, deploy=deploy.journal)
        else:
            self.emit("shipmate_deploy_rolled_back", service=deploy.service,
                      deploy=deploy.journal, reason=reason)
        log.info("%s: deploy %s %s%s", deploy.service, deploy.data["id"], result,
                 f": {reason}" if reason else "")
