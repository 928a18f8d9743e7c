"""The reconcile pass: compare what should run with what runs, and act.

One pass costs one prefix read of the store (every service's desired,
override, release and deploy keys at once) and one ``list`` per distinct
actuator, whatever the number of services. Then, per service:

- effective desired = ``override`` if present, else ``desired``; absent or
  unreadable means *unknown*, and nothing is stopped or started by count;
- a service with a ``deploy`` key is left to its deploy, which owns its instances;
- exited instances are removed and their slots started again, except those
  *kept* for an instant rollback (blue/green's ``keep_old``): stopped
  instances of the version named ``kept`` in the ``release`` key or in the
  deploy journal are neither removed nor counted;
- slots ``0 .. n-1`` that do not run are started; instances on slots ``>= n``
  (and the older of two instances on one slot) are stopped, highest slot first,
  each withdrawn from discovery before it is stopped;
- healthy instances are announced, everything else de-announced.

Health comes from :class:`agent.probes.Prober` when the loop runs one: the
pass tells it what runs and reads its latest results (an instance not probed
yet is not healthy yet, and its service's announcements are left as they are
until it is), so no pass waits for a probe. Without one (``shipmate status``,
``run --once``) each pass probes every running instance itself.

If the store cannot be read the pass does nothing at all: losing the store
freezes changes, it never stops what runs.

A pass costs what changed (issue 16). What a service's keys say is parsed once per
set of key revisions (:class:`StoreState`) and reused while those revisions hold.
Once the agent feeds the store watch to :meth:`Reconciler.store_changed`, a pass
re-reads only the services the watch named since the last read (one prefix read of
each), plus those with a deploy key; everything else is checked at the full
resync, every ``resync`` seconds (``agent.resync``) and after the watch resynced
(an empty event list: it may have missed changes): one keys-only read
(:meth:`Store.get_revisions`, no values sent), then a read of each service whose
revisions differ. When too many services changed for single reads to be cheaper,
one read of every key and value. With no watch fed (``--once``, the CLI)
every pass reads everything. :meth:`Reconciler.observe_changed` looks at only the
services the watch named, so the loop can hand out their starts first.

Views are incremental too: an observe makes new views only of the services that
may have changed (:attr:`Reconciler.fresh`: keys re-read or of new revisions, a
different list from their actuator, a health change, or left unsettled by the
last pass); the rest keep the view the last pass handled.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from agent.counted import counted
from agent.instances import (
    LABEL_CLUSTER,
    LABEL_SERVICE,
    LABEL_SLOT,
    LABEL_VERSION,
    Instance,
    InstanceSpec,
    fill,
    instance_name,
)
from agent.keys import Keys, load_json, parse_count
from agent.kinds import Actuator, Announcer, Source, Strategy
from agent.probes import Prober
from agent.releases import Release, make_release, parse_release, release_problem
from agent.store import Entry, Store

log = logging.getLogger("shipmate.reconcile")


@dataclass
class ServiceRuntime:
    """One configured service with the plugin objects that serve it."""

    name: str
    config: Any
    cluster: str
    source: Source
    actuator: Actuator
    announcer: Announcer | None
    strategy: Strategy | None = None

    @cached_property
    def yaml_release(self) -> Release:
        """The release the YAML describes (its first port chosen by the strategy)."""
        port = self.strategy.initial_port(self.config.port) if self.strategy else None
        return make_release(self.config, port=port)

    def release(self, view: ServiceView | None) -> Release:
        """The release to run: the one recorded in the store, else the YAML's."""
        if view is not None and view.state is not None and view.state.release is view.release:
            return view.state.target or self.yaml_release
        return (parse_release(view.release) if view else None) or self.yaml_release

    def spec(self, slot: int, release: Release) -> InstanceSpec:
        """The spec of ``slot``'s instance of ``release``, with ``{port}`` and friends filled in."""
        c = self.config
        command = release.command_for(c)
        port = release.port + slot if release.port is not None else None
        name = instance_name(self.cluster, self.name, slot, release.version)
        values = {"port": port, "instance": name, "service": self.name, "slot": slot,
                  "image": release.image or ""}
        labels = {LABEL_CLUSTER: self.cluster, LABEL_SERVICE: self.name,
                  LABEL_VERSION: release.version, LABEL_SLOT: str(slot)}
        return InstanceSpec(
            cluster=self.cluster, service=self.name, slot=slot, version=release.version,
            name=name, port=port, image=release.image,
            # the release's own command and env (a rollback restores them), else the YAML's
            command=[fill(part, **values) for part in command] if command else None,
            env={k: fill(v, **values) for k, v in release.env_for(c).items()}, labels=labels,
        )


