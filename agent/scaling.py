"""The scaler: polls each service's source and writes its desired count through the policy.

One :meth:`Scaler.poll` of a service:

1. reads the source (an exception, None, NaN, an infinity or a negative
   number is a failure, never a count);
2. reads the service's keys in one request: ``desired``, ``deploy`` and
   ``policy`` (the state of :mod:`agent.policy`, JSON);
3. asks :func:`agent.policy.decide`, unless a ``deploy`` key exists: then
   scaling is paused, whoever wrote the key;
4. writes the new policy state, then the new desired count only if it
   changed, each with compare-and-set against what step 2 read, and calls the
   ``shipmate_desired_changed`` event hook with the reason.

A service with several ``sources`` has a :class:`SourceGroup` as its source:
the scaler is called at the shortest of their intervals and reads, each time,
only the sources whose own interval has passed; the others keep their last
reading (in the policy state) until it expires. With ``policy.shadow`` the
decision is made against the shadow's own count and recorded in the state
(``shadow``), and ``desired`` is never written.

The policy state goes first: if the desired write then loses a race, the
state only claims a change that did not happen, which makes the next decision
wait longer (a cooldown), never act sooner. A lost race on the state itself
(another writer) skips the desired write: the next poll decides afresh.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent import history
from agent.combine import Combine
from agent.config import source_name
from agent.durations import format_duration
from agent.keys import Keys, parse_count, parse_object
from agent.kinds import Source, SourceConfig, SourceError
from agent.policy import (
    MAX_ERROR,
    Decision,
    PolicyState,
    decide,
    decide_sources,
    observe,
    reading_error,
    record_sources,
    source_problem,
)
from agent.store import Entry, Store

log = logging.getLogger("shipmate.scaling")
PAUSED = "paused: a deploy is in progress"


@dataclass
class Reading:
    """One poll of a service's source: what it read and what the policy made of it."""

    at: float
    value: float | None
    error: str | None
    decision: Decision


class SourceGroup(Source):
    """A service's several ``sources``, by name, and how their readings combine.

    Its ``config.interval`` is the shortest of theirs (how often the scaler is
    called); :meth:`due` says which are to be read at a given time.
    """

    type_name = "combined"

    def __init__(self, members: dict[str, Source], combine: Combine) -> None:
        first = next(iter(members.values()))
        interval = min(m.config.interval for m in members.values())
        super().__init__(SourceConfig(interval=interval), first.context)
        self.members, self.combine = members, combine
        self.expiries = {name: expiry(m) for name, m in members.items()}
        self._last_read: dict[str, float] = {}

    def due(self, now: float) -> dict[str, Source]:
        """The members whose own interval has passed at ``now`` (all, at first); marks them
        read. Half the group's interval of slack keeps a late tick from skipping a turn."""
        slack = self.config.interval / 2
        out = {}
        for name, member in self.members.items():
            last = self._last_read.get(name)
            if last is None or now - last >= member.config.interval - slack:
                out[name] = member
                self._last_read[name] = now
        return out

    def read(self) -> float:
        """Every member read now and combined (what one poll with all due would see)."""
        fresh = {}
        for name, member in self.members.items():
            value, error = read_source(member)
            if error is not None:
                raise SourceError(f"{name}: {error}")
            assert value is not None
            fresh[name] = value
        return self.combine(fresh)[0]


def service_source(config: Any, make: Callable[[Any], Source]) -> Source:
    """The source of a service's config: ``make(config.source)``, or a :class:`SourceGroup`
    of its ``sources`` (each made by ``make``)."""
    if not getattr(config, "sources", None):
        return make(config.source)
    members = {source_name(cfg): make(cfg) for cfg in config.sources}
    return SourceGroup(members, Combine.parse(config.combine, list(members)))


def expiry(source: Source) -> float:
    """Seconds after which a reading of ``source`` is stale: ``expiry``, else three intervals."""
    cfg = source.config
    return cfg.expiry if getattr(cfg, "expiry", None) else 3 * cfg.interval


def read_source(source: Source) -> tuple[float | None, str | None]:
    """``(value, None)`` for a good reading, ``(None, why)`` for anything else."""
    name = source.type_name
    try:
        raw = source.read()
    except SourceError as exc:
        return None, (str(exc) or f"{name} failed")[:MAX_ERROR]
    except Exception as exc:  # noqa: BLE001 - a failing source is a held count
        return None, f"{name} failed: {type(exc).__name__}: {exc}"[:MAX_ERROR]
    bad = reading_error(raw)
    if bad is not None:
        return None, f"{name} gave {bad}"
    return float(raw), None


