"""The scaler: polls each service's source and writes its desired count through the policy.

One :meth:`Scaler.poll` of a service:

1. reads the source (an exception, None, NaN, an infinity or a negative
   number is a failure, never a count);
2. takes the service's keys from memory: ``desired``, ``deploy`` and
   ``policy`` (the state of :mod:`agent.policy`, JSON). They are read with one
   prefix read for every service at start, and again for a service whose keys
   another writer changed (the store watch says so) or whose write lost a race;
3. asks :func:`agent.policy.decide`, unless a ``deploy`` key exists: then
   scaling is paused, whoever wrote the key;
4. writes the new policy state if what decides later counts changed (a
   cooldown, the stabilization window, a failure streak starting or ending, the
   shadow's count: :meth:`agent.policy.PolicyState.durable`; not the reading
   itself, which stays in memory for ``shipmate status``), and the new desired
   count only if it changed: one transaction, compare-and-set on both against
   what it knew (etcd v2: the state, then the count); then calls the
   ``shipmate_desired_changed`` event hook with the reason.

An idle service (the same reading, nothing to change) therefore costs no store
request at all.

A service with several ``sources`` has a :class:`SourceGroup` as its source:
the scaler is called at the shortest of their intervals and reads, each time,
only the sources whose own interval has passed; the others keep their last
reading (in the policy state) until it expires. With ``policy.shadow`` the
decision is made against the shadow's own count and recorded in the state
(``shadow``), and ``desired`` is never written.

A lost race (another writer) writes neither: the next poll reads and decides
afresh. On etcd v2 (no transactions) the state goes first: if the desired write
then loses a race, the state only claims a change that did not happen, which
makes the next decision wait longer (a cooldown), never act sooner.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
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
from agent.store import Entry, Store, WatchEvent

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


def parse_state(entry: Entry | None) -> PolicyState | None:
    """The policy state in a ``policy`` key as read (None if absent or unreadable)."""
    if entry is None:
        return None
    try:
        return PolicyState.from_json(entry.value)
    except (ValueError, TypeError):
        return None


def read_state(store: Store, keys: Keys, name: str) -> PolicyState | None:
    """The policy state stored for service ``name`` (None if none or unreadable)."""
    return parse_state(store.get(keys.service(name, "policy")))


LIVE_TIMEOUT = 2.0  # seconds ``shipmate status`` waits for the agent's /status


def fetch_live(http: str | None, timeout: float = LIVE_TIMEOUT
               ) -> tuple[dict[str, PolicyState] | None, str]:
    """The acting agent's policy states as of each service's last reading, from its
    ``/status`` on ``http`` (``agent.http``); or None and why not (not set, no answer, a
    standby)."""
    if not http:
        return None, "agent.http is not set"
    import urllib.request  # only status needs it

    host, _, port = http.rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    url = f"http://{host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - http only
            data = json.loads(answer.read(64 * 1024 * 1024))
    except (OSError, ValueError) as exc:
        return None, f"the agent at {http} did not answer ({exc})"
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        return None, f"the agent at {http} did not answer with its status"
    if not data.get("leading"):
        return None, f"the agent at {http} is a standby"
    states = {}
    for name, raw in data["services"].items():
        try:
            states[str(name)] = PolicyState.from_data(raw)
        except (ValueError, TypeError):
            continue
    return states, ""


def last_states(http: str | None, names: list[str],
                stored: Callable[[str], PolicyState | None]
                ) -> tuple[dict[str, PolicyState | None], dict[str, Any]]:
    """Each service's policy state as of its last reading, for ``shipmate status``: from the
    acting agent's ``/status`` (see :func:`fetch_live`), else ``stored(name)``, its record in
    the store (written when a decision changes, not at each reading), and where they came
    from."""
    live, why = fetch_live(http)
    states = {name: live[name] if live is not None and name in live else stored(name)
              for name in names}
    if live is not None:
        return states, {"from": "agent", "address": http}
    return states, {"from": "store", "why": why}


RESYNC = 300.0
"""Seconds after which the scaler reads every service's keys again (one request), whatever
the store watch said: a bound on how long a missed watch event can mislead it."""
WATCHED = ("desired", "policy", "deploy")
"the keys of a service that the scaler reads"


@dataclass
class Known:
    """What the scaler knows of one service's keys, as it last read or wrote them."""

    desired: Entry | None
    policy: Entry | None
    deploy: Entry | None
    state: PolicyState
    "the policy state in memory: the stored one and every reading since"
    durable: tuple[Any, ...] | None
    "what of the stored state decides later counts (:meth:`PolicyState.durable`); None: none"