@dataclass(frozen=True)
class Action:
    """One start or stop the pass decided on."""

    verb: str  # "start" | "stop"
    service: str
    slot: int
    reason: str
    instance: Instance | None = None  # what a stop stops
    spec: InstanceSpec | None = None  # what a start starts

    def __str__(self) -> str:
        what = self.instance.name if self.instance else f"slot {self.slot}"
        return f"{self.verb} {self.service} {what}: {self.reason}"


@dataclass
class ServiceView:
    """What one pass saw of a service (``shipmate status`` shows it)."""

    name: str
    desired: int | None = None
    override: int | None = None
    release: dict[str, Any] | None = None
    deploy: dict[str, Any] | None = None
    instances: list[Instance] = field(default_factory=list)
    healthy: list[Instance] = field(default_factory=list)
    unprobed: set[str] = field(default_factory=set)
    "running instances whose health is not known yet (neither healthy nor unhealthy)"
    problems: list[str] = field(default_factory=list)
    listed: bool = True

    override_invalid: bool = False
    "an override key exists but holds no count: the count is unknown, not the desired one"
    reported: dict[str, Any] | None = None
    "what the acting agent recorded in the ``problems`` key (crash loops, unhealthy since)"
    refused: str | None = None
    "why the store's release may not run (the service is then left as it is)"
    state: Any = field(default=None, repr=False, compare=False)
    "the :class:`StoreState` this view was made from (its parse is reused)"
    _running: Any = field(default=None, repr=False, compare=False)

    @property
    def effective(self) -> int | None:
        if self.override_invalid:
            return None
        return self.override if self.override is not None else self.desired

    @property
    def running(self) -> list[Instance]:
        memo = self._running  # a pass asks often; the instances only grow while observed
        instances = self.instances
        if memo is None or memo[0] is not instances or memo[1] != len(instances):
            memo = self._running = (instances, len(instances),
                                    [i for i in instances if i.running])
        return memo[2]

    @property
    def kept(self) -> set[str]:
        """Versions whose stopped instances are kept (``kept`` in the release or the journal)."""
        return {v for v in ((self.release or {}).get("kept"), (self.deploy or {}).get("kept"))
                if isinstance(v, str)}

    @property
    def exited(self) -> list[Instance]:
        """Stopped instances that are not kept: to be removed (and their slots restarted)."""
        kept = self.kept
        return [i for i in self.instances if not i.running and i.version not in kept]


def _json(entry: Entry | None, what: str, problems: list[str]) -> dict[str, Any] | None:
    if entry is None:
        return None
    try:
        value = load_json(entry.value)
        if isinstance(value, dict):
            return value
    except ValueError as exc:
        problems.append(f"{what} key {entry.key} is not usable JSON: {exc}")
        return {"invalid": entry.value[:80]}
    problems.append(f"{what} key {entry.key} does not hold a JSON object")
    return {"invalid": entry.value[:80]}


def _count(entry: Entry | None, problems: list[str]) -> int | None:
    if entry is None:
        return None
    count = parse_count(entry.value)
    if count is None:
        problems.append(f"{entry.key} holds {entry.value[:20]!r}, not a count: treated as unknown")
    return count


