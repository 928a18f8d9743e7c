"""The ``schedule`` source: a count by the time of day, like a cron scaler.

Each window starts at the times its ``cron`` expression names (croniter's
five-field syntax, in ``timezone``) and lasts ``duration``; while one is in
force the source reads its ``count`` (the highest, if several overlap), else
``default``::

    source: {type: schedule, timezone: Europe/Berlin, default: 2,
             windows: [{cron: "0 8 * * 1-5", duration: 12h, count: 10}]}

Combined with a metric source by ``combine: max`` it gives "at least 10 in
business hours".
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent import Duration, Source, SourceConfig, hookimpl


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cron: str
    "when the window starts: minute hour day-of-month month day-of-week"
    duration: Duration = Field(gt=0)
    "how long it lasts from each start"
    count: int = Field(ge=0)
    "the count while it is in force"

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str) -> str:
        from croniter import croniter

        if len(cron.split()) != 5 or not croniter.is_valid(cron):
            raise ValueError(f"{cron!r} is not a cron expression (five fields: minute hour "
                             "day-of-month month day-of-week, e.g. \"0 8 * * 1-5\")")
        return cron


class ScheduleConfig(SourceConfig):
    windows: list[Window] = Field(min_length=1)
    "the windows, each a cron start, a duration and a count"
    default: int = Field(ge=0)
    "the count when no window is in force"
    timezone: str = "UTC"
    "the time zone of the cron expressions, e.g. Europe/Berlin"
    interval: Duration = 60.0
    "how often the source is read"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {zone!r} (an IANA name such as "
                             "Europe/Berlin or UTC)") from None
        return zone


class ScheduleSource(Source):
    """Reads the count of the window in force, else the default."""

    type_name = "schedule"
    Config = ScheduleConfig

    def __init__(self, config: ScheduleConfig, context: Any) -> None:
        super().__init__(config, context)
        self.zone = ZoneInfo(config.timezone)

    def count_at(self, when: float) -> int:
        """The count at ``when`` (seconds since the epoch)."""
        from croniter import croniter

        # the latest start at or before `when` ends last: only it can still be in force
        after = datetime.fromtimestamp(int(when) + 1, self.zone)
        counts = []
        for window in self.config.windows:
            start = croniter(window.cron, after).get_prev(float)
            if start <= when < start + window.duration:
                counts.append(window.count)
        return max(counts) if counts else self.config.default

    def read(self) -> float:
        return self.count_at(time.time())

    def history(self, start: float, end: float, step: float) -> list[tuple[float, float]]:
        """The count at every ``step`` from ``start`` to ``end`` (for ``shipmate simulate``)."""
        out, t = [], start
        while t <= end:
            out.append((t, float(self.count_at(t))))
            t += step
        return out


@hookimpl
def shipmate_source_types() -> list[type[Source]]:
    return [ScheduleSource]
