"""Replaying a service's policy over past readings: ``shipmate simulate``.

The replay runs the very functions the live scaler runs
(:func:`agent.policy.decide`, or :func:`agent.policy.decide_sources` with
several sources) with the clock injected: one decision every ``step``
seconds, the count carried from one to the next as if every decision had been
written. Readings are the sources' raw values (each source's own conversion,
such as ``value / target``, applies), and each holds until the next one.

Where the readings come from:

- a CSV file of ``time,value`` (one source), or ``time,name,value`` (several;
  a source that is not in the file uses its own history, as a static or a
  schedule source has); ``time`` is seconds since the epoch or ISO 8601 (UTC
  unless it says otherwise); an empty value is a failed reading;
- or each source's own history (:meth:`agent.Source.history`: Prometheus's
  ``query_range``, Datadog's query with ``from``/``to``).

:func:`replay` gives a :class:`Replay`; :meth:`Replay.summary` the numbers;
:func:`chart` a terminal drawing and :func:`plot` a PNG (matplotlib, imported
only there).
"""

from __future__ import annotations

import csv
import math
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agent.kinds import Context, Source, SourceError
from agent.policy import PolicyState, decide, decide_sources
from agent.scaling import SourceGroup, service_source

Points = list[tuple[float, float | None]]
"(time, raw value or None for a failed reading), oldest first"


class SimulateError(Exception):
    """Bad input to a replay; the message says what and where."""


@dataclass
class Action:
    at: float
    old: int
    new: int
    reason: str