@dataclass
class StoreState:
    """What one service's keys say, parsed once per set of key revisions."""

    revisions: tuple[tuple[str, int], ...]
    desired: int | None
    override: int | None
    release: dict[str, Any] | None
    deploy: dict[str, Any] | None
    reported: dict[str, Any] | None
    override_invalid: bool
    refused: str | None
    problems: tuple[str, ...]
    target: Release | None = None
    "the parsed ``release`` (None: absent or malformed, the YAML's is run)"
    entries: dict[str, Entry] | None = field(default=None, repr=False, compare=False)
    "the read this was parsed from (the same read again needs no comparison)"

    def view(self, name: str) -> ServiceView:
        """A fresh view of this state (a pass adds instances and problems to it)."""
        return ServiceView(name, desired=self.desired, override=self.override,
                           release=self.release, deploy=self.deploy,
                           problems=list(self.problems), reported=self.reported,
                           override_invalid=self.override_invalid, refused=self.refused,
                           state=self)


def _revisions(got: dict[str, Entry]) -> tuple[tuple[str, int], ...]:
    # a prefix read gives keys in order: no sort needed to compare two reads
    return tuple([(f, e.revision) for f, e in got.items() if f not in _UNREAD])


_UNREAD = ("policy", "history")  # keys a pass never looks at: their writes change nothing
FULL_READ_SHARE = 0.05  # more services changed than this share: one full read is cheaper
FULL_READ_MIN = 20  # ... and never fewer than this many single reads


