"""Crash-loop backoff: a slot whose instance keeps exiting is restarted ever more slowly.

Kubernetes' CrashLoopBackOff and Docker's restart policy are the anchors. Per
slot of a service: after an exit (or a failed start) the next start waits
``restart.backoff`` (1 s), doubling after each further failure up to
``restart.max_backoff`` (5 min); once an instance of the slot has stayed up
and healthy for ``restart.reset_after`` (10 min) the slot starts afresh.

Each failure is logged once, at WARNING, with the exit code and the last lines
of the instance's output where the actuator has them. :meth:`Restarts.problems`
says it in words for ``shipmate status``. The first failure of a slot that was
fine emits ``shipmate_crash_loop``.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.durations import format_duration

log = logging.getLogger("shipmate.restarts")
WINDOW = 3600.0  # exits older than this are forgotten in "N exits in 4m"


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: Restarts, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class SlotState:
    failures: int = 0
    next_try: float = 0.0  # monotonic
    exits: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    last_exit: str = ""
    up_since: float | None = None  # healthy since (monotonic)


class Restarts:
    """The backoff state of every failing slot, in memory (a new agent starts afresh)."""

    def __init__(self, *, clock: Callable[[], float], settings: Callable[[str], Any],
                 emit: Callable[..., None] = lambda *a, **k: None) -> None:
        """``settings(service)`` -> that service's ``restart`` block (or None); ``emit``
        sends the ``shipmate_crash_loop`` event (outside the lock)."""
        self.clock, self.settings, self.emit = clock, settings, emit
        self.slots: dict[tuple[str, int], SlotState] = {}
        self._lock = threading.RLock()  # the loop and the action workers both record
        self._offset: float | None = None  # wall clock minus ``clock``, as last anchored

    def failed(self, service: str, slot: int, what: str, *, code: int | None = None,
               output: str | None = None) -> float:
        """Record an exit or a failed start; return the delay before the slot's next try."""
        delay, state = self._failed(service, slot, what, code=code, output=output)
        if state is not None:  # the slot was fine: a crash loop begins
            self.emit("shipmate_crash_loop", service=service, slot=slot,
                      restarts=state.failures, last_exit=state.last_exit, next_try_in=delay)
        return delay

    @_locked
    def _failed(self, service: str, slot: int, what: str, *, code: int | None,
                output: str | None) -> tuple[float, SlotState | None]:
        """The delay, and the slot's state if this failure starts a crash loop."""
        cfg = self.settings(service)
        if cfg is None:
            return 0.0, None
        now = self.clock()
        state = self.slots.get((service, slot))
        begins = state is None or state.up_since is not None
        state = self.slots.setdefault((service, slot), SlotState())
        state.failures += 1
        state.up_since = None
        state.exits.append(now)
        delay = min(cfg.backoff * 2 ** min(state.failures - 1, 30), cfg.max_backoff)
        state.next_try = now + delay
        state.last_exit = what if code is None else f"{what} (exit code {code})"
        tail = " | ".join(line for line in (output or "").splitlines()[-3:] if line.strip())
        log.warning("%s slot %d: %s; restart %d in %s%s", service, slot, state.last_exit,
                    state.failures, format_duration(delay),
                    f"; last output: {tail[:300]}" if tail else "")
        return delay, (state if begins else None)

    @_locked
    def may_start(self, service: str, slot: int) -> bool:
        state = self.slots.get((service, slot))
        return state is None or self.clock() >= state.next_try

    @_locked
    def next_try(self) -> float | None:
        """The soonest monotonic time a held slot may start, if any waits."""
        now = self.clock()
        waits = [s.next_try for s in self.slots.values() if s.next_try > now]
        return min(waits) if waits else None

    @_locked
    def healthy(self, service: str, slot: int) -> None:
        """An instance of the slot passed its health check in this pass."""
        state = self.slots.get((service, slot))
        cfg = self.settings(service)
        if state is None or cfg is None:
            return
        now = self.clock()
        if state.up_since is None:
            state.up_since = now
        elif now - state.up_since >= cfg.reset_after:
            log.info("%s slot %d: up and healthy for %s: its restart delay is reset",
                     service, slot, format_duration(now - state.up_since))
            del self.slots[(service, slot)]

    @_locked
    def forget(self, services: set[str]) -> None:
        """Drop the state of services that are no longer configured."""
        for key in [k for k in self.slots if k[0] not in services]:
            del self.slots[key]

    @_locked
    def problems(self, service: str, wall: float) -> list[dict[str, Any]]:
        """The crash-looping slots of ``service`` (times on the wall clock ``wall``), as
        records that change only with a new exit: :func:`describe` words them."""
        now = self.clock()
        # one offset between the clocks, kept while they agree within a second: the same
        # record from pass to pass (the ``problems`` key is written only when it changes)
        if self._offset is None or abs(wall - now - self._offset) > 1.0:
            self._offset = wall - now
        offset = self._offset
        out = []
        for (name, slot), state in sorted(self.slots.items()):
            recent = [t for t in state.exits if now - t <= WINDOW]
            if name != service or state.up_since is not None or not recent:
                continue
            out.append({"kind": "crash-loop", "slot": slot, "exits": len(recent),
                        "restarts": state.failures, "last_exit": state.last_exit,
                        "since": round(recent[0] + offset, 3),
                        "last_at": round(recent[-1] + offset, 3),
                        "next_try_at": round(state.next_try + offset, 3)})
        return out


def describe(problem: dict[str, Any], now: float) -> str:
    """A problem record (of the ``problems`` key) in words, as of wall-clock ``now``."""
    if problem.get("kind") != "crash-loop":
        return str(problem.get("text", problem))
    exits = problem.get("exits", 0)
    span = format_duration(max(float(problem.get("last_at", now)) - float(
        problem.get("since", now)), 1.0))
    wait = float(problem.get("next_try_at", now)) - now
    return (f"slot {problem.get('slot')} crash-looping: {exits} {'exit' if exits == 1 else 'exits'}"
            f" in {span}, last: {problem.get('last_exit')}"
            + (f", next try in {format_duration(wait)}" if wait > 0 else ", restarting"))
