"""The scaling policy: readings in, a safe desired count out.

:func:`decide` is a pure function: the caller hands it the policy, the state
remembered from earlier polls, the desired count now in the store, the clock
and the new reading (or the error that took its place), and gets back the
count to write (if any), why, and the state to remember. The rules, in order:

1. **A bad reading never lowers the count.** An error, an empty series, a
   null, a NaN, an infinity or a negative number counts as a failure. With
   ``on_error: hold`` the count stays (it may still rise to ``min``); with
   ``on_error: fallback``, after ``fallback_after`` failures in a row, the count
   rises to ``fallback`` if it is below it. A failure also records the held
   count as a recommendation, so the stabilization window starts afresh after
   every failure: a scale-down needs a whole window of good readings.
2. A good reading is rounded up to whole instances and clamped to
   ``[min, max]``: that is the reading's *recommendation*.
3. **Scale-up** goes to the recommendation once ``cooldown_up`` has passed since
   the last change (either way).
4. **Scale-down** goes only to the highest recommendation of the last
   ``stabilization`` seconds, once ``cooldown_down`` has passed since the last
   change (either way).
5. No decision moves the count by more than ``max_step``.
6. With no count in the store yet, a good reading sets it directly.

With several sources (:func:`decide_sources`), each source's last reading is
kept on its own (:class:`SourceState`); the good and fresh ones are combined
(:mod:`agent.combine`) into one reading that goes through the rules above, and
**while any source has no good reading the count may rise but never fall**.
None of them good is a failure (rule 1).

In shadow mode the scaler calls the same functions with the shadow's own count
(:attr:`PolicyState.shadow`) as the current one, and never writes ``desired``.

:class:`PolicyState` is what the policy remembers; the scaler keeps it as JSON
in the store (``<prefix>/<cluster>/services/<service>/policy``) so that a
restarted agent, or a standby that takes over, keeps honouring cooldowns and the
stabilization window. It is written only when what decides later counts changes
(:meth:`PolicyState.durable`), not at every reading.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from numbers import Real
from typing import Any

from agent.combine import Combine, CombineError
from agent.config import PolicyConfig
from agent.durations import format_duration
from agent.keys import load_json

MAX_ERROR = 300  # characters of an error message kept in the state
MAX_COUNT = 100_000  # no count beyond this, whatever a source says (agent.max_instances' top)
MAX_READING = 1e9  # a reading (instances' worth) beyond any count: an error, not a count


@dataclass
class SourceState:
    """The last reading of one of a service's several sources."""

    reading: float | None = None
    "the last good reading, in instances"
    reading_at: float | None = None
    error: str | None = None
    "why its last poll had no good reading (None once a good one arrives)"
    error_at: float | None = None
    failures: int = 0
    "failed readings in a row"


