"""Starts and stops off the loop: per-actuator workers, a bounded number in flight.

The pass plans; :class:`Actuation` carries the plan out on worker threads, at
most the actuator's ``parallelism`` (and ``agent.parallelism``) at once per
actuator, so a start that takes minutes (a pull, a fleet unit that is slow to
launch) never holds up the loop: other services are reconciled, sources are
polled, leadership is refreshed and signals are handled meanwhile.

Nothing is queued beyond what runs: an action that finds its actuator's
workers all busy is not taken, and the next pass (woken when a worker
finishes) plans it again from what runs then. So stopping the agent drops
every start that was not begun, and a huge count never piles up work.

A stop withdraws the instance from discovery, waits the announcer's
``drain`` (on its worker: the loop and other actions go on; an instance that
no longer runs has nothing to drain), then stops it, and tells the announcer
how the stop ended (:meth:`agent.kinds.Announcer.stopped`).

Actions are keyed by slot: while a start or stop of ``web`` slot 3 is under
way (or finished after the pass that is planning looked at what runs), no
other action on that slot is taken.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agent.kinds import Actuator
from agent.reconcile import Action, ServiceRuntime

log = logging.getLogger("shipmate.actuation")
SlotKey = tuple[str, int]


@dataclass(frozen=True)
class Outcome:
    """How one action ended: ``error`` is None when it succeeded."""

    action: Action
    error: str | None
    instance: Any = None  # the started instance


class Actuation:
    """Runs actions on per-actuator worker threads and reports how they ended.

    ``on_done(outcome)`` is called on the worker thread when an action ends;
    the loop uses it to record failures and to wake up.
    """

    def __init__(self, *, emit: Callable[..., None], grace: Callable[[], float],
                 parallelism: Callable[[], int], on_done: Callable[[Outcome], None],
                 may_act: Callable[[int], bool] = lambda term: True) -> None:
        self.emit, self.grace, self.parallelism = emit, grace, parallelism
        self.on_done, self.may_act = on_done, may_act
        self._lock = threading.Lock()
        self._running: dict[Actuator, int] = {}
        self._busy: dict[SlotKey, Action] = {}
        self._finished: dict[SlotKey, int] = {}  # slot -> the tick its action ended at
        self._tick = 0
        self._pending = 0
        self._closed = False

    # ---------------------------------------------------------------- state
    def tick(self) -> int:
        """A mark to take before looking at what runs (see :meth:`busy_slots`)."""
        with self._lock:
            self._tick += 1
            return self._tick

    def busy_slots(self, since: int) -> set[SlotKey]:
        """Slots with an action under way, or one that ended after the mark ``since``
        (what runs was looked at before it ended, so it may not show yet)."""
        with self._lock:
            self._finished = {k: t for k, t in self._finished.items() if t >= since}
            return set(self._busy) | set(self._finished)

    @property
    def pending(self) -> int:
        """Actions taken whose end has not been reported yet (``on_done`` not returned)."""
        with self._lock:
            return self._pending

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._busy)

    def stopping(self) -> set[str]:
        """Names of the instances being stopped now."""
        with self._lock:
            return {a.instance.name for a in self._busy.values() if a.instance is not None}

    def _width(self, actuator: Actuator) -> int:
        return max(1, min(self.parallelism(), getattr(actuator, "parallelism", 1)))

    # ---------------------------------------------------------------- work
    def submit(self, runtime: ServiceRuntime, action: Action, busy: set[SlotKey],
               term: int = 0) -> bool:
        """Take ``action`` if its slot is free and its actuator has a free worker; it runs
        only if ``may_act(term)`` still holds when its worker begins (a plan of a lost
        leadership term is dropped)."""
        key = (action.service, action.slot)
        actuator = runtime.actuator
        with self._lock:
            # busy, or its action ended after this pass looked (what runs may not show it)
            if self._closed or key in busy or key in self._busy or key in self._finished:
                return False
            if self._running.get(actuator, 0) >= self._width(actuator):
                return False
            self._running[actuator] = self._running.get(actuator, 0) + 1
            self._busy[key] = action
            self._pending += 1
        # a daemon thread per action, not a pool: an agent told to stop exits at once,
        # leaving a slow start to finish (or die) on its own
        threading.Thread(target=self._do, args=(runtime, action, term), daemon=True,
                         name=f"{action.verb}-{action.service}-{action.slot}").start()
        return True

    def _do(self, runtime: ServiceRuntime, action: Action, term: int) -> None:
        key = (action.service, action.slot)
        error, instance = None, None
        try:
            if not self.may_act(term):
                error = "dropped: this agent no longer acts for the cluster"
            elif action.verb == "stop":
                assert action.instance is not None
                withdraw_then_stop(runtime, [action.instance], self.grace(),
                                   before_stop=lambda: self._still_acting(term))
                self.emit("shipmate_instance_stopped", instance=action.instance,
                          reason=action.reason)
            else:
                assert action.spec is not None
                instance = runtime.actuator.start(action.spec)
                self.emit("shipmate_instance_started", instance=instance)
            if error is None:
                log.info("%s", action)
        except Exception as exc:  # noqa: BLE001 - one failed action must not stop the others
            error = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
        finally:
            with self._lock:
                self._busy.pop(key, None)
                self._running[runtime.actuator] -= 1
                self._finished[key] = self._tick
        try:
            self.on_done(Outcome(action, error, instance))
        finally:
            with self._lock:
                self._pending -= 1

    def _still_acting(self, term: int) -> None:
        if not self.may_act(term):  # leadership was lost during the drain
            raise RuntimeError("not stopped: this agent no longer acts for the cluster")

    def close(self, timeout: float = 1.0) -> None:
        """Take nothing more; wait up to ``timeout`` for what runs (an agent that stops
        leaves its instances as they are, and a slow start to finish on its own)."""
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)


def withdraw_then_stop(runtime: ServiceRuntime, instances: list[Any], grace: float,
                       *, stop: Callable[[Any], None] | None = None,
                       before_stop: Callable[[], None] = lambda: None,
                       parallel: int = 1) -> None:
    """Withdraw ``instances`` from discovery, wait the announcer's drain once (if any of them
    still runs), then stop each (``stop(instance)``, default the actuator's stop with
    ``grace``), ``parallel`` at a time; the announcer hears how each stop ended. The first
    failure is raised after every stop was tried; an instance that could not be withdrawn
    is not stopped."""
    announcer = runtime.announcer
    stop = stop or (lambda instance: runtime.actuator.stop(instance, grace))
    withdrawn = []
    first: BaseException | None = None
    for instance in instances:
        try:
            if announcer is not None:
                announcer.withdraw(instance)
            withdrawn.append(instance)
        except Exception as exc:  # noqa: BLE001 - the store is away: leave it running
            first = first or exc
            _stopped(announcer, instance, gone=False)
    drain = announcer.drain if announcer is not None else 0.0
    if drain > 0 and any(i.running for i in withdrawn):
        time.sleep(drain)  # consumers stop sending to it before it hears SIGTERM
    if withdrawn:
        try:
            before_stop()  # e.g. still leading after the drain?
        except BaseException:
            for instance in withdrawn:
                _stopped(announcer, instance, gone=False)
            raise

    def one(instance: Any) -> BaseException | None:
        try:
            stop(instance)
        except Exception as exc:  # noqa: BLE001
            _stopped(announcer, instance, gone=False)
            return exc
        _stopped(announcer, instance, gone=True)
        return None

    if parallel > 1 and len(withdrawn) > 1:
        with ThreadPoolExecutor(min(parallel, len(withdrawn))) as pool:
            results = list(pool.map(one, withdrawn))
    else:
        results = [one(instance) for instance in withdrawn]
    first = first or next((r for r in results if r is not None), None)
    if first is not None:
        raise first


def _stopped(announcer: Any, instance: Any, gone: bool) -> None:
    if announcer is None:
        return
    try:
        announcer.stopped(instance, gone)
    except Exception:  # noqa: BLE001 - a third-party announcer's bookkeeping, not the stop
        log.exception("announcer %s: stopped(%s)", announcer.type_name, instance.name)
