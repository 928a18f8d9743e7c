"""The loop: campaign, poll, pass, sleep; never blocks, never spins, says why.

:class:`Loop` takes every collaborator as a keyword argument (kopf's
``spawn_tasks(*, registry, settings, ...)`` is the model) plus a clock, so a
test drives it with :meth:`Loop.turn` and no YAML on disk. One turn:

1. a requested reload runs (once no deploy is under way);
2. a standby campaigns for the leader key, at most every third of the lease;
3. the acting agent runs the source polls that are due (``schedule``) and, if
   woken or due, one reconcile pass;
4. the loop sleeps until the next thing due, at least :data:`MIN_WAIT` and at
   most ``agent.interval``, or until woken (a store change, a finished action,
   a signal: see :class:`Waker`).

A pass observes (one store read, or only what the store watch named: see
:mod:`agent.reconcile`; one list per actuator; the latest health results of
:class:`agent.probes.Prober`, which probes on its own threads), plans, hands
starts to :class:`agent.actuation.Actuation` (it never waits for them),
announces, hands out stops (after the announcement, so none withdraws the last
healthy instance), runs deploys, and records its problems. Every step but the
observe takes only the services the observe made new views of
(:attr:`Reconciler.fresh`: what may have changed, and what the last pass left
unsettled; every service at a full resync); a settled service costs nothing
until something about it changes (:meth:`Reconciler.settle`). The garbage
collector waits while a pass runs. It is
quick (1 s) only while instances are young and not yet healthy or a deploy
runs; finished actions wake it. An instance whose health changes is announced
(or withdrawn) at once by the probe that saw it (:meth:`Loop._health_changed`),
not at the next pass. A slot whose instance keeps exiting waits
ever longer (:mod:`agent.restarts`); no service runs more than
``agent.max_instances``; no pass plans more than :data:`MAX_ACTIONS` actions
per service.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import schedule

from agent.actuation import Actuation, Outcome
from agent.counted import counted
from agent.deploys import DeployError, DeployRunner, follow_yaml, record_releases
from agent.instances import Instance
from agent.keys import Keys
from agent.leader import Leadership
from agent.metrics import Metrics
from agent.orphans import Orphans
from agent.ports import claims, slot_port_problem
from agent.probes import Prober
from agent.reconcile import Action, Reconciler, ServiceRuntime, ServiceView
from agent.releases import config_deploy
from agent.restarts import Restarts
from agent.scaling import Scaler
from agent.store import Store, StoreError

log = logging.getLogger("shipmate")
QUICK_PASS = 1.0  # seconds between passes while instances settle
MIN_WAIT = 0.05  # the loop never waits less, whatever is due
MAX_ACTIONS = 64  # actions one pass plans per service, whatever the count
CAMPAIGN_WAIT = 1.0  # seconds a turn waits for a campaign before going on without it
_NOTHING = json.dumps({"problems": [], "unhealthy": {}}, sort_keys=True)
"the problems record of a service with none"


@dataclass
class Settings:
    """The agent's own settings the loop reads (``agent:`` in the YAML)."""

    interval: float = 10.0
    resync: float = 300.0
    grace: float = 10.0
    parallelism: int = 4
    max_instances: int = 100
    http: str | None = None
    dry_run: bool = False
    once: bool = False
    orphans: str = "keep"  # issue 11: agent.orphans (agent/orphans.py)

    @classmethod
    def from_config(cls, agent: Any, *, dry_run: bool = False, once: bool = False) -> Settings:
        return cls(interval=agent.interval, resync=agent.resync, grace=agent.grace,
                   parallelism=agent.parallelism, max_instances=agent.max_instances,
                   http=agent.http, dry_run=dry_run, once=once, orphans=agent.orphans)


class Waker:
    """A self-pipe: any thread (or a signal, through ``signal.set_wakeup_fd``) wakes the
    loop by writing a byte; nothing takes a lock, so a signal handler can never hang."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe is awake already; a closed one, done
            os.write(self.write_fd, b"!")

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds or until woken; swallow the wake-ups."""
        with contextlib.suppress(OSError, ValueError):
            ready, _, _ = select.select([self.read_fd], [], [], max(0.0, timeout))
            if ready:
                while os.read(self.read_fd, 4096):
                    pass

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class DaemonWorkers:
    """A few daemon threads running jobs from a queue: an agent that stops never waits
    for a source that hangs."""

    def __init__(self, count: int, name: str) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        for i in range(count):
            threading.Thread(target=self._work, daemon=True, name=f"{name}-{i}").start()

    def put(self, job: Callable[[], None]) -> None:
        self.jobs.put(job)

    def _work(self) -> None:
        while True:
            self.jobs.get()()