def _newer(known: Entry | None, read: Entry | None) -> Entry | None:
    """What a read found, unless what the scaler wrote since is newer (a read that started
    before its write)."""
    if known is not None and read is not None and known.revision > read.revision:
        return known
    return read


class Scaler:
    """Polls sources and writes desired counts through the policy (compare-and-set).

    It reads every service's keys with one prefix read when it starts (and after
    :meth:`forget`, a watch resync, or :data:`RESYNC` seconds), then keeps them in
    memory: it knows what it writes, and :meth:`changed` (the store watch) tells it
    what others wrote, which it then reads again, one service at a time. A lost
    compare-and-set reads the service again too. The policy state is written only
    when what decides later counts changes (:meth:`PolicyState.durable`); the
    readings stay in memory (:meth:`live`, the agent's ``/status``).

    ``clock`` is ``time.time`` unless a test hands in its own. With ``dry_run``
    nothing is written: ``poll`` only says what it would do (``shipmate plan``).
    """

    def __init__(self, *, services: dict[str, Any], store: Store, keys: Keys,
                 emit: Callable[..., None] = lambda *a, **k: None, dry_run: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.services, self.store, self.keys = services, store, keys
        self.emit, self.dry_run, self.clock = emit, dry_run, clock
        self.readings: dict[str, Reading] = {}
        self.polls = 0
        "polls done (that got as far as a decision)"
        self._known: dict[str, Known] = {}
        self._lock = threading.Lock()  # guards what follows; never held across store I/O
        self._loading = threading.Lock()  # one full read at a time: the others wait for it
        self._cold = True  # every service is to be read (one prefix read)
        self._resyncs = 0
        self._resync_at = 0.0
        self._stale: set[str] = set()  # services to be read again
        self._marks: dict[str, int] = {}  # changes seen per service (a read racing one is stale)
        self._pending: dict[tuple[str, str], str] = {}  # (service, key) -> value being written

    # ---------------------------------------------------------------- what it knows
    def forget(self) -> None:
        """Read every service's keys again before the next poll (leadership gained)."""
        with self._lock:
            self._cold = True
            self._resyncs += 1

    def changed(self, events: list[WatchEvent]) -> None:
        """The store watch saw ``events`` (any thread): a service whose keys another writer
        changed is read again at its next poll; an empty list (a resync) makes every
        service read again. The scaler's own writes change nothing."""
        if not events:
            self.forget()
            return
        with self._lock:
            for event in events:
                parsed = self.keys.parse(event.key)
                if parsed is None or parsed[1] not in WATCHED:
                    continue
                name, field = parsed
                if name not in self.services:
                    continue
                known = self._known.get(name)
                held = getattr(known, field) if known is not None else None
                if event.value in ((held.value if held else None),
                                   self._pending.get((name, field), ...)):
                    continue
                self._stale.add(name)
                self._marks[name] = self._marks.get(name, 0) + 1

    def knows(self, name: str) -> bool:
        """Whether service ``name``'s keys are known without reading the store."""
        with self._lock:
            return not self._cold and name in self._known and name not in self._stale

    def live(self) -> dict[str, PolicyState]:
        """Each polled service's policy state as of its last reading (the agent's /status)."""
        return {name: reading.decision.state for name, reading in list(self.readings.items())}

    def _known_of(self, name: str, now: float) -> Known:
        with self._loading:
            with self._lock:
                full = self._cold or now >= self._resync_at
            if full:
                self._load_all(now)
        with self._lock:
            known = self._known.get(name)
            if known is not None and name not in self._stale:
                return known
            mark = self._marks.get(name, 0)
        got = self.store.get_prefix(f"{self.keys.services}{name}/")
        with self._lock:
            known = self._known[name] = self._absorb(name, got, now)
            if self._marks.get(name, 0) == mark:
                self._stale.discard(name)
        return known

    def _load_all(self, now: float) -> None:
        """Every service's keys, in one prefix read."""
        with self._lock:
            marks, resyncs = dict(self._marks), self._resyncs
        entries = self.store.get_prefix(self.keys.services)
        per_service: dict[str, dict[str, Entry]] = {}
        for key, entry in entries.items():
            parsed = self.keys.parse(key)
            if parsed is not None and parsed[1] in WATCHED:
                per_service.setdefault(parsed[0], {})[key] = entry
        with self._lock:
            for name in self.services:
                self._known[name] = self._absorb(name, per_service.get(name, {}), now)
                if self._marks.get(name, 0) == marks.get(name, 0):
                    self._stale.discard(name)
            for gone in self._known.keys() - self.services.keys():
                del self._known[gone]
            if self._resyncs == resyncs:
                self._cold = False
            self._resync_at = now + RESYNC

    def _absorb(self, name: str, got: dict[str, Entry], now: float) -> Known:
        """What a read of service ``name``'s keys (``got``) says; the state in memory is kept
        while the stored one is the one it last read or wrote (called holding the lock)."""
        old = self._known.get(name)
        desired = _newer(old.desired if old else None,
                         got.get(self.keys.service(name, "desired")))
        stored = _newer(old.policy if old else None, got.get(self.keys.service(name, "policy")))
        deploy = got.get(self.keys.service(name, "deploy"))
        if old is not None and old.policy == stored:
            return Known(desired, stored, deploy, old.state, old.durable)
        current = parse_count(desired.value) if desired else None
        state, warning = load_state(stored, current, now)
        if warning:
            log.warning("%s: %s", name, warning)
        durable = None
        if stored is not None and not warning:
            durable = state.taken_over(now).durable(self.services[name].config.policy)
        return Known(desired, stored, deploy, state, durable)

    def _read_again(self, name: str) -> None:
        with self._lock:
            self._stale.add(name)

    # ---------------------------------------------------------------- polls
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
        known = self._known_of(name, now)
        desired = known.desired
        current = parse_count(desired.value) if desired else None
        state = replace(known.state)  # the decisions below copy what they change
        if not policy.shadow:
            state.shadow = None
        # a shadow decides against its own count (the live one at first)
        acting = current if not policy.shadow or state.shadow is None else state.shadow
        journal = known.deploy
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
        with self._lock:
            self.polls += 1
        if self.dry_run:
            known.state = decision.state
            self.readings[name] = reading
            return reading
        self.readings[name] = reading
        self._write(name, known, decision, policy, current)
        if decision.count is None and error:
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

    def _write(self, name: str, known: Known, decision: Decision, policy: Any,
               current: int | None) -> None:
        """Keep the new state in memory; write it if what decides later counts changed, and
        the new count if there is one, in one transaction (compare-and-set on both)."""
        state, durable = decision.state, decision.state.durable(policy)
        writes = []
        if known.policy is None or durable != known.durable:
            writes.append(("policy", known.policy, state.to_json()))
        if decision.count is not None:
            writes.append(("desired", known.desired, str(decision.count)))
        if writes and not self._put(name, known, writes):
            if decision.count is None:
                log.warning("%s: policy state changed under us (another agent?); read "
                            "again at the next poll", name)
            else:
                log.warning("%s: desired count or policy state changed under us (another "
                            "agent?); not written (%s)", name, decision.reason)
            return
        with self._lock:
            known.state = state
            if writes and writes[0][0] == "policy":
                known.durable = durable
        if decision.count is None:
            return
        log.info("%s: desired %s", name, decision.reason)
        self.emit("shipmate_desired_changed", service=name, old=current, new=decision.count,
                  reason=decision.reason)
        history.append(self.store, self.keys, name, "scaling", {
            "when": self.clock(), "from": current, "to": decision.count,
            "reason": decision.reason})

    def _put(self, name: str, known: Known, writes: list[tuple[str, Entry | None, str]]
             ) -> bool:
        """Compare-and-set each ``(field, entry as known, value)`` of service ``name`` in one
        transaction, and know what it wrote; False if another writer came first (the
        service is then read again)."""
        with self._lock:  # its own watch events are no change
            self._pending.update({(name, field): value for field, _, value in writes})
        try:
            revisions = self.store.put_all_if([
                (self.keys.service(name, field), value, entry.revision if entry else None)
                for field, entry, value in writes])
        finally:
            with self._lock:
                for field, _, _ in writes:
                    self._pending.pop((name, field), None)
        if revisions is None:
            self._read_again(name)
            return False
        with self._lock:
            for (field, _, value), revision in zip(writes, revisions, strict=True):
                setattr(known, field, Entry(self.keys.service(name, field), value, revision))
        return True


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
