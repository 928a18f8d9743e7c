"""Health probes off the pass: each running instance checked on its own cadence.

The pass tells the :class:`Prober` what runs (:meth:`Prober.track`, after its
actuator lists) and reads the latest results (:meth:`Prober.health`); it never
waits for a probe. Probes run on a bounded pool of daemon threads:

- an instance that has not passed yet (new, unknown, or failing) is probed
  every 100 ms at first, backing off with the time since its state last
  changed (a twentieth of it: 0.5 s after 10 s, 3 s after a minute) up to the
  check's ``interval``; so a new instance is seen healthy within about 100 ms
  of it actually being healthy, and one that never passes costs little;
- a healthy instance is probed every ``interval`` (``health.interval``, 10 s,
  give or take a tenth: instances started together are not probed together);
- an instance that vanished from the list is dropped (a late result is ignored).

At most ``workers`` probes are in flight at once, one per instance, and at most
``rate`` begin per second (1,000: a scale-up of thousands of new instances, each
due every 100 ms, never takes the agent's CPU; they are probed in turn). A probe that
hangs past its check's ``timeout`` (plus a second) counts as failed and its
thread is replaced, up to twice ``workers`` threads in all, so a hanging probe
holds up no other beyond its timeout.

Whenever an instance's state changes (unknown or unhealthy to healthy, healthy
to unhealthy, unknown to unhealthy) ``on_change(instance, healthy, was)`` is
called on the probe's thread: the one place a health transition is seen (the
loop announces or withdraws the instance there, at once).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.instances import Instance

log = logging.getLogger("shipmate.probes")
FIRST = 0.1  # seconds between the first probes of an instance that has not passed
BACKOFF = 0.05  # then this fraction of the time since its state last changed
DEFAULT_INTERVAL = 10.0  # a healthy instance's cadence when its check names none
HANG_SLACK = 1.0  # a probe this long past its timeout has hung
NO_CHECK_TIMEOUT = 10.0  # the timeout of an actuator's own check (no health block)

Check = Callable[[Instance], bool]
"""One probe of one instance: True if it passes (may raise: failed)."""
OnChange = Callable[[Instance, bool, "bool | None"], None]


@dataclass
class _Target:
    instance: Instance
    check: Check
    interval: float
    timeout: float
    changed: float  # monotonic time its state last changed (or it was first seen)
    healthy: bool | None = None
    due: float = 0.0
    token: int = 0  # the probe in flight (0: none)
    started: float = 0.0


@dataclass
class _Pool:
    """Probe threads: each job on the queue was given an idle thread, a new thread, or
    waits as backlog for the next thread that finishes."""

    threads: int = 0
    idle: int = 0
    backlog: int = 0
    hung: set[int] = field(default_factory=set)  # tokens of probes given up on
    jobs: queue.SimpleQueue[tuple[_Target, int] | None] = field(
        default_factory=queue.SimpleQueue)


class Prober:
    """Probes tracked instances on daemon threads; see the module docstring."""

    def __init__(self, *, workers: int = 16, rate: float = 1000.0,
                 on_change: OnChange | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = max(1, workers)
        self.rate = rate
        self._tokens, self._filled = float(self.workers), clock()
        self.max_threads = 2 * self.workers
        self.on_change = on_change
        self.clock = clock
        self.probes = 0
        "probes finished (tests and metrics)"
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._targets: dict[str, _Target] = {}
        self._by_service: dict[str, set[str]] = {}  # service -> its tracked instances
        self._heap: list[tuple[float, int, str]] = []  # healthy ones' next probes
        self._first: list[tuple[float, int, str]] = []  # the others': probed first
        self._seq = itertools.count(1)
        self._in_flight: dict[str, _Target] = {}
        self._pool = _Pool()
        self._closed = False
        self._scheduler = threading.Thread(target=self._schedule, daemon=True, name="probes")
        self._scheduler.start()

    # ---------------------------------------------------------------- what runs
    def track(self, instances: Iterable[tuple[Instance, Check, Any]],
              keep: Callable[[Instance], bool] = lambda instance: False,
              services: set[str] | None = None) -> None:
        """Probe exactly these running instances from now on: ``(instance, check, config)``
        with ``config`` the service's ``health`` block (its ``interval`` and ``timeout``)
        or None. New ones are probed at once; one whose listing changed (a container's
        HEALTHCHECK status, say) is probed again at once; the others that are not named
        are dropped, unless ``keep(instance)`` (its service could not be listed).
        ``services``: these are all the instances of only those services (the others'
        are left as they are)."""
        now = self.clock()
        with self._lock:
            seen = set()
            by_service = self._by_service
            for instance, check, config in instances:
                seen.add(instance.name)
                by_service.setdefault(instance.service, set()).add(instance.name)
                interval = float(getattr(config, "interval", None) or DEFAULT_INTERVAL)
                timeout = (float(getattr(config, "timeout", None) or NO_CHECK_TIMEOUT)
                           if config is not None and (config.http or config.tcp)
                           else NO_CHECK_TIMEOUT)
                target = self._targets.get(instance.name)
                if target is None:
                    target = self._targets[instance.name] = _Target(
                        instance, check, interval, timeout, changed=now)
                    self._due(target, now)
                    continue
                moved = (target.instance != instance or target.instance.ref != instance.ref
                         or target.interval != interval)
                target.instance, target.check = instance, check
                target.interval, target.timeout = interval, timeout
                if moved and target.due > now:
                    self._due(target, now)
            names = (self._targets.keys() if services is None
                     else {n for s in services for n in by_service.get(s, ())})
            for name in [n for n in names if n not in seen and n in self._targets
                         and not keep(self._targets[n].instance)]:
                target = self._targets.pop(name)
                self._in_flight.pop(name, None)
                owned = by_service.get(target.instance.service)
                if owned is not None:
                    owned.discard(name)
                    if not owned:
                        del by_service[target.instance.service]
            self._wake.notify()

    def health(self, name: str) -> bool | None:
        """The latest result for instance ``name``: None while unknown (not probed yet)."""
        target = self._targets.get(name)
        return None if target is None else target.healthy

    def clear(self) -> None:
        """Forget every instance (this agent no longer acts for the cluster)."""
        with self._lock:
            self._targets.clear()
            self._by_service.clear()
            self._in_flight.clear()
            self._heap.clear()
            self._first.clear()

    def close(self) -> None:
        """Stop probing; threads in a probe finish it on their own (daemons)."""
        with self._lock:
            self._closed = True
            self._targets.clear()
            self._by_service.clear()
            self._in_flight.clear()
            for _ in range(self._pool.threads):
                self._pool.jobs.put(None)
            self._wake.notify()

    # ---------------------------------------------------------------- scheduling
    def _due(self, target: _Target, when: float) -> None:
        target.due = when
        heapq.heappush(self._heap if target.healthy else self._first,
                       (when, next(self._seq), target.instance.name))

    def _next_due(self, target: _Target, now: float) -> float:
        if target.healthy:  # spread out: instances started together are not probed together
            return now + target.interval * random.uniform(0.9, 1.1)
        return now + min(target.interval, max(FIRST, BACKOFF * (now - target.changed)))

    def _schedule(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now = self.clock()
                changes = self._expire(now)
                self._tokens = min(float(self.workers),
                                   self._tokens + (now - self._filled) * self.rate)
                self._filled = now
                while (not changes and (heap := self._due_heap(now)) is not None
                       and len(self._in_flight) < self.workers and self._tokens >= 1):
                    due, _, name = heapq.heappop(heap)
                    target = self._targets.get(name)
                    if target is None or target.due != due or name in self._in_flight:
                        continue  # dropped, rescheduled since, or being probed
                    self._tokens -= 1
                    self._dispatch(target, now)
                if not changes:
                    waits = [t.started + t.timeout + HANG_SLACK
                             for t in self._in_flight.values()]
                    tops = [h[0][0] for h in (self._first, self._heap) if h]
                    if tops and len(self._in_flight) < self.workers:
                        waits.append(max(min(tops),
                                         now + max(0.0, 1 - self._tokens) / self.rate))
                    self._wake.wait(max(0.0, min(waits) - now) if waits else None)
            for change in changes:  # outside the lock: a handler may take its time
                self._changed(*change)

    def _due_heap(self, now: float) -> list[tuple[float, int, str]] | None:
        """The heap whose next probe is due: an instance not healthy yet goes before every
        healthy one's re-probe (a backlog of those never delays a new instance)."""
        for heap in (self._first, self._heap):
            if heap and heap[0][0] <= now:
                return heap
        return None

    def _dispatch(self, target: _Target, now: float) -> None:
        target.token = next(self._seq)
        target.started = now
        self._in_flight[target.instance.name] = target
        pool = self._pool
        if pool.idle:
            pool.idle -= 1
        elif pool.threads < self.max_threads:
            pool.threads += 1
            threading.Thread(target=self._work, daemon=True,
                             name=f"probe-{next(self._seq)}").start()
        else:
            pool.backlog += 1
        pool.jobs.put((target, target.token))

    def _expire(self, now: float) -> list[tuple[Instance, bool, bool | None]]:
        """A probe past its timeout has hung: it failed, and its thread no longer counts
        (it ends once its probe returns), so another may take its place."""
        changes = []
        for name, target in list(self._in_flight.items()):
            if now >= target.started + target.timeout + HANG_SLACK:
                log.warning("the health check of %s hung for %.1fs: counted as failed",
                            name, now - target.started)
                self._pool.hung.add(target.token)
                self._pool.threads -= 1
                change = self._finish(target, target.token, False, now)
                if change is not None:
                    changes.append(change)
        return changes

    # ---------------------------------------------------------------- probing
    def _work(self) -> None:
        pool = self._pool
        while True:
            job = pool.jobs.get()
            if job is None:
                return
            target, token = job
            try:
                ok = bool(target.check(target.instance))
            except Exception:  # noqa: BLE001 - a failing check is an unhealthy instance
                ok = False
            change = None
            with self._lock:
                if token in pool.hung:  # given up on: its result is stale, its thread gone
                    pool.hung.discard(token)
                    return
                change = self._finish(target, token, ok, self.clock())
                if pool.backlog:
                    pool.backlog -= 1  # the next job on the queue is this thread's
                else:
                    pool.idle += 1
                self._wake.notify()
            if change is not None:
                self._changed(*change)

    def _finish(self, target: _Target, token: int, ok: bool,
                now: float) -> tuple[Instance, bool, bool | None] | None:
        """Record a result (with the lock held); the change to report, if any."""
        name = target.instance.name
        if self._in_flight.get(name) is not target or target.token != token:
            return None  # dropped or forgotten meanwhile
        del self._in_flight[name]
        self.probes += 1
        if self._targets.get(name) is not target:
            return None
        was = target.healthy
        target.healthy = ok
        if was != ok:
            target.changed = now
        self._due(target, self._next_due(target, now))
        return (target.instance, ok, was) if was != ok else None

    def _changed(self, instance: Instance, healthy: bool, was: bool | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(instance, healthy, was)
        except Exception:  # noqa: BLE001 - the prober goes on whatever a listener does
            log.exception("health change of %s: its handler failed", instance.name)