class Loop:
    """The acting agent's loop; see the module docstring."""

    def __init__(self, *, store: Store, keys: Keys, services: dict[str, ServiceRuntime],
                 leadership: Leadership, settings: Settings, metrics: Metrics | None = None,
                 emit: Callable[..., None] = lambda *a, **k: None,
                 allow: Callable[[Action], str | None] = lambda action: None,
                 strategies: Callable[[str, str | None], Any] | None = None,
                 reload: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, waker: Waker | None = None) -> None:
        self.store, self.keys, self.leadership = store, keys, leadership
        self.metrics = metrics or Metrics()
        self.emit, self.allow, self.clock, self.wall = emit, allow, clock, wall
        self.on_reload = reload
        self.waker = waker or Waker()
        self.stop_requested = False
        self.reload_requested = False
        self.pass_wanted = False
        self.failures: list[str] = []  # failed starts and stops (``run --once`` exits 1)
        self.next_pass = 0.0
        self.next_campaign = 0.0
        self.passes = 0
        self._seen: dict[str, dict[str, float]] = {}
        "service -> instance -> when first seen running (monotonic)"
        self._unhealthy: dict[str, dict[str, float]] = {}
        "service -> instance -> unhealthy since (wall clock)"
        self._exited: dict[str, set[str]] = {}  # service -> its exits already counted
        self._published: dict[str, str] = {}  # service -> the problems record last written
        self._overrides: dict[str, int | None] = {}  # service -> override at the last pass
        self._held: dict[str, list[dict[str, Any]]] = {}  # service -> actions plugins hold
        self._processed: dict[str, Any] = {}
        "service -> what the last completed pass saw of it (see :meth:`_quiet`)"
        self._followed: dict[str, tuple[Any, list[str]]] = {}
        "service -> (store state, running versions) for which the YAML needed nothing"
        self._polls_running: set[str] = set()
        self._failed: set[str] = set()  # services a write of this pass failed for
        self._was_leading = False
        self._campaigner: threading.Thread | None = None
        self._stop_retry: dict[tuple[str, int], tuple[int, float]] = {}
        "slot -> (failed stops, when to try again): a stop that fails is retried ever later"
        self._poll_workers = DaemonWorkers(4, "poll")
        self.prober = Prober(on_change=self._health_changed)
        self._announcing = threading.Lock()  # one announcer sync at a time (pass or probe)
        self._changed = threading.Condition()
        self._dirty: set[str] = set()  # services whose health changed since their last sync
        self._syncing = False  # a batch of them is being synced
        self._closed = False
        threading.Thread(target=self._announce_changes, daemon=True,
                         name="announce-health").start()
        self.restarts = Restarts(clock=clock, settings=self._restart_settings, emit=self._emit)
        self.orphans = Orphans()  # issue 11: orphans (agent/orphans.py)
        self.actuation = Actuation(emit=self._emit, grace=lambda: self.settings.grace,
                                   parallelism=lambda: self.settings.parallelism,
                                   on_done=self._done, may_act=self._may_act)
        self.deploys = DeployRunner(store=store, keys=keys, emit=self._emit,
                                    grace=settings.grace,
                                    strategies=strategies or self._own_strategy,
                                    leading=self._leading, wake=self.request_pass, clock=clock,
                                    ceiling=lambda: self.settings.max_instances,
                                    port_problem=self._port_problem)
        self.configure(services, settings)

    # ---------------------------------------------------------------- wiring
    def configure(self, services: dict[str, ServiceRuntime], settings: Settings) -> None:
        """Take a (re)built set of services and settings."""
        self.services, self.settings = services, settings
        self.deploys.grace = settings.grace
        previous = getattr(self, "reconciler", None)
        self.reconciler = Reconciler(services=services, store=self.store, keys=self.keys,
                                     emit=self._emit, grace=settings.grace,
                                     ceiling=settings.max_instances, limit=MAX_ACTIONS,
                                     resync=settings.resync, interval=settings.interval,
                                     clock=self.clock,
                                     prober=None if settings.once else self.prober,
                                     announcing=self._announcing)
        if previous is not None and previous._watched:  # the watch feeds the new one
            self.reconciler.store_changed([])
        self.scaler = Scaler(services=services, store=self.store, keys=self.keys,
                             emit=self._emit, dry_run=settings.dry_run)
        self.scheduler = schedule.Scheduler()
        for name, runtime in services.items():
            self.scheduler.every(runtime.source.config.interval).seconds.do(self.poll, name)
        self.restarts.forget(set(services))
        self._followed = {}  # a new YAML may ask for another release
        self._processed = {}  # new services: every one looked at afresh
        self._claims = claims({name: rt.config for name, rt in services.items()})

    def _emit(self, hook: str, **kwargs: Any) -> None:
        self.emit(hook, **kwargs)

    def _restart_settings(self, service: str) -> Any:
        runtime = self.services.get(service)
        return getattr(runtime.config, "restart", None) if runtime else None

    def _own_strategy(self, service: str, name: str | None) -> Any:
        return self.services[service].strategy

    def _leading(self) -> bool:
        return self.settings.dry_run or self.leadership.is_leader

    def _may_act(self, term: int) -> bool:
        return self.settings.dry_run or self.leadership.valid(term)

    def campaign_now(self) -> None:
        """The leader key is vacant (any thread): a standby campaigns at once."""
        self.next_campaign = 0.0
        self.waker.wake()

    def store_changed(self, events: list[Any]) -> None:
        """The store watch saw ``events`` (any thread; ``[]``: re-read everything): the
        next pass re-reads the services they name (:meth:`Reconciler.store_changed`)."""
        self.reconciler.store_changed(events)

    def request_pass(self) -> None:
        """Ask for a pass as soon as possible (any thread)."""
        self.pass_wanted = True
        self.waker.wake()

    def request_stop(self) -> None:
        self.stop_requested = True
        self.waker.wake()

    def request_reload(self) -> None:
        self.reload_requested = True
        self.waker.wake()

    def deploying(self) -> bool:
        return any(self.deploys.busy(name) for name in self.services)

    # ---------------------------------------------------------------- polls
    def poll(self, name: str) -> None:
        """Poll ``name``'s source on a thread of its own, unless a poll of it still runs."""
        if not self._leading() or name in self._polls_running:
            return
        self._polls_running.add(name)

        def run() -> None:
            try:
                self.poll_now(name)
            finally:
                self._polls_running.discard(name)

        self._poll_workers.put(run)

    def poll_now(self, name: str) -> None:
        try:
            reading = self.scaler.poll(name)
            self.metrics.shadow(name, reading.decision.state.shadow)
        except StoreError as exc:
            self.metrics.errors.labels("store").inc()
            log.warning("%s: store unreachable, desired count unchanged: %s", name, exc)
        except Exception:
            self.metrics.errors.labels("scaling").inc()
            log.exception("%s: the poll failed; the desired count is unchanged", name)

    def poll_all(self) -> None:
        """Poll every service (leadership won, a reload), its keys read afresh first."""
        self.scaler.forget()
        for name in self.services:
            self.poll(name)

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        """Turn until stopped (then :meth:`close` lets go: instances keep running)."""
        log.info("agent started: %d services", len(self.services))
        while not self.stop_requested:
            self.turn()
            if not self.stop_requested:
                self.waker.wait(self.timeout())

    def close(self) -> None:
        """Stop deploys where they are and take no more actions (waits about a second)."""
        self.deploys.stop()
        self.prober.close()
        with self._changed:
            self._closed = True  # the health-change thread ends
            self._changed.notify()
        self.actuation.close(timeout=1.0)
        if self._was_leading and not self.settings.dry_run:
            self._was_leading = False
            self._emit("shipmate_leadership_lost", term=self.leadership.term,
                       reason="the agent stopped")

    def turn(self) -> None:
        """One turn of the loop (tests call it directly)."""
        if self.reload_requested and not self.deploying() and self.on_reload is not None:
            self.reload_requested = False
            self.on_reload()
        now = self.clock()
        leading = self._leading()
        if not leading and now >= self.next_campaign:
            self.next_campaign = now + self.leadership.ttl / 3
            leading = self._campaign()
        if leading and not self._was_leading:  # newly won: read everything afresh
            if not self.settings.dry_run:
                self._emit("shipmate_leadership_gained", term=self.leadership.term)
            self._overrides.clear()
            self.reconciler.refresh()  # what it saw while it led before is stale
            self.poll_all()
            self.next_pass = 0.0
        elif self._was_leading and not leading:
            self._emit("shipmate_leadership_lost", term=self.leadership.term,
                       reason=self.leadership.lost_why or "its lease ran out unrefreshed")
        if self._was_leading and not leading:  # a standby probes nothing
            self.prober.clear()
        self._was_leading = leading
        self.metrics.leader.set(1 if leading else 0)
        if not leading:
            self.pass_wanted = False  # a standby passes nothing: store changes are not for it
            self.metrics.last_pass = self.wall()  # a healthy standby
            return
        self.scheduler.run_pending()
        if self.pass_wanted or now >= self.next_pass:
            self.run_pass()

    def _campaign(self) -> bool:
        """Campaign on a thread of its own, waiting for it at most :data:`CAMPAIGN_WAIT`: a
        store that does not answer (a partition) never holds up the loop or a signal."""
        if self._campaigner is None or not self._campaigner.is_alive():
            self._campaigner = threading.Thread(target=self._campaign_once, daemon=True,
                                                name="campaign")
            self._campaigner.start()
        self._campaigner.join(CAMPAIGN_WAIT)
        return self._leading()

    def _campaign_once(self) -> None:
        try:
            self.leadership.campaign()
        except StoreError as exc:
            log.warning("store unreachable, cannot campaign: %s", exc)

    def timeout(self) -> float:
        """How long the loop may sleep now: never below :data:`MIN_WAIT`."""
        now = self.clock()
        if not self._leading():
            return max(MIN_WAIT, min(self.next_campaign - now, self.settings.interval))
        if self.pass_wanted:
            return MIN_WAIT
        due = [self.next_pass - now, self.settings.interval]
        idle = self.scheduler.idle_seconds
        if idle is not None:
            due.append(idle)
        return max(MIN_WAIT, min(due))

    # ---------------------------------------------------------------- the pass
    def run_pass(self) -> None:
        """One reconcile pass; a failed one is retried shortly and never fatal."""
        self.pass_wanted = False
        self.next_pass = self.clock() + QUICK_PASS
        collecting = gc.isenabled()
        gc.disable()  # a pass makes many short-lived objects: no collection of the big heap
        try:
            self._pass()
        except StoreError as exc:
            self.metrics.errors.labels("store").inc()
            log.warning("store unreachable, changing nothing: %s", exc)
        except Exception:
            self.metrics.errors.labels("pass").inc()
            log.exception("the pass failed; it is retried shortly")
        finally:
            if collecting:
                gc.enable()

    def _pass(self) -> None:
        started = self.clock()
        self._failed = set()
        term = self.leadership.term
        mark = self.actuation.tick()
        dry = self.settings.dry_run
        if not dry:
            self._quick_starts(mark, term)
        reconciler = self.reconciler
        # a dry run plans every service with the counts the policy decided (nothing written)
        views = reconciler.observe(everything=dry)
        fresh = reconciler.fresh  # what may have changed; the rest is as the last pass left it
        if dry:
            for name, reading in self.scaler.readings.items():
                if reading.decision.count is not None and name in views:
                    views[name].desired = reading.decision.count
        busy = self.actuation.busy_slots(mark)
        self._count_exits(fresh, busy)
        self._track_overrides(fresh)
        quiet, seen = self._quiet(fresh)
        errors: list[str] = []
        held_before, self._held = self._held, {}
        actions = [action for action in reconciler.plan(fresh)
                   if not (self._hold(action, views[action.service], busy)
                           or self._vetoed(action, held_before))]
        quiet -= held_before.keys() | self._held.keys()  # a hold said or unsaid is news
        # starts go out first (an override acts before the announcers' sync); stops only
        # once what passed its check is announced, so no stop withdraws the last of them
        if not self._submit([a for a in actions if a.verb == "start"], busy, term):
            return
        if not dry and self.leadership.valid(term):
            # every agent.interval, every announcement (a key deleted by hand comes back)
            failed = reconciler.announce(views if reconciler.full else fresh,
                                         self.actuation.stopping(),
                                         valid=lambda: self.leadership.valid(term))
            if reconciler.full and not failed:
                reconciler.synced_all()
            errors += failed
        if not self._submit([a for a in actions if a.verb != "start"], busy, term):
            return
        if not dry:
            errors += self.orphans.handle(  # issue 11: orphans (agent/orphans.py)
                reconciler.unowned, self.services, policy=self.settings.orphans,
                stop_grace=self.settings.grace)
            if not self.settings.once:
                errors += self._deploys(fresh)
        self._track_health(fresh)
        for error in errors:
            self.metrics.errors.labels("pass").inc()
            log.warning("%s", error)
        changed = {name: view for name, view in fresh.items() if name not in quiet}
        self._publish(changed, dry)
        self._record_metrics(changed, started)
        self.next_pass = self.clock() + self._next_delay(changed)
        self._processed.update(seen)  # what this pass saw, all of it handled
        for name in fresh.keys() - seen.keys():
            self._processed.pop(name, None)
        # settled: nothing planned, all healthy, no deploy or backoff, nothing that failed
        reconciler.settle({name for name in seen if reconciler.settled(name)
                           and name not in self._failed})
        if reconciler.full:
            for table in (self._published, self._seen, self._unhealthy, self._processed,
                          self._exited, self._overrides):
                for gone in table.keys() - views.keys():
                    del table[gone]
        now = self.clock()
        waits = [t for _, t in self._stop_retry.values() if t > now]
        soonest = min([t for t in (self.restarts.next_try(), *waits) if t is not None],
                      default=None)
        if soonest is not None:
            self.next_pass = min(self.next_pass, soonest)

    def _quiet(self, views: dict[str, ServiceView]) -> tuple[set[str], dict[str, Any]]:
        """The services exactly as the last completed pass saw and handled them (same keys
        as parsed, count, instances, all healthy; no deploy, no backoff): their problems,
        gauges and next-pass delay are left as they are. Also what this pass sees of
        each that is all healthy, with no deploy or backoff (to compare the next pass
        with once this one has completed)."""
        troubled = {service for service, _ in list(self.restarts.slots)}
        last, quiet, seen = self._processed, set(), {}
        for name, view in views.items():
            state = view.state
            if (state is None or not view.listed or view.deploy is not None
                    or name in troubled or len(view.healthy) != len(view.running)):
                continue  # something to look at again in every pass
            now = seen[name] = (state, (view.effective, *view.instances))
            before = last.get(name)
            if before is not None and before[0] is state and before[1] == now[1]:
                quiet.add(name)
        return quiet, seen

    def _quick_starts(self, mark: int, term: int) -> None:
        """Hand out the starts of the services the store watch named, before the pass
        looks at every service (an override acts within milliseconds at 10,000
        services); the pass then plans them again, and finds their slots busy."""
        views = self.reconciler.observe_changed()
        if not views:
            return
        try:
            busy = self.actuation.busy_slots(mark)
            plan = self.reconciler.plan(views, remember=False)
            self._submit([a for a in plan if a.verb == "start"
                          and not self._hold(a, views[a.service], busy)
                          and not self._vetoed(a, self._held)], busy, term)
        except BaseException:
            self.reconciler.drop_lists()  # never reused by a later pass
            raise

    def _submit(self, actions: list[Action], busy: set[tuple[str, int]], term: int) -> bool:
        """Hand ``actions`` to the workers (a dry run only says them); False if the
        leadership was lost (the plan is then dropped)."""
        for action in actions:
            if self.settings.dry_run:
                log.info("would %s", action)
                continue
            if not self.leadership.valid(term):
                log.warning("leadership lost during the pass: its plan is dropped")
                return False
            self.actuation.submit(self.services[action.service], action, busy, term)
        return True

    def _hold(self, action: Action, view: ServiceView, busy: set[tuple[str, int]]) -> bool:
        """Whether to leave ``action`` for later (slot busy, backing off, bad port)."""
        if (action.service, action.slot) in busy:
            return True
        if action.verb != "start":
            retry = self._stop_retry.get((action.service, action.slot))
            return retry is not None and self.clock() < retry[1]
        if not self.restarts.may_start(action.service, action.slot):
            return True
        port = action.spec.port if action.spec else None
        if port is not None:
            problem = self._port_problem(action.service, port)
            if problem:
                view.problems.append(f"slot {action.slot}: {problem}")
                return True
        return False

    def _vetoed(self, action: Action, before: dict[str, list[dict[str, Any]]]) -> bool:
        """Whether a plugin holds ``action`` (``shipmate_allow_action``); a held one is
        recorded for status and asked about again at the next pass."""
        held = self.allow(action)
        if held is None:
            return False
        plugin = getattr(held, "plugin", "?")
        what = f"{action.verb} of slot {action.slot} ({action.reason})"
        record = {"kind": "held", "verb": action.verb, "slot": action.slot,
                  "plugin": plugin, "reason": str(held),
                  "text": f"{what} held by plugin {plugin!r}: {held}"}
        if record not in before.get(action.service, []):
            log.info("%s: %s", action.service, record["text"])
        self._held.setdefault(action.service, []).append(record)
        return True

    def _port_problem(self, service: str, port: int) -> str | None:
        return slot_port_problem(service, port, self._claims, self.settings.http)

    def _count_exits(self, views: dict[str, ServiceView], busy: set[tuple[str, int]]) -> None:
        """Each instance that exited on its own counts once towards its slot's backoff (one
        on a slot with an action under way is the agent's own stop, not a crash)."""
        for name, view in views.items():
            counted_before = self._exited.pop(name, ())
            if len(view.instances) == len(view.running):
                continue  # nothing stopped (the common case)
            if view.deploy is not None and view.deploy.get("phase") != "refused":
                continue  # the deploy owns its instances and judges them
            actuator = self.services[name].actuator
            exited_now = self._exited[name] = set()  # a name that runs again may exit again
            for instance in view.exited:
                if (name, instance.slot) in busy:
                    continue  # being stopped (a TERM's exit code 143 is no crash)
                exited_now.add(instance.name)
                if instance.name in counted_before:
                    continue
                output = None
                with contextlib.suppress(Exception):
                    output = actuator.output(instance)
                self.restarts.failed(name, instance.slot, "exited", code=instance.exit_code,
                                     output=output)
                self.metrics.restarts.labels(name).inc()

    def _done(self, outcome: Outcome) -> None:
        action = outcome.action
        if outcome.error is not None:
            if action.verb == "start":
                delay = self.restarts.failed(action.service, action.slot,
                                             f"start failed: {outcome.error}")
                self.metrics.restarts.labels(action.service).inc()
            else:
                key = (action.service, action.slot)
                tries = self._stop_retry.get(key, (0, 0.0))[0] + 1
                delay = min(2.0 ** (tries - 1), 300.0)
                self._stop_retry[key] = (tries, self.clock() + delay)
                log.error("%s failed: %s; tried again in %.0fs", action, outcome.error, delay)
            self.failures.append(f"{action}: failed: {outcome.error}")
            del self.failures[:-100]
            # retried after its delay, not at once (no spin): a pass is due then
            self.next_pass = min(self.next_pass, self.clock() + delay)
            self.waker.wake()
            return
        if action.verb == "stop":
            self._stop_retry.pop((action.service, action.slot), None)
        self.request_pass()

    def _track_overrides(self, views: dict[str, ServiceView]) -> None:
        """``shipmate_override_changed`` where an override differs from the last pass's."""
        for name, view in views.items():
            now = None if view.override_invalid else view.override
            if name in self._overrides and self._overrides[name] != now:
                self._emit("shipmate_override_changed", service=name,
                           old=self._overrides[name], new=now)
            self._overrides[name] = now

    def _health_changed(self, instance: Instance, healthy: bool, was: bool | None) -> None:
        """A probe saw ``instance`` pass (or fail) where it did not before (on the probe's
        thread; ``was`` None: its first result). The one place a health change is seen:
        its service's announcements follow at once, without waiting for a pass."""
        self.reconciler.health_changed(instance.service)
        if healthy or was is not None:  # a first failure is "not healthy yet", as before
            self._emit("shipmate_health_changed", instance=instance, healthy=healthy)
            self.request_pass()  # which looks at that service alone (gauges, problems)
        with self._changed:
            self._dirty.add(instance.service)
            self._changed.notify()

    def health_synced(self) -> bool:
        """Whether every health change seen so far was handled (tests wait on it)."""
        with self._changed:
            return not self._dirty and not self._syncing

    def _announce_changes(self) -> None:
        """Sync the announcements of the services whose health changed, as they change
        (on a thread of its own: probes never wait for the store; changes that come in
        while a sync runs are synced together next).

        Only the acting agent announces (and its announcer writes through the fence);
        a service under a deploy is left to the deploy, which announces what it saw
        pass; an instance being stopped stays withdrawn (the announcer's rule too)."""
        while True:
            with self._changed:
                self._syncing = False
                while not self._dirty and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                names, self._dirty, self._syncing = self._dirty, set(), True
            if self.settings.dry_run or not self._leading():
                continue
            term = self.leadership.term
            views = {name: view for name in names
                     if (view := self.reconciler.views.get(name)) is not None
                     and name in self.services
                     and (view.deploy is None or view.deploy.get("phase") == "refused")
                     and not self.deploys.busy(name)}
            try:
                errors = self.reconciler.announce(views, self.actuation.stopping(),
                                                  valid=lambda t=term: self.leadership.valid(t))
            except Exception:  # noqa: BLE001 - the next pass announces them in any case
                log.exception("announcing a health change failed")
                continue
            for error in errors:
                self.metrics.errors.labels("pass").inc()
                log.warning("%s", error)

    def _track_health(self, views: dict[str, ServiceView]) -> None:
        now, wall = self.clock(), self.wall()
        slots = self.restarts.slots
        for name, view in views.items():
            up = view.running
            every = len(view.healthy) == len(up)  # the common case: no set to build
            healthy = set() if every else {i.name for i in view.healthy}
            seen_before = self._seen.get(name, {})
            unhealthy_before = self._unhealthy.get(name, {})
            seen, unhealthy = {}, {}
            for instance in up:
                key = instance.name
                seen[key] = seen_before.get(key, now)
                if key in view.unprobed:  # not probed yet: neither healthy nor unhealthy
                    if key in unhealthy_before:
                        unhealthy[key] = unhealthy_before[key]
                    continue
                if every or key in healthy:
                    if (name, instance.slot) in slots:  # a slot with a backoff to reset
                        self.restarts.healthy(name, instance.slot)
                else:
                    unhealthy[key] = unhealthy_before.get(key, wall)
            self._seen[name] = seen
            if unhealthy:
                self._unhealthy[name] = unhealthy
            else:
                self._unhealthy.pop(name, None)

    def _next_delay(self, views: dict[str, ServiceView]) -> float:
        """Seconds to the next pass: quick only while something is young. A deploy gets
        1 s passes; an instance within its
        health timeout that has not passed yet gets passes that back off (1, 4, 16 s after
        it started), so one that never passes costs little more than an idle one. A start
        or stop in flight needs none: it wakes the loop when it ends."""
        delay = self.settings.interval
        now = self.clock()
        for name, view in views.items():
            if self.deploys.busy(name):
                return QUICK_PASS
            if len(view.healthy) >= len(view.running):
                continue  # every running instance passed: nothing young to look at again
            window = getattr(getattr(self.services[name].strategy, "config", None),
                             "health_timeout", 60.0)
            healthy = {i.name for i in view.healthy}
            for instance in view.running:
                age = now - self._seen.get(name, {}).get(instance.name, now)
                if instance.name not in healthy and age < window:
                    delay = min(delay, max(QUICK_PASS, 3 * age))
        return delay

    def _deploys(self, views: dict[str, ServiceView]) -> list[str]:
        """Run requested deploys; request one where the YAML no longer matches the release."""
        errors = []
        records = []  # releases to record, in batched writes after the loop
        for name, view in views.items():
            runtime = self.services[name]
            if not view.listed:
                continue
            if view.deploy is not None and view.deploy.get("phase") != "refused":
                problem = self.deploys.launch(runtime, view)
                if problem:
                    view.problems.append(problem)
                continue
            seen = (view.state, [i.version for i in view.running])
            last = self._followed.get(name)
            if last is not None and last[0] is view.state and last[1] == seen[1]:
                continue  # the same release and versions: the YAML was followed already
            wanted = runtime.yaml_release
            try:
                if config_deploy(view.release, wanted, seen[1]) == "record":
                    records.append((name, view, wanted))
                elif follow_yaml(self.store, self.keys, name, view, wanted):
                    log.info("%s: the config changed: deploying it", name)
                    self.request_pass()
                elif view.state is not None:
                    self._followed[name] = seen
            except (DeployError, StoreError) as exc:
                errors.append(f"{name}: {exc}")
                self._failed.add(name)
        if records:
            try:
                record_releases(self.store, self.keys, records)
            except StoreError as exc:
                errors.append(f"cannot record the releases of "
                              f"{counted([r[0] for r in records], 'service')}: {exc}")
                self._failed.update(r[0] for r in records)
        return errors

    def _publish(self, views: dict[str, ServiceView], dry: bool) -> None:
        """Log each new problem once, and write a service's problems to its ``problems``
        key only when they change (``shipmate status`` shows them)."""
        troubled = {service for service, _ in list(self.restarts.slots)}  # other threads add
        for name, view in views.items():
            before = self._published.get(name)
            held = self._held.get(name, [])
            unhealthy = self._unhealthy.get(name, {})
            if (before == _NOTHING and not view.problems and name not in troubled
                    and not held and not any(i.name in unhealthy for i in view.running)):
                continue  # nothing to say, and nothing was said
            record = {"problems": [{"kind": "problem", "text": p} for p in view.problems]
                      + (self.restarts.problems(name, self.wall()) if name in troubled else [])
                      + held,
                      "unhealthy": {i.name: unhealthy[i.name] for i in view.running
                                    if i.name in unhealthy}}
            text = json.dumps(record, sort_keys=True)
            if before is None and view.reported is not None:  # an earlier agent's record
                before = json.dumps(view.reported, sort_keys=True)
            if before == text or (before is None and not record["problems"]
                                  and not record["unhealthy"]):
                self._published[name] = text  # nothing to write
                continue
            seen = set() if before is None else {
                p.get("text") for p in json.loads(before).get("problems") or []
                if isinstance(p, dict)}
            for problem in view.problems:
                if problem not in seen:
                    log.warning("%s: %s", name, problem)
            if not dry:
                key = self.keys.service(name, "problems")
                try:
                    if record["problems"] or record["unhealthy"]:
                        self.store.put(key, text)
                    elif before is not None:
                        self.store.delete(key)
                except StoreError as exc:
                    log.warning("%s: cannot record its problems: %s", name, exc)
                    self._failed.add(name)
                    continue
            self._published[name] = text

    def _record_metrics(self, views: dict[str, ServiceView], started: float) -> None:
        unknown = math.nan  # an actuator that could not list: unknown, not zero
        for name, view in views.items():
            effective = view.effective
            self.metrics.service(name).set(
                effective if effective is not None else unknown,
                len(view.running) if view.listed else unknown,
                len(view.healthy) if view.listed else unknown)
        self.passes += 1
        self.metrics.passes.inc()
        self.metrics.pass_seconds.set(self.clock() - started)
        self.metrics.last_pass = self.wall()

    # ---------------------------------------------------------------- --once
    def run_once(self, timeout: float = 300.0) -> int:
        """Campaign, poll every source, then pass until nothing is left to do (no later
        pass would take what this one could not); the exit code says if anything failed."""
        if not self.settings.dry_run and not self.leadership.campaign():
            log.error("another agent leads this cluster; --once changes nothing")
            return 1
        if not self.settings.dry_run:
            self._was_leading = True
            self._emit("shipmate_leadership_gained", term=self.leadership.term)
        for name in self.services:
            self.poll_now(name)
        deadline = self.clock() + timeout
        while True:
            self.run_pass()
            while self.actuation.in_flight and self.clock() < deadline:
                self.waker.wait(0.1)
            if not self.pass_wanted or self.clock() >= deadline:
                break  # nothing was taken, so nothing ended and asked for another pass
        self.actuation.close(timeout=0)
        if self.failures:
            log.error("%d start(s) or stop(s) failed", len(self.failures))
            return 1
        return 0