@dataclass
class Replay:
    """A replayed policy: the count and the wanted count at every step, and the actions."""

    step: float
    times: list[float] = field(default_factory=list)
    counts: list[int | None] = field(default_factory=list)
    "the count after each decision (None: none yet)"
    wanted: list[int | None] = field(default_factory=list)
    "what the combined reading asked for (ceil, before min/max), None without a good one"
    actions: list[Action] = field(default_factory=list)
    readings: dict[str, Points] = field(default_factory=dict)
    "each source's raw readings, for the drawing"
    end: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The numbers of the replay (what ``--json`` prints)."""
        spans = [min(self.step, self.end - t) for t in self.times]
        known = [(c, s) for c, s in zip(self.counts, spans, strict=True) if c is not None]
        total = sum(s for _, s in known)
        under = sum(s for c, w, s in zip(self.counts, self.wanted, spans, strict=True)
                    if w is not None and (c is None or w > c))
        ups = [a for a in self.actions if a.new > a.old]
        return {
            "start": self.times[0] if self.times else None,
            "end": self.end,
            "step": self.step,
            "decisions": len(self.times),
            "actions_up": len(ups),
            "actions_down": len(self.actions) - len(ups),
            "instance_hours": round(sum(c * s for c, s in known) / 3600, 6),
            "under_provisioned_minutes": round(under / 60, 6),
            "min": min((c for c, _ in known), default=None),
            "max": max((c for c, _ in known), default=None),
            "mean": round(sum(c * s for c, s in known) / total, 6) if total else None,
            "largest_step": max((abs(a.new - a.old) for a in self.actions), default=0),
        }


# ---------------------------------------------------------------- readings


def parse_time(text: str) -> float:
    """Seconds since the epoch from a number or ISO 8601 text (naive: UTC)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def read_csv(path: str | Path, names: list[str]) -> dict[str, Points]:
    """Readings by source name from a CSV of ``time,value`` or ``time,name,value``.

    A first line whose time is not a time is a header. With one source, two
    columns are enough; its name may be left out.

    :raises SimulateError: naming the file and line of the first bad row.
    """
    path = Path(path)
    out: dict[str, Points] = {}
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except OSError as exc:
        raise SimulateError(f"{path}: cannot read: {exc.strerror}") from None
    for number, row in enumerate(rows, start=1):
        row = [cell.strip() for cell in row]
        if not row or not any(row) or row[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        if len(row) not in (2, 3):
            raise SimulateError(f"{where}: expected time,value or time,name,value, "
                                f"got {len(row)} columns")
        try:
            at = parse_time(row[0])
        except ValueError:
            if number == 1:
                continue  # a header
            raise SimulateError(f"{where}: {row[0]!r} is not a time (seconds since the epoch "
                                "or ISO 8601, like 2026-12-01T08:00:00Z)") from None
        if len(row) == 2:
            if len(names) != 1:
                raise SimulateError(f"{where}: the service has several sources "
                                    f"({', '.join(names)}): give time,name,value")
            (_, value), name = row, names[0]
        else:
            _, name, value = row
            if name not in names:
                raise SimulateError(f"{where}: unknown source {name!r}; the service's "
                                    f"sources are {', '.join(names)}")
        try:
            number_value = float(value) if value else None
        except ValueError:
            raise SimulateError(f"{where}: {value!r} is not a number (leave it empty for a "
                                "failed reading)") from None
        out.setdefault(name, []).append((at, number_value))
    if not out:
        raise SimulateError(f"{path}: no readings")
    for points in out.values():
        points.sort(key=lambda p: p[0])
    return out


def history(sources: dict[str, Source], start: float, end: float, step: float,
            given: dict[str, Points] | None = None) -> dict[str, Points]:
    """``given`` readings, and each other source's own history from ``start`` to ``end``.

    :raises SimulateError: if a source has neither (naming it and why).
    """
    out = dict(given or {})
    for name, source in sources.items():
        if name in out:
            continue
        try:
            points = source.history(start, end, step)
        except SourceError as exc:
            raise SimulateError(f"source {name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a plugin's own failure, named
            raise SimulateError(f"source {name}: history failed: {type(exc).__name__}: "
                                f"{exc}") from None
        if not points:
            raise SimulateError(f"source {name}: no history between "
                                f"{_iso(start)} and {_iso(end)}")
        out[name] = [(float(t), v) for t, v in points]
    return out


# ---------------------------------------------------------------- the replay


def members(service: Any, plugins: Any) -> dict[str, Source]:
    """The service's sources by name, built from their plugins (no store needed)."""
    context = Context(cluster="simulate", store=None, state_dir=Path("."))  # type: ignore[arg-type]

    def make(cfg: Any) -> Source:
        return plugins.types["source"][cfg.type].cls(cfg, context)

    source = service_source(service, make)
    if isinstance(source, SourceGroup):
        return dict(source.members)
    return {getattr(service.source, "name", None) or source.type_name: source}


def replay(service: Any, sources: dict[str, Source], readings: dict[str, Points], *,
           step: float | None = None, start: float | None = None,
           end: float | None = None) -> Replay:
    """Run the service's policy over ``readings`` (raw values by source name).

    :param service: the service's config (its ``policy``, ``combine``, sources).
    :param sources: the built sources by name (for :meth:`~agent.Source.from_raw`).
    :param step: seconds between decisions (default: the shortest source interval).
    :param start: the first decision (default: the first reading).
    :param end: when the replay ends (default: one step after the last reading).
    """
    policy = service.policy.model_copy(update={"shadow": False})
    step = step or min(s.config.interval for s in sources.values())
    if step <= 0:
        raise SimulateError("--step must be positive")
    times_of = {n: [t for t, _ in pts] for n, pts in readings.items()}
    firsts = [pts[0][0] for pts in readings.values() if pts]
    if not firsts:
        raise SimulateError("no readings to replay")
    start = min(firsts) if start is None else start
    end = max(pts[-1][0] for pts in readings.values() if pts) + step if end is None else end
    group = len(sources) > 1 or getattr(service, "sources", None)
    expiry = {n: math.inf for n in sources}  # a reading holds until the next
    combine = None
    if group:
        from agent.combine import Combine

        combine = Combine.parse(service.combine, list(sources))
    out = Replay(step=step, end=end, readings=readings)
    state, current = PolicyState(), None
    t = start
    while t < end:
        polled: dict[str, tuple[float | None, str | None]] = {}
        for name, points in readings.items():
            i = bisect_right(times_of[name], t) - 1
            if i < 0:
                continue
            raw = points[i][1]
            polled[name] = ((sources[name].from_raw(raw), None) if raw is not None
                            else (None, f"{name}: no value in the readings"))
        if group:
            assert combine is not None
            decision = decide_sources(policy, combine, state, current, t, polled, expiry)
        else:
            (name,) = sources
            value, error = polled.get(name, (None, f"{name}: no reading yet"))
            decision = decide(policy, state, current, t, value, error, source=name)
        state = decision.state
        if decision.count is not None:
            if current is not None:
                out.actions.append(Action(t, current, decision.count, decision.reason))
            current = decision.count
        good = state.error is None and state.reading is not None
        out.times.append(t)
        out.counts.append(current)
        out.wanted.append(math.ceil(round(state.reading, 9)) if good else None)
        t += step
    return out


def with_settings(service: Any, settings: Iterable[str]) -> Any:
    """The service config with ``KEY=VALUE`` changes (``policy.max_step=2``), validated.

    :raises SimulateError: naming the setting that is wrong.
    """
    settings = list(settings)
    if not settings:
        return service
    data = service.model_dump(exclude_unset=True)
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key.strip():
            raise SimulateError(f"--set {setting!r}: expected KEY=VALUE, like policy.max_step=2")
        node = data
        *path, last = key.strip().split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SimulateError(f"--set {setting!r}: {part} is not a block")
        try:
            node[last] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise SimulateError(f"--set {setting!r}: bad value: {exc}") from None
    try:
        return type(service).model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise SimulateError(f"--set {' '.join(settings)}: {problems}") from None


# ---------------------------------------------------------------- drawing


def chart(result: Replay, width: int = 72, height: int = 10) -> str:
    """The wanted count (``·``) and the count (``█``) over time, in text."""
    if not result.times:
        return ""
    columns = min(width, len(result.times))
    buckets = [range(i * len(result.times) // columns, (i + 1) * len(result.times) // columns)
               for i in range(columns)]
    counts = [max((result.counts[j] or 0 for j in b), default=0) for b in buckets]
    wanted = [max((result.wanted[j] or 0 for j in b), default=0) for b in buckets]
    top = max(max(counts), max(wanted), 1)
    rows = []
    for level in range(height, 0, -1):
        floor = top * (level - 1) / height
        line = ""
        for c, w in zip(counts, wanted, strict=True):
            cell = " "
            if c > floor:
                cell = "█"
            if w > floor and w <= top * level / height and w > c:
                cell = "·"
            line += cell
        label = (f"{top:>6g} |" if level == height else "     0 |" if level == 1
                 else "       |")
        rows.append(label + line)
    rows.append("       +" + "-" * columns)
    rows.append(f"        {_iso(result.times[0])}  ...  {_iso(result.end)}"
                "   █ count  · wanted above it")
    return "\n".join(rows)


def plot(results: dict[str, Replay], path: str | Path) -> None:
    """Write a PNG: each source's readings, and each policy's count with its actions.

    :raises SimulateError: if matplotlib is not installed (``shipmate[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SimulateError("--plot needs matplotlib: pip install 'shipmate[plot]'") from None
    first = next(iter(results.values()))
    rows = len(first.readings) + 1  # one panel per source (raw values), then the counts
    figure, axes = plt.subplots(rows, 1, sharex=True, figsize=(9, 2 + 1.6 * rows), dpi=80,
                                gridspec_kw={"height_ratios": [1] * (rows - 1) + [2]})
    *tops, bottom = axes
    for top, (name, points) in zip(tops, first.readings.items(), strict=True):
        shown = [(t, math.nan if v is None else v) for t, v in points]  # failures: gaps
        shown.append((max(first.end, shown[-1][0]), shown[-1][1]))  # the last holds to the end
        top.step([_dt(t) for t, _ in shown], [v for _, v in shown], where="post", label=name)
        failed = [t for t, v in points if v is None]
        if failed:
            low = min((v for _, v in points if v is not None), default=0.0)
            top.plot([_dt(t) for t in failed], [low] * len(failed), "x", color="red",
                     label="failed reading")
            top.legend(loc="upper right", fontsize="small")
        top.set_ylabel(name)
    tops[0].set_title("shipmate simulate: the readings (raw), and the count")
    for label, result in results.items():
        xs = [_dt(t) for t in result.times] + [_dt(result.end)]
        counts = [c if c is not None else math.nan for c in result.counts]
        line, = bottom.step(xs, counts + counts[-1:], where="post", label=f"{label} count")
        ups = [a for a in result.actions if a.new > a.old]
        downs = [a for a in result.actions if a.new < a.old]
        bottom.plot([_dt(a.at) for a in ups], [a.new for a in ups], "^",
                    color=line.get_color())
        bottom.plot([_dt(a.at) for a in downs], [a.new for a in downs], "v",
                    color=line.get_color())
    wanted = [w if w is not None else math.nan for w in first.wanted]
    bottom.step([_dt(t) for t in first.times], wanted, where="post", linestyle=":",
                color="grey", label="wanted")
    bottom.set_ylabel("instances")
    bottom.set_xlabel("UTC")
    bottom.legend(loc="upper left", fontsize="small")
    figure.autofmt_xdate()
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as exc:
        raise SimulateError(f"--plot {path}: cannot write: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _iso(t: float) -> str:
    return _dt(t).strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------- the command


def run(config_path: str | Path, service: str, *, readings: str | Path | None = None,
        since: float | None = None, step: float | None = None, settings: Iterable[str] = (),
        compare: str | Path | None = None, now: float | None = None) -> dict[str, Replay]:
    """What ``shipmate simulate`` does: the results by label, the config's own first
    (with ``settings`` applied), then the unchanged one (if settings), then ``compare``'s.

    :raises SimulateError, ConfigError, PluginError: naming what is wrong.
    """
    import time

    from agent.runtime import open_config

    if (readings is None) == (since is None):
        raise SimulateError("give either --readings FILE or --since DURATION")
    config, plugins = open_config(config_path)
    if service not in config.services:
        from agent.counted import listed

        raise SimulateError(f"unknown service {service!r}; known: "
                            f"{listed(config.services, 'service')}")
    base = config.services[service]
    configs = {Path(config_path).name: base}
    settings = list(settings)
    if settings:
        configs = {f"{Path(config_path).name} with --set": with_settings(base, settings),
                   Path(config_path).name: base}
    if compare is not None:
        other, other_plugins = open_config(compare)
        if service not in other.services:
            raise SimulateError(f"{compare}: has no service {service!r}")
        label = Path(compare).name
        configs[label if label not in configs else str(compare)] = other.services[service]
    sources = members(base, plugins)
    step = step or min(s.config.interval for s in sources.values())
    if readings is not None:
        given = read_csv(readings, list(sources))
        start = min(p[0][0] for p in given.values())
        end = max(p[-1][0] for p in given.values()) + step
        data = history(sources, start, end, step, given)
    else:
        assert since is not None
        end = time.time() if now is None else now
        start = end - since
        data = history(sources, start, end, step)
    out = {}
    for label, svc in configs.items():
        mine = members(svc, plugins)
        if set(mine) != set(sources):
            raise SimulateError(f"{label}: its sources ({', '.join(mine)}) are not those of "
                                f"{Path(config_path).name} ({', '.join(sources)}); compare "
                                "policies over the same sources")
        out[label] = replay(svc, mine, data, step=step, start=start, end=end)
    return out