class Reconciler:
    """Observes, plans and applies one pass over every service.

    Built with its dependencies as keyword arguments so that tests can hand it
    a real store and fresh plugin objects.
    """

    def __init__(self, *, services: dict[str, ServiceRuntime], store: Store, keys: Keys,
                 emit: Callable[..., None] = lambda *a, **k: None, grace: float = 10.0,
                 health_workers: int = 16, ceiling: int = 100, limit: int = 64,
                 resync: float = 300.0, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 prober: Prober | None = None,
                 announcing: threading.Lock | None = None) -> None:
        self.services = services
        self.store = store
        self.keys = keys
        self.emit = emit
        self.grace = grace
        self.health_workers = health_workers
        self.ceiling = ceiling
        "no service runs more instances than this (``agent.max_instances``)"
        self.limit = limit
        "no pass plans more actions than this per service"
        self.unowned: dict[str, Instance] = {}
        "instances of this cluster that no configured service owns: left alone, reported"
        self.prober = prober
        "probes health off the pass (None: :meth:`observe` probes every instance itself)"
        self.announcing = announcing or threading.Lock()
        "held by each announcer sync, so that the later one works from the later results"
        self.views: dict[str, ServiceView] = {}
        "what the last :meth:`observe` saw"
        self.resync = resync
        "seconds between comparisons of every key's revision (the watch may have missed one)"
        self.interval = interval
        "seconds between syncs of every service's announcements (:attr:`full`)"
        self._synced_all = -math.inf  # when every announcement was last synced
        self.clock = clock
        self._states: dict[str, StoreState] = {}  # service -> its keys as last parsed
        self._entries: dict[str, dict[str, Entry]] = {}  # service -> its keys as last read
        self._watched = False  # a store watch feeds store_changed
        self._dirty: set[str] = set()  # services the watch named since the last read
        self._full = True  # the next observe reads every key
        self._last_full = -math.inf
        self._dirty_lock = threading.Lock()
        self.full_reads = 0
        "how many observes read the whole prefix (the rest read only what changed)"
        self._actuators: dict[Actuator, set[str]] | None = None
        self._lists: dict[Actuator, list[Instance]] = {}  # listed by observe_changed
        self._settled: dict[str, tuple[Any, ...]] = {}
        "service -> (its store state, its instances) when its last plan was empty"
        self._order = {name: i for i, name in enumerate(services)}  # the YAML's order
        self._with_deploy: set[str] = set()  # services whose keys hold a deploy journal
        self._listed: dict[Actuator, list[tuple[Instance, Any]]] = {}  # each one's last list
        self._grouped: dict[Actuator, dict[str, list[Instance]]] = {}  # ... by service
        self._unowned_by: dict[Actuator, dict[str, Instance]] = {}
        self._touched: set[str] = set()  # services to look at again (any thread adds)
        self._revisit: set[str] = set()  # services the last pass left unsettled
        self._everything = False  # the next observe makes every view anew
        self.fresh: dict[str, ServiceView] = {}
        "the views the last :meth:`observe` made anew (the others are the earlier ones)"
        self.full = True
        "whether every announcement is to be synced (every ``interval``, and at a resync)"

    # ---------------------------------------------------------------- observe
    # ---------------------------------------------------------------- store changes
    def store_changed(self, events: list[Any]) -> None:
        """The store watch saw ``events`` under the services prefix (any thread): the
        services they name are read again by the next observe; ``[]`` (the watch may
        have missed changes) makes it read everything."""
        with self._dirty_lock:
            self._watched = True
            if not events:
                self._full = True
                return
            for event in events:
                parsed = self.keys.parse(event.key)
                if parsed is None:
                    continue  # not a per-service key (a pass reads none other)
                if parsed[1] not in _UNREAD:
                    self._dirty.add(parsed[0])

    def _read(self) -> tuple[set[str] | None, bool]:
        """Every service's keys into :attr:`_entries`: all read again (None), or only the
        changed ones (their names; see the module docstring); and whether this was a
        full resync. A watched resync reads keys and revisions only, then the services
        whose revisions differ from what it holds.

        :raises StoreError: as the store does; nothing is then forgotten."""
        now = self.clock()
        with self._dirty_lock:
            dirty, full = self._dirty, self._full or not self._watched
            self._dirty, self._full = set(), False
        dirty |= self._with_deploy  # a deploy's journal is followed every pass
        if len(self._entries) < len(self.services):
            dirty |= self.services.keys() - self._entries.keys()
        resync = full or now - self._last_full >= self.resync
        try:
            compared = resync and self._watched and self._entries and not self._many(dirty)
            if compared:
                dirty |= self._differ()  # then only what differs is read, values and all
            full = (resync and not compared) or self._many(dirty)
            if full or resync:
                self._last_full = now
                self.full_reads += 1
            if full:
                entries = self.store.get_prefix(self.keys.services)
                per_service: dict[str, dict[str, Entry]] = defaultdict(dict)
                for key, entry in entries.items():
                    parsed = self.keys.parse(key)
                    if parsed:
                        per_service[parsed[0]][parsed[1]] = entry
                # every configured service, those with no key too (else read again each pass)
                self._entries = {name: per_service.get(name, {}) for name in self.services}
                return None, True
            dirty &= self.services.keys()
            for name in dirty:
                self._read_service(name)
        except BaseException:
            with self._dirty_lock:  # read them again next time
                self._dirty |= dirty
                self._full = self._full or full
            raise
        return dirty, resync

    def _read_service(self, name: str) -> None:
        """Read service ``name``'s keys again (one small prefix read)."""
        got: dict[str, Entry] = {}
        for key, entry in self.store.get_prefix(self.keys.service(name, "")).items():
            parsed = self.keys.parse(key)
            if parsed and parsed[0] == name:
                got[parsed[1]] = entry
        self._entries[name] = got

    def _many(self, names: set[str]) -> bool:
        """Too many to read one by one: one read of every key is cheaper."""
        return len(names) > max(FULL_READ_MIN, FULL_READ_SHARE * len(self.services))

    def _differ(self) -> set[str]:
        """The services whose keys (but policy and history) have other revisions in the
        store than in what was last read: one keys-only read, no values sent."""
        store: dict[str, dict[str, int]] = defaultdict(dict)
        for key, revision in self.store.get_revisions(self.keys.services).items():
            parsed = self.keys.parse(key)
            if parsed is not None and parsed[1] not in _UNREAD:
                store[parsed[0]][parsed[1]] = revision
        empty: dict[str, int] = {}
        differ = set()
        for name in self.services:
            held = self._entries.get(name, {})
            now = store.get(name, empty)
            if len(now) != sum(1 for f in held if f not in _UNREAD) or any(
                    held.get(f) is None or held[f].revision != r for f, r in now.items()):
                differ.add(name)
        return differ

    def entry(self, service: str, name: str) -> Entry | None:
        """``service``'s key ``name`` as the last observe read it (any of
        :data:`agent.keys.FIELDS`: ``shipmate status`` reads policies from there)."""
        return self._entries.get(service, {}).get(name)

    def _state(self, name: str, got: dict[str, Entry]) -> StoreState:
        """``name``'s keys parsed, reusing the last parse while their revisions hold."""
        state = self._states.get(name)
        if state is not None and state.entries is got:
            return state  # not read again since it was parsed
        revisions = _revisions(got)
        if state is not None and state.revisions == revisions:
            state.entries = got
            return state
        problems: list[str] = []
        release = _json(got.get("release"), "release", problems)
        deploy = _json(got.get("deploy"), "deploy", problems)
        state = StoreState(
            revisions, desired=_count(got.get("desired"), problems),
            override=_count(got.get("override"), problems), release=release, deploy=deploy,
            reported=_json(got.get("problems"), "problems", []),
            override_invalid="override" in got and parse_count(got["override"].value) is None,
            refused=None, problems=(), target=parse_release(release), entries=got)
        if release is not None:
            refused = release_problem(self.services[name].config, release)
            if refused is not None:
                state.refused = refused
                problems.append(f"release key refused, the service is left as it is: "
                                f"{refused}")
        if deploy is not None and deploy.get("phase") == "refused":
            problems.append(f"deploy key {str(deploy.get('error'))[:300]} (a new "
                            "`shipmate deploy` replaces it)")
        state.problems = tuple(problems)
        self._states[name] = state
        if deploy is not None:
            self._with_deploy.add(name)
        else:
            self._with_deploy.discard(name)
        return state

    # ---------------------------------------------------------------- observe
    def observe(self, *, check_health: bool = True,
                everything: bool = False) -> dict[str, ServiceView]:
        """Read the store (one prefix read, or only what changed: see the module
        docstring) and every actuator (one list each); every service's view.

        Once a store watch feeds this, only the services that may have changed get a new
        view (:attr:`fresh`): their keys changed, their actuator lists them otherwise,
        their health changed (:meth:`health_changed`), or the last pass left them
        unsettled (:meth:`settle`). The others keep their last view, as the last pass
        handled it. ``everything`` (and every observe with no watch fed) makes every view
        anew.

        :raises StoreError: if the store cannot be read; the caller must then do nothing.
        """
        read, resync = self._read()
        everything = everything or self._everything or not self._watched or not self.views
        self._everything = False
        with self._dirty_lock:
            touched, self._touched = self._touched, set()
        candidates = set(self.services) if everything else touched | self._revisit
        if read is not None:
            candidates |= read
        lists, self._lists = self._lists, {}
        failed: dict[str, str] = {}
        for actuator, names in self._by_actuator().items():
            try:
                listed = lists[actuator] if actuator in lists else actuator.list()
            except Exception as exc:  # noqa: BLE001 - any actuator failure freezes its services
                self._listed.pop(actuator, None)
                self._grouped[actuator] = {}
                failed.update(dict.fromkeys(names, f"cannot list instances: {exc}"))
                candidates |= names
                continue
            # an actuator's own handle counts too (a container's HEALTHCHECK status is in it)
            signature = [(i, i.ref) for i in listed]
            if not everything and self._listed.get(actuator) == signature:
                continue  # nothing came, went or changed: its services stay as they were
            self._listed[actuator] = signature
            grouped: dict[str, list[Instance]] = defaultdict(list)
            for instance in listed:
                grouped[instance.service].append(instance)
            earlier = self._grouped.get(actuator, {})
            self._grouped[actuator] = grouped
            unowned = self._unowned_by[actuator] = {}
            for service, instances in grouped.items():
                if service in names:
                    if not _same(earlier.get(service), instances):
                        candidates.add(service)
                elif service not in self.services:
                    unowned.update((i.name, i) for i in instances)
            candidates |= {name for name in earlier.keys() - grouped.keys() if name in names}
        unowned = {name: i for found in self._unowned_by.values() for name, i in found.items()}
        for name in unowned.keys() - self.unowned.keys():  # reported once, when first seen
            log.warning("instance %s of service %r belongs to no configured service: left alone",
                        name, unowned[name].service)
        self.unowned = unowned
        if read is None:  # a full read: the services whose keys say something new
            states, empty = self._states, {}
            for name in self.services:
                before = states.get(name)
                if self._state(name, self._entries.get(name, empty)) is not before:
                    candidates.add(name)
        fresh = self._views(candidates if len(candidates) < len(self.services)
                            else self.services, failed)
        self._revisit = set(fresh)
        self.full = resync or everything or self.clock() - self._synced_all >= self.interval
        if check_health and self.prober is not None:
            self._read_health(fresh, everything)
        elif check_health:
            self._check_health(fresh)
        views = fresh if len(fresh) == len(self.services) else {**self.views, **fresh}
        self.views, self.fresh = views, fresh
        return views

    def _views(self, names: Any, failed: dict[str, str]) -> dict[str, ServiceView]:
        """New views of ``names`` (in the YAML's order), from the keys and lists last read."""
        empty: dict[str, Entry] = {}
        views = {}
        order = self._order
        for name in (self.services if names is self.services
                     else sorted((n for n in names if n in order), key=order.__getitem__)):
            view = views[name] = self._state(name, self._entries.get(name, empty)).view(name)
            problem = failed.get(name)
            if problem is not None:
                view.listed = False
                view.problems.append(problem)
                continue
            grouped = self._grouped.get(self.services[name].actuator, {})
            view.instances = list(grouped.get(name, ()))
        return views

    def refresh(self) -> None:
        """The next observe reads every key and makes every view anew (leadership won)."""
        with self._dirty_lock:
            self._full = True
        self._everything = True

    def health_changed(self, service: str) -> None:
        """An instance of ``service`` changed health (any thread): the next observe makes
        its view anew."""
        with self._dirty_lock:
            self._touched.add(service)

    def settle(self, names: set[str]) -> None:
        """The pass that just completed left ``names`` settled (nothing to plan, all
        healthy, no deploy, no backoff): observes leave their views as they are until
        something about them changes. The rest of :attr:`fresh` is looked at again."""
        self._revisit -= names

    def synced_all(self) -> None:
        """Every service's announcements were just synced (the next :attr:`full` is due
        ``interval`` from now)."""
        self._synced_all = self.clock()

    def settled(self, name: str) -> bool:
        """Whether ``name``'s last plan needed nothing (and it has not changed since)."""
        return name in self._settled

    def observe_changed(self) -> dict[str, ServiceView]:
        """Views of only the services the store watch named since the last read (their
        keys read again, their actuators listed, no health checks), for a pass to hand
        out their starts before it looks at every service: an override acts at once,
        whatever the number of services. The lists are reused by the :meth:`observe`
        that follows in the same pass. Nothing (``{}``) when no watch feeds this, or a
        full read is due.

        :raises StoreError: if the store cannot be read (the services stay to be read).
        """
        with self._dirty_lock:
            if (not self._watched or self._full or not self._dirty
                    or self.clock() - self._last_full >= self.resync or self._many(self._dirty)):
                return {}
            dirty, self._dirty = self._dirty & self.services.keys(), set()
        try:
            for name in dirty:
                self._read_service(name)
        except BaseException:
            with self._dirty_lock:
                self._dirty |= dirty
            raise
        with self._dirty_lock:
            self._touched |= dirty  # the observe that follows makes their views anew
        views = {name: self._state(name, self._entries[name]).view(name) for name in dirty}
        for actuator, names in self._by_actuator().items():
            if not names & dirty:
                continue
            try:
                listed = self._lists[actuator] = actuator.list()
            except Exception:  # noqa: BLE001 - the whole pass says so, and plans nothing
                for name in names & dirty:
                    views[name].listed = False
                continue
            for instance in listed:
                if instance.service in dirty:
                    views[instance.service].instances.append(instance)
        return views

    def drop_lists(self) -> None:
        """Forget what :meth:`observe_changed` listed (its pass did not get to observe)."""
        self._lists = {}

    def _by_actuator(self) -> dict[Actuator, set[str]]:
        if self._actuators is None:  # the services are fixed for a reconciler's life
            out: dict[Actuator, set[str]] = defaultdict(set)
            for name, runtime in self.services.items():
                out[runtime.actuator].add(name)
            self._actuators = dict(out)
        return self._actuators

    def _read_health(self, views: dict[str, ServiceView], everything: bool) -> None:
        """Hand what runs in ``views`` to the prober (``everything``: all that runs; else
        only these services' instances) and take its latest results (never waits)."""
        assert self.prober is not None
        prober, targets = self.prober, []
        for name, view in views.items():
            runtime = self.services[name]
            check = getattr(runtime.config, "health", None)
            probe = _probe(runtime.actuator, check)
            targets += [(instance, probe, check) for instance in view.running]
        unlisted = {name for name, view in views.items() if not view.listed}
        prober.track(targets, keep=lambda instance: instance.service in unlisted,
                     services=None if everything else set(views))
        for view in views.values():
            health = {i.name: prober.health(i.name) for i in view.running}
            view.healthy = [i for i in view.running if health[i.name]]
            view.unprobed = {name for name, ok in health.items() if ok is None}

    def _check_health(self, views: dict[str, ServiceView]) -> None:
        jobs = [(view, instance) for view in views.values() for instance in view.running]
        checks = {name: getattr(rt.config, "health", None) for name, rt in self.services.items()}

        def check(job: tuple[ServiceView, Instance]) -> bool:
            view, instance = job
            try:  # with no health block too: an actuator may know better (a HEALTHCHECK)
                return self.services[view.name].actuator.healthy(instance, checks[view.name])
            except Exception:  # noqa: BLE001 - a failing check is an unhealthy instance
                return False

        if any(checks.values()) and jobs:
            with ThreadPoolExecutor(self.health_workers) as pool:
                results = list(pool.map(check, jobs))
        else:  # no probes to wait for
            results = [check(job) for job in jobs]
        for (view, instance), ok in zip(jobs, results, strict=True):
            if ok:
                view.healthy.append(instance)

    # ---------------------------------------------------------------- plan
    def plan(self, views: dict[str, ServiceView], *, remember: bool = True) -> list[Action]:
        """The starts and stops that would bring each service to its count (``remember``:
        services that need nothing are not planned again until they change)."""
        actions: list[Action] = []
        settled = self._settled if remember else {}
        for name, view in views.items():
            if not view.listed:
                continue
            seen = (view.state, (view.effective, *view.instances))  # a dry run's own count
            last = settled.get(name)
            if last is not None and last[0] is view.state and last[1] == seen[1]:
                continue  # nothing changed since it last needed nothing
            before = len(view.problems)
            planned = self._plan_service(self.services[name], view)
            if planned or len(view.problems) != before:
                settled.pop(name, None)
            else:
                settled[name] = seen
            actions += planned
        return actions

    def _plan_service(self, runtime: ServiceRuntime, view: ServiceView) -> list[Action]:
        name = runtime.name
        if view.deploy is not None and view.deploy.get("phase") != "refused":
            return []  # the deploy owns this service's instances, exited ones included
        if view.refused is not None:
            return []  # a release that may not run: keep what runs, start nothing
        actions = [Action("stop", name, i.slot, "exited", i) for i in view.exited]
        target = runtime.release(view)

        def start(slot: int, reason: str) -> Action:
            return Action("start", name, slot, reason, spec=runtime.spec(slot, target))

        by_slot: dict[int, list[Instance]] = defaultdict(list)
        for instance in view.running:
            by_slot[instance.slot].append(instance)
        keep = []
        for slot, group in sorted(by_slot.items()):
            group.sort(key=lambda i: i.version != target.version)  # the target's first
            keep.append(group[0])
            actions += [Action("stop", name, slot, "duplicate of its slot", extra)
                        for extra in group[1:]]
        n = view.effective
        if n is None:  # unknown count: keep what runs, restart what crashed
            return (actions + [start(i.slot, "restart exited") for i in view.exited
                               if i.slot not in by_slot])[:self.limit]
        if n > self.ceiling:
            view.problems.append(f"count {n} is above agent.max_instances ({self.ceiling}): "
                                 f"running {self.ceiling}")
            n = self.ceiling
        if len(keep) > n:  # other versions first, then the highest slots
            keep.sort(key=lambda i: (i.version == target.version, -i.slot))
            actions += [Action("stop", name, i.slot, f"scale down to {n}", i)
                        for i in keep[:len(keep) - n]]
        free = (slot for slot in itertools.count() if slot not in by_slot)
        room = max(0, self.limit - len(actions))
        actions += [start(next(free), f"scale up to {n}")
                    for _ in range(min(n - len(keep), room))]
        return actions[:self.limit]

    def announce(self, views: dict[str, ServiceView], stopped: set[str],
                 valid: Callable[[], bool] = lambda: True) -> list[str]:
        """Sync every announcer with the healthy instances (minus those just stopped) of
        ``views``' services; also called for one service when its health changed.

        With a prober, health is read afresh (under :attr:`announcing`, so a sync
        never works from older results than one before it), and a service with a
        running instance not probed yet is left as it is. ``valid()`` is asked
        just before syncing (still the acting agent?)."""
        errors = []
        with self.announcing:
            groups: dict[Announcer, dict[str, list[Instance]]] = defaultdict(dict)
            for name, view in views.items():
                announcer = self.services[name].announcer
                if announcer is None or not view.listed:
                    continue
                shown = (view.deploy or {}).get("announce")  # a deploy may hold some back
                if (not isinstance(shown, list) or (view.deploy or {}).get("phase") == "refused"
                        or not all(isinstance(v, str) for v in shown)):
                    shown = None  # a journal's garbage never hides this (or another) service
                candidates = [i for i in view.running if i.name not in stopped]
                if self.prober is not None:
                    health = [self.prober.health(i.name) for i in candidates]
                    if None in health:
                        continue  # not probed yet: announced or withdrawn once it is
                    healthy = [i for i, ok in zip(candidates, health, strict=True) if ok]
                else:
                    passed = {i.name for i in view.healthy}
                    healthy = [i for i in candidates if i.name in passed]
                groups[announcer][name] = [i for i in healthy
                                           if shown is None or i.version in shown]
            if groups and not valid():
                return errors
            for announcer, healthy in groups.items():
                try:
                    announcer.sync(healthy)
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"announce {counted(healthy, 'service')}: {exc}")
        return errors


def _same(before: list[Instance] | None, now: list[Instance]) -> bool:
    """Whether two lists of a service's instances say the same (their handles too)."""
    return (before is not None and len(before) == len(now)
            and all(a == b and a.ref == b.ref for a, b in zip(before, now, strict=True)))


def _probe(actuator: Actuator, check: Any) -> Callable[[Instance], bool]:
    """One health check of an instance by its actuator (with no health block too: an
    actuator may know better, a container's HEALTHCHECK)."""
    return lambda instance: bool(actuator.healthy(instance, check))

