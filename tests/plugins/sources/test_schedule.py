"""The schedule source: the count of the window in force, else the default."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from agent.config import ConfigError
from plugins.sources.schedule import ScheduleSource

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, zone: ZoneInfo = BERLIN) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


@pytest.fixture
def schedule(load_test_config):
    def make(block: str) -> ScheduleSource:
        config = load_test_config(f"""
            agent: {{cluster: t}}
            services:
              web: {{source: {block}, actuator: {{type: process}}}}
            """)
        return ScheduleSource(config.services["web"].source, None)

    return make


BUSINESS = ('{type: schedule, windows: [{cron: "0 8 * * 1-5", duration: 12h, count: 10}], '
            'default: 2, timezone: Europe/Berlin}')


def test_the_window_in_force_gives_its_count_outside_the_default(schedule):
    source = schedule(BUSINESS)
    # 2026-12-07 is a Monday
    assert source.count_at(at("2026-12-07T07:59:59")) == 2
    assert source.count_at(at("2026-12-07T08:00:00")) == 10
    assert source.count_at(at("2026-12-07T13:30:00")) == 10
    assert source.count_at(at("2026-12-07T19:59:59")) == 10
    assert source.count_at(at("2026-12-07T20:00:00")) == 2
    assert source.count_at(at("2026-12-05T10:00:00")) == 2  # a Saturday
    # the zone matters: 08:00 in Berlin is 07:00 UTC in winter
    assert source.count_at(at("2026-12-07T07:30:00", ZoneInfo("UTC"))) == 10
    assert source.count_at(at("2026-12-07T06:30:00", ZoneInfo("UTC"))) == 2


def test_read_uses_the_clock_now(schedule):
    always = schedule('{type: schedule, windows: [{cron: "* * * * *", duration: 2m, '
                      'count: 7}], default: 1}')
    assert always.read() == 7
    never = schedule('{type: schedule, windows: [{cron: "0 0 29 2 *", duration: 1m, '
                     'count: 7}], default: 1}')
    assert never.read() in (1, 7)  # 7 only on the first minute of a 29 February
    assert never.count_at(at("2027-03-01T00:00:30", ZoneInfo("UTC"))) == 1


def test_overlapping_windows_take_the_highest_count(schedule):
    source = schedule('{type: schedule, default: 0, windows: ['
                      '{cron: "0 8 * * *", duration: 10h, count: 4}, '
                      '{cron: "0 12 * * *", duration: 1h, count: 9}, '
                      '{cron: "0 14 * * *", duration: 1h, count: 1}]}')
    utc = ZoneInfo("UTC")
    assert [source.count_at(at(f"2026-12-07T{h}:30:00", utc)) for h in
            ("07", "09", "12", "14", "17", "18")] == [0, 4, 9, 4, 4, 0]


def test_a_window_longer_than_its_period_stays_in_force(schedule):
    source = schedule('{type: schedule, default: 1, windows: '
                      '[{cron: "0 * * * *", duration: 90m, count: 3}]}')
    utc = ZoneInfo("UTC")
    assert source.count_at(at("2026-12-07T10:59:00", utc)) == 3


def test_history_steps_through_the_windows(schedule):
    source = schedule(BUSINESS)
    start = at("2026-12-07T07:00:00")
    points = source.history(start, start + 3 * 3600, 3600)
    assert points == [(start, 2.0), (start + 3600, 10.0), (start + 7200, 10.0),
                      (start + 10800, 10.0)]


@pytest.mark.parametrize("block, message", [
    ('{type: schedule, windows: [{cron: "0 8 * *", duration: 1h, count: 1}], default: 1}',
     r"services.web.source.windows\[0\].cron: '0 8 \* \*' is not a cron expression"),
    ('{type: schedule, windows: [{cron: "0 8 * * 1-5", duration: 1h, count: 1}], default: 1, '
     'timezone: Mars/Olympus}', "services.web.source.timezone: unknown time zone 'Mars/Olympus'"),
    ('{type: schedule, windows: [], default: 1}', "windows: List should have at least 1 item"),
    ('{type: schedule, windows: [{cron: "0 8 * * *", duration: 1h, count: -1}], default: 1}',
     r"windows\[0\].count: Input should be greater than or equal to 0"),
    ('{type: schedule, windows: [{cron: "0 8 * * *", duration: 1h, count: 1, cout: 2}], '
     'default: 1}', r"windows\[0\].cout: unknown key"),
])
def test_config_errors_name_the_key(load_test_config, block, message):
    with pytest.raises(ConfigError, match=message):
        load_test_config(f"""
            agent: {{cluster: t}}
            services:
              web: {{source: {block}, actuator: {{type: process}}}}
            """)