@dataclass
class PolicyState:
    """What the policy remembers between polls (and what status shows)."""

    last_up: float | None = None
    "when the count last rose (or was first set)"
    last_down: float | None = None
    "when the count last fell"
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    "(time, count) of the stabilization window, only those that can still be its highest"
    failures: int = 0
    "failed readings in a row"
    reading: float | None = None
    "the last good reading"
    reading_at: float | None = None
    error: str | None = None
    "why the last poll had no good reading (None once a good one arrives)"
    error_at: float | None = None
    decision: str = ""
    "the last decision, in words"
    decided_at: float | None = None
    sources: dict[str, SourceState] = field(default_factory=dict)
    "with several sources: each one's last reading, by name"
    decided_by: str | None = None
    "with several sources: the one whose reading the combination took (None: none alone)"
    shadow: int | None = None
    "in shadow mode: the count the policy would have set (``desired`` is left alone)"

    @property
    def last_change(self) -> float | None:
        """When the count last changed either way."""
        times = [t for t in (self.last_up, self.last_down) if t is not None]
        return max(times) if times else None

    def to_json(self) -> str:
        """The state as stored (a JSON object)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    def durable(self, policy: PolicyConfig) -> tuple[Any, ...]:
        """What of the state decides later counts, and so must be in the store for an
        agent that takes over: the state is written only when this changes.

        In it: when the count last rose and fell (the cooldowns), the stabilization
        window (every recommendation with its time, but the newest one's time, which
        every reading renews: :meth:`taken_over` makes up for it), failed readings in
        a row up to the count that matters (one; ``fallback_after`` with ``on_error:
        fallback``), which sources fail, and the shadow's count. Not in it: the
        readings, their times and the words of the decision; they live in the
        agent's memory (``shipmate status`` asks the agent for them).
        """
        window = [*self.recommendations[:-1],
                  *(("newest", n) for _, n in self.recommendations[-1:])]
        enough = policy.fallback_after if policy.on_error == "fallback" else 1
        failing = sorted(name for name, one in self.sources.items() if one.failures)
        return (self.last_up, self.last_down, window, min(self.failures, enough), failing,
                self.shadow)

    def taken_over(self, now: float) -> PolicyState:
        """A stored state, as an agent that has just read it must use it: the newest
        recommendation taken to hold until ``now`` (the state is not written for each
        reading that renews it), so a scale-down waits a whole stabilization window
        more at most, never less."""
        if self.recommendations:
            at, count = self.recommendations[-1]
            self.recommendations[-1] = (now if at is None else max(at, now), count)
        return self

    @classmethod
    def from_json(cls, raw: str) -> PolicyState:
        """Parse a stored state; ValueError (saying what is wrong) if it is not one."""
        return cls.from_data(load_json(raw))

    @classmethod
    def from_data(cls, data: Any) -> PolicyState:
        """A state from its parsed JSON (as stored, or as the agent's /status shows it);
        ValueError (saying what is wrong) if it is not one. Unknown fields are ignored."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        state = cls()
        for name in ("last_up", "last_down", "reading", "reading_at", "error_at",
                     "decided_at"):
            setattr(state, name, _optional_number(data.get(name), name))
        for name in ("error", "decision", "decided_by"):
            value = data.get(name, getattr(state, name))
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} is not text")
            setattr(state, name, None if value is None else value[:MAX_ERROR])
        failures = data.get("failures", 0)
        if type(failures) is not int or not 0 <= failures <= 1_000_000_000:
            raise ValueError("failures is not a count")
        state.failures = failures
        window = data.get("recommendations", [])
        if not isinstance(window, list) or len(window) > 10_000:
            raise ValueError("recommendations is not a list of (time, count)")
        for item in window:
            if not (isinstance(item, list) and len(item) == 2 and type(item[1]) is int
                    and 0 <= item[1] <= MAX_COUNT):
                raise ValueError("recommendations is not a list of (time, count)")
            state.recommendations.append((_optional_number(item[0], "a recommendation"),
                                          item[1]))
        known = set(SourceState.__dataclass_fields__)
        sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
        state.sources = {str(name): SourceState(**{k: v for k, v in one.items() if k in known})
                         for name, one in sources.items() if isinstance(one, dict)}
        shadow = data.get("shadow")
        if shadow is not None and (type(shadow) is not int or not 0 <= shadow <= MAX_COUNT):
            raise ValueError("shadow is not a count")
        state.shadow = shadow
        return state