def load_state(entry: Entry | None, current: int | None, now: float) -> tuple[PolicyState, str]:
    """The stored policy state, and a warning if it had to be rebuilt.

    A missing or unreadable state next to an existing count is treated as "a
    change just happened at this count": the stabilization window then guards
    against a scale-down until it has seen a window of readings.
    """
    if entry is not None:
        try:
            return PolicyState.from_json(entry.value), ""
        except (ValueError, TypeError) as exc:
            warning = f"policy state at {entry.key} is unreadable ({exc}); starting afresh"
    else:
        warning = ""
    state = PolicyState()
    if current is not None:
        state.recommendations = [(now, current)]
    return state, warning


def read_state(store: Store, keys: Keys, name: str) -> PolicyState | None:
    """The policy state stored for service ``name`` (None if none or unreadable)."""
    entry = store.get(keys.service(name, "policy"))
    if entry is None:
        return None
    try:
        return PolicyState.from_json(entry.value)
    except (ValueError, TypeError):
        return None


class Scaler:
    """Polls sources and writes desired counts through the policy (compare-and-set).

    ``clock`` is ``time.time`` unless a test hands in its own. With ``dry_run``
    nothing is written: ``poll`` only says what it would do (``shipmate plan``).
    """

    def __init__(self, *, services: dict[str, Any], store: Store, keys: Keys,
                 emit: Callable[..., None] = lambda *a, **k: None, dry_run: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.services, self.store, self.keys = services, store, keys
        self.emit, self.dry_run, self.clock = emit, dry_run, clock
        self.readings: dict[str, Reading] = {}

    def poll(self, name: str) -> Reading:
        """Read the source of service ``name`` and act on it.

        :raises StoreError: if the store cannot be read or written (nothing changed then).
        """
        runtime = self.services[name]
        source = runtime.source
        policy = runtime.config.policy
        group = source if isinstance(source, SourceGroup) else None
        polled: dict[str, tuple[float | None, str | None]] = {}
        if group is not None:
            polled = {n: read_source(m) for n, m in group.due(self.clock()).items()}
            value, error = None, None
        else:
            value, error = read_source(source)
        now = self.clock()
        got = self.store.get_prefix(f"{self.keys.services}{name}/")
        desired = got.get(self.keys.service(name, "desired"))
        stored = got.get(self.keys.service(name, "policy"))
        current = parse_count(desired.value) if desired else None
        state, warning = load_state(stored, current, now)
        if warning:
            log.warning("%s: %s", name, warning)
        if not policy.shadow:
            state.shadow = None
        # a shadow decides against its own count (the live one at first)
        acting = current if not policy.shadow or state.shadow is None else state.shadow
        journal = got.get(self.keys.service(name, "deploy"))
        if journal is not None and parse_object(journal.value).get("phase") != "refused":
            if group is not None:
                paused = record_sources(state, now, polled)
                paused.decided_at = now
            else:
                paused, _ = observe(state, now, value, error, source=source.type_name)
            paused.decision = PAUSED
            decision = Decision(None, PAUSED, paused)
        elif group is not None:
            decision = decide_sources(policy, group.combine, state, acting, now, polled,
                                      group.expiries)
        else:
            decision = decide(policy, state, acting, now, value, error, source=source.type_name)
        if policy.shadow and decision.state.decision != PAUSED:
            decision = self._shadow(name, acting, decision)
        if group is not None:
            errors = [e for _, e in polled.values() if e]
            error = decision.state.error or ("; ".join(errors) or None)
            value = decision.state.reading if decision.state.error is None else None
        reading = Reading(now, value, error, decision)
        self.readings[name] = reading
        if self.dry_run:
            return reading
        if not self._write_state(name, stored, decision.state):
            return reading
        if decision.count is not None:
            self._write_desired(name, desired, current, decision)
        elif error:
            log.warning("%s: %s", name, decision.reason)
        return reading

    @staticmethod
    def _shadow(name: str, acting: int | None, decision: Decision) -> Decision:
        """The shadow's decision: its count kept in the state, nothing to write."""
        state = decision.state
        state.shadow = decision.count if decision.count is not None else acting
        state.decision = f"shadow: {decision.reason}"
        if decision.count is not None:
            log.info("%s: shadow: would set %s (%s)", name, decision.count, decision.reason)
        return Decision(None, state.decision, state)

    def _write_state(self, name: str, entry: Entry | None, state: PolicyState) -> bool:
        key = self.keys.service(name, "policy")
        raw = state.to_json()
        ok = (self.store.create(key, raw) if entry is None
              else self.store.replace(key, raw, entry.revision))
        if not ok:
            log.warning("%s: policy state changed under us (another agent?); "
                        "desired count left alone until the next poll", name)
        return ok

    def _write_desired(self, name: str, entry: Entry | None, current: int | None,
                       decision: Decision) -> None:
        assert decision.count is not None
        key = self.keys.service(name, "desired")
        value = str(decision.count)
        ok = (self.store.create(key, value) if entry is None
              else self.store.replace(key, value, entry.revision))
        if not ok:
            log.warning("%s: desired count changed under us; not written (%s)", name,
                        decision.reason)
            return
        log.info("%s: desired %s", name, decision.reason)
        self.emit("shipmate_desired_changed", service=name, old=current, new=decision.count,
                  reason=decision.reason)
        history.append(self.store, self.keys, name, "scaling", {
            "when": self.clock(), "from": current, "to": decision.count,
            "reason": decision.reason})


# ---------------------------------------------------------------- for status and plan


def summary(state: PolicyState | None, now: float, stale_after: float) -> dict[str, Any]:
    """What ``shipmate status --json`` shows of a service's policy state."""
    if state is None:
        return {"reading": None, "reading_age": None, "stale": None, "error": None,
                "failures": 0, "decision": None, "decision_age": None}
    reading_age = now - state.reading_at if state.reading_at is not None else None
    return {
        "reading": state.reading,
        "reading_age": reading_age,
        "stale": reading_age is None or reading_age > stale_after,
        "error": state.error,
        "failures": state.failures,
        "decision": state.decision or None,
        "decision_age": now - state.decided_at if state.decided_at is not None else None,
        "last_up": state.last_up,
        "last_down": state.last_down,
        "shadow": state.shadow,
        "decided_by": state.decided_by,
    }


def sources_summary(group: SourceGroup, state: PolicyState | None,
                    now: float) -> dict[str, dict[str, Any]]:
    """Each of a group's sources: its last reading, age, error, and whether it decided."""
    out = {}
    for name, member in group.members.items():
        one = state.sources.get(name) if state else None
        limit = group.expiries[name]
        age = now - one.reading_at if one and one.reading_at is not None else None
        out[name] = {
            "type": member.type_name,
            "reading": one.reading if one else None,
            "reading_age": age,
            "error": one.error if one else None,
            "failures": one.failures if one else 0,
            "good": source_problem(one, now, limit) is None,
            "decided": bool(state and state.decided_by == name),
        }
    return out


def describe_sources(group: SourceGroup, state: PolicyState | None, now: float) -> list[str]:
    """One line per source of a group, for people."""
    lines = []
    for name, row in sources_summary(group, state, now).items():
        text = f"{name} ({row['type']}): "
        if row["reading"] is not None:
            text += f"{row['reading']:g}, {format_duration(max(0.0, row['reading_age']))} ago"
        else:
            text += "no good reading yet"
        if row["error"]:
            text += f"; failing: {row['error']}"
        elif not row["good"]:
            text += f" (stale: older than {format_duration(group.expiries[name])})"
        if row["decided"]:
            text += " <- decided"
        lines.append(text)
    return lines


def describe(source: str, state: PolicyState | None, now: float, stale_after: float) -> str:
    """One line for people: the last reading, its age, and the last decision with why."""
    if state is None:
        return f"{source}: not polled yet"
    if state.reading is not None and state.reading_at is not None:
        age = max(0.0, now - state.reading_at)
        text = f"{source}: last reading {state.reading:g}, {format_duration(age)} ago"
        if age > stale_after:
            text += f" (stale: older than {format_duration(stale_after)})"
    else:
        text = f"{source}: no good reading yet"
    if state.shadow is not None:
        text += f"; shadow count {state.shadow}"
    if state.decision:
        text += f"; {state.decision}"
        if state.decided_at is not None:
            text += f" ({format_duration(max(0.0, now - state.decided_at))} ago)"
    return text