def _optional_number(value: Any, name: str) -> float | None:
    """A finite number (or None) from a stored state; ValueError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} is not a finite number")
    return float(value)


@dataclass(frozen=True)
class Decision:
    """The count to write (None: keep what is there), why in words, and the new state."""

    count: int | None
    reason: str
    state: PolicyState = field(default_factory=PolicyState, compare=False, repr=False)


def reading_error(value: Any) -> str | None:
    """Why ``value`` is not a usable reading (words that follow "gave"), or None if it is one."""
    if value is None:
        return "no value (null)"
    if isinstance(value, bool) or not isinstance(value, Real):
        return f"{value!r}, not a number"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return f"{value}, not a finite number"
    if value < 0:
        return f"{value:g}, a negative number"
    if value > MAX_READING:
        return f"{value:g}, beyond any count"
    return None


def observe(state: PolicyState, now: float, value: Any, error: str | None = None, *,
            source: str = "source") -> tuple[PolicyState, str | None]:
    """A copy of ``state`` with this reading, or this failure, recorded; and the failure.

    A good reading resets the failure count; a bad one (``error`` set, or a value
    that :func:`reading_error` rejects) adds one. Used alone while scaling is
    paused, so status still shows what the source says.
    """
    state = replace(state, recommendations=list(state.recommendations), decided_at=now)
    if error is None:
        bad = reading_error(value)
        if bad is not None:
            error = f"{source} gave {bad}"
    if error is not None:
        state.failures += 1
        state.error, state.error_at = error[:MAX_ERROR], now
        return state, state.error
    state.failures, state.error, state.error_at = 0, None, None
    state.reading, state.reading_at = float(value), now
    return state, None


def decide(policy: PolicyConfig, state: PolicyState, current: int | None, now: float,
           value: float | None, error: str | None = None, *, source: str = "source",
           detail: str = "", hold_down: str | None = None) -> Decision:
    """Turn one reading (or failure) into a decision.

    :param policy: the service's ``policy`` block.
    :param state: what earlier decisions remembered (a fresh state if none); not changed.
    :param current: the desired count now in the store (None: none yet or unreadable).
    :param now: the clock, in seconds (``time.time()``).
    :param value: the source's reading in instances (fractions round up), or None.
    :param error: why there is no reading; set, it makes ``value`` ignored.
    :param source: the source's name, for the reason text.
    :param detail: words that follow the reading in the reason text.
    :param hold_down: why the count must not fall now (a source without a good
        reading); the count may still rise.
    :returns: the decision; its ``count`` is None or differs from ``current``.
    """
    state, error = observe(state, now, value, error, source=source)
    if error is not None:
        decision = _on_error(policy, state, current, now, error)
    else:
        assert state.reading is not None
        decision = _on_reading(policy, state, current, now, state.reading,
                               f"{source} reads {state.reading:g}{detail}", hold_down)
    state.decision = decision.reason
    return decision


def record_sources(state: PolicyState, now: float,
                   polled: dict[str, tuple[float | None, str | None]]) -> PolicyState:
    """A copy of ``state`` with the readings (or failures) of the sources polled now.

    :param polled: ``{name: (value, error)}`` of the sources read at ``now``
        (those not due keep their last reading).
    """
    state = replace(state, recommendations=list(state.recommendations),
                    sources={n: replace(s) for n, s in state.sources.items()})
    for name, (value, error) in polled.items():
        one = state.sources.setdefault(name, SourceState())
        if error is None:
            bad = reading_error(value)
            error = f"{name} gave {bad}" if bad is not None else None
        if error is not None:
            one.failures += 1
            one.error, one.error_at = error[:MAX_ERROR], now
        else:
            assert value is not None
            one.failures, one.error, one.error_at = 0, None, None
            one.reading, one.reading_at = float(value), now
    return state


def source_problem(one: SourceState | None, now: float, expiry: float) -> str | None:
    """Why a source has no good reading at ``now`` (None if it has one)."""
    if one is None or (one.reading is None and one.error is None):
        return "no reading yet"
    if one.error is not None:
        return one.error
    assert one.reading_at is not None
    age = now - one.reading_at
    if age > expiry:
        return (f"its reading is {format_duration(age)} old (expiry "
                f"{format_duration(expiry)})")
    return None


def decide_sources(policy: PolicyConfig, combine: Combine, state: PolicyState,
                   current: int | None, now: float,
                   polled: dict[str, tuple[float | None, str | None]],
                   expiry: dict[str, float]) -> Decision:
    """Turn the readings of several sources into one decision.

    :param combine: how the good readings become one (:class:`agent.combine.Combine`).
    :param polled: ``{name: (value, error)}`` of the sources read at ``now``.
    :param expiry: every configured source's name (in order) and its expiry in
        seconds: an older reading is no good reading.
    :returns: the decision, as :func:`decide`; its state has every source's reading and
        ``decided_by``.
    """
    state = record_sources(state, now, polled)
    state.sources = {n: s for n, s in state.sources.items() if n in expiry}
    fresh: dict[str, float] = {}
    missing: dict[str, str] = {}
    for name, limit in expiry.items():
        one = state.sources.get(name)
        problem = source_problem(one, now, limit)
        if problem is None:
            assert one is not None and one.reading is not None
            fresh[name] = one.reading
        else:
            missing[name] = problem
    last = {n: s.reading for n, s in state.sources.items() if s.reading is not None}
    value: float | None = None
    error: str | None = None
    by: str | None = None
    without = "; ".join(f"{n}: {p}" for n, p in missing.items())
    if not fresh:
        error = f"no source has a good reading ({without})"
    else:
        try:
            value, by = combine(fresh, last)
        except CombineError as exc:
            error = f"combine: {exc}"
    parts = ", ".join(f"{n} {v:g}" for n, v in fresh.items())
    how = f"{combine.spec!r} with" if combine.is_expression else f"{combine.spec} of"
    detail = f" ({how} {parts}" + (f"; without {without})" if missing else ")")
    hold = None
    if missing:
        hold = f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no good reading"
    label = by or ("the expression" if combine.is_expression else combine.spec)
    decision = decide(policy, state, current, now, value, error, source=label, detail=detail,
                      hold_down=hold)
    decision.state.decided_by = by if error is None else None
    return decision


# ---------------------------------------------------------------- the rules


def _on_error(policy: PolicyConfig, state: PolicyState, current: int | None, now: float,
              error: str) -> Decision:
    why = error + ("" if state.failures == 1 else f" ({_times(state.failures)} in a row)")
    floor = policy.min
    mode = "held"
    if policy.on_error == "fallback" and state.failures >= policy.fallback_after:
        assert policy.fallback is not None
        floor, mode = max(policy.fallback, policy.min), "fallback"
    if current is None:
        if mode != "fallback":
            return Decision(None, f"no count yet: {why}", state)
        _remember(state, now, floor, policy.stabilization)
        _changed(state, now, up=True)
        n = state.failures
        return Decision(floor, f"set to {floor} (fallback after {n} failed "
                               f"reading{'s' if n != 1 else ''} in a row): {error}", state)
    if current >= floor:
        _remember(state, now, current, policy.stabilization)
        return Decision(None, f"held at {current}: {why}", state)
    target, limits = _limited(policy, current, floor)
    wait = _cooldown(policy, state, now, up=True)
    _remember(state, now, max(current, target) if wait is None else current,
              policy.stabilization)
    if wait is not None:
        return Decision(None, f"held at {current}: {why}; {mode} to {floor} waits for {wait}",
                        state)
    _changed(state, now, up=True)
    goal = "fallback" if mode == "fallback" else "min"
    return Decision(target, f"up {current} -> {target} ({goal} {floor}{limits}) while the "
                            f"source fails: {why}", state)


def _on_reading(policy: PolicyConfig, state: PolicyState, current: int | None, now: float,
                value: float, said: str, hold_down: str | None = None) -> Decision:
    # round first: 0.7 / 0.1 is 6.999..., and 3.0000000000000004 must not become 4
    raw = math.ceil(round(value, 9))
    wanted = _clamp(policy, raw)
    said += _clamped(policy, raw, wanted)
    if hold_down and current is not None and wanted < current:
        # like a failure: the window starts afresh, a scale-down needs a whole good window
        _remember(state, now, current, policy.stabilization)
        return Decision(None, f"held at {current}: {said}, wants {wanted}; no scale-down "
                              f"while {hold_down}", state)
    _remember(state, now, wanted, policy.stabilization)
    if current is None:
        _changed(state, now, up=True)
        return Decision(wanted, f"set to {wanted}: {said} (no count before)", state)
    if wanted == current:
        return Decision(None, f"steady at {current}: {said}", state)
    if wanted > current:
        wait = _cooldown(policy, state, now, up=True)
        if wait is not None:
            return Decision(None, f"held at {current}: {said}, wants {wanted}; waits for {wait}",
                            state)
        target, limits = _limited(policy, current, wanted)
        _changed(state, now, up=True)
        return Decision(target, f"up {current} -> {target}: {said}{limits}", state)
    stable = min(current, state.recommendations[0][1])  # the window's highest
    window = format_duration(policy.stabilization)
    if stable >= current:
        return Decision(None, f"held at {current}: {said}, wants {wanted}; {current} or more "
                              f"was recommended within the {window} stabilization window",
                        state)
    wait = _cooldown(policy, state, now, up=False)
    if wait is not None:
        return Decision(None, f"held at {current}: {said}, wants {stable}; waits for {wait}",
                        state)
    target, limits = _limited(policy, current, stable)
    _changed(state, now, up=False)
    over = (f", the highest in the {window} stabilization window" if policy.stabilization
            else "")
    wants = f" (wants {wanted})" if stable != wanted else ""
    return Decision(target, f"down {current} -> {target}: {said}{wants}{over}{limits}", state)


# ---------------------------------------------------------------- helpers


def _clamp(policy: PolicyConfig, count: int) -> int:
    count = min(max(policy.min, count), MAX_COUNT)
    return count if policy.max is None else min(policy.max, count)


def _clamped(policy: PolicyConfig, raw: int, wanted: int) -> str:
    if raw == wanted:
        return ""
    bound = "min" if wanted > raw else "max"
    return f" (wants {raw}, {bound} {wanted})"


def _limited(policy: PolicyConfig, current: int, target: int) -> tuple[int, str]:
    """``target`` moved at most ``max_step`` from ``current``, and a note if it was cut."""
    step = policy.max_step
    if step is None or abs(target - current) <= step:
        return target, ""
    cut = current + step if target > current else current - step
    return cut, f"; max_step {step} of the way to {target}"


def _cooldown(policy: PolicyConfig, state: PolicyState, now: float, *, up: bool) -> str | None:
    """None if the cooldown has passed, else what is still awaited, in words."""
    length = policy.up_cooldown if up else policy.down_cooldown
    last = state.last_change
    if not length or last is None:
        return None
    since = max(0.0, now - last)
    if since >= length:
        return None
    name = "cooldown_up" if up else "cooldown_down"
    return f"{name} ({format_duration(since)} of {format_duration(length)} since the last change)"


def _changed(state: PolicyState, now: float, *, up: bool) -> None:
    if up:
        state.last_up = now
    else:
        state.last_down = now


def _remember(state: PolicyState, now: float, count: int, window: float) -> None:
    """Add a recommendation, keeping only those that can still be the window's highest.

    The list stays ordered oldest first with strictly falling counts (a
    sliding-window maximum), so it is small whatever the window and interval.
    """
    recs = [(t, n) for t, n in state.recommendations if t > now - window and n > count]
    recs.append((now, count))
    state.recommendations = recs


_WORDS = ("once", "twice", "three times", "four times", "five times", "six times",
          "seven times", "eight times", "nine times", "ten times")


def _times(n: int) -> str:
    return _WORDS[n - 1] if 1 <= n <= len(_WORDS) else f"{n} times"
