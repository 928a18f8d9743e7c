"""The scaling policy: one test per rule, and properties that hold for any sequence of readings."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.combine import Combine
from agent.config import ConfigError, PolicyConfig
from agent.policy import Decision, PolicyState, decide, decide_sources


def policy(**keys) -> PolicyConfig:
    return PolicyConfig(**keys)


class Run:
    """Feeds readings through ``decide`` like the scaler does: state and count carried along."""

    def __init__(self, cfg: PolicyConfig, current: int | None = None) -> None:
        self.cfg, self.current, self.state, self.now = cfg, current, PolicyState(), 1000.0

    def at(self, seconds: float, value: float | None = None, error: str | None = None
           ) -> Decision:
        self.now = 1000.0 + seconds
        d = decide(self.cfg, self.state, self.current, self.now, value, error, source="test")
        self.state = d.state
        if d.count is not None:
            self.current = d.count
        return d


# ---------------------------------------------------------------- counts from readings


def test_the_first_good_reading_sets_the_count_rounded_up():
    d = Run(policy()).at(0, 4.5)
    assert d.count == 5
    assert d.reason == "set to 5: test reads 4.5 (no count before)"


def test_float_noise_does_not_add_an_instance():
    assert Run(policy()).at(0, 0.1 * 3 / 0.1).count == 3  # 3.0000000000000004
    assert Run(policy()).at(0, 0.7 / 0.1).count == 7  # 6.999999999999999


def test_min_and_max_bound_the_count():
    run = Run(policy(min=2, max=6), current=4)
    d = run.at(0, 0.2)
    assert d.count == 2 and "(wants 1, min 2)" in d.reason
    d = run.at(1, 40)
    assert d.count == 6 and "(wants 40, max 6)" in d.reason


def test_a_reading_equal_to_the_count_writes_nothing():
    d = Run(policy(), current=3).at(0, 2.5)
    assert d.count is None and d.reason == "steady at 3: test reads 2.5"


def test_max_step_limits_each_move_both_ways():
    run = Run(policy(max_step=2), current=3)
    d = run.at(0, 10)
    assert d.count == 5 and "max_step 2 of the way to 10" in d.reason
    assert run.at(1, 10).count == 7
    assert run.at(2, 1).count == 5


# ---------------------------------------------------------------- cooldowns


def test_cooldown_up_waits_after_any_change():
    run = Run(policy(cooldown_up=10), current=2)
    assert run.at(0, 4).count == 4
    d = run.at(5, 8)
    assert d.count is None
    assert d.reason == ("held at 4: test reads 8, wants 8; waits for cooldown_up "
                        "(5s of 10s since the last change)")
    assert run.at(10, 8).count == 8


def test_cooldown_down_waits_after_any_change():
    run = Run(policy(cooldown_down=30), current=2)
    assert run.at(0, 6).count == 6  # a rise starts the down cooldown too
    assert run.at(29, 1).count is None
    assert run.at(30, 1).count == 1


def test_a_fall_does_not_hold_back_a_quick_rise():
    run = Run(policy(cooldown_up=5, cooldown_down=60), current=6)
    run.state.last_up = 1000.0 - 120
    assert run.at(0, 2).count == 2
    assert run.at(5, 9).count == 9


def test_cooldown_sets_both_and_each_may_override_it():
    both = policy(cooldown="1m")
    assert (both.up_cooldown, both.down_cooldown) == (60, 60)
    mixed = policy(cooldown="1m", cooldown_up="10s")
    assert (mixed.up_cooldown, mixed.down_cooldown) == (10, 60)
    assert (policy().up_cooldown, policy().down_cooldown) == (0, 0)


# ---------------------------------------------------------------- stabilization


def test_scale_down_goes_to_the_highest_recommendation_of_the_window():
    run = Run(policy(stabilization=10), current=8)
    run.at(0, 8)
    run.at(4, 5)
    d = run.at(6, 1)
    assert d.count is None and "8 or more was recommended within the 10s" in d.reason
    d = run.at(10.5, 1)  # 8 (t=0) left the window; 5 (t=4) is still in it
    assert d.count == 5
    assert "the highest in the 10s stabilization window" in d.reason
    assert run.at(14.5, 1).count == 1


def test_scale_up_is_not_stabilized():
    run = Run(policy(stabilization=300), current=2)
    run.at(0, 2)
    assert run.at(1, 9).count == 9


def test_the_remembered_recommendations_stay_few():
    run = Run(policy(stabilization=3600), current=1)
    for i in range(2000):
        run.at(i, 50 - (i % 50))
    assert len(run.state.recommendations) <= 50


# ---------------------------------------------------------------- bad readings


@pytest.mark.parametrize(("value", "error", "said"), [
    (None, "test answered 503", "test answered 503"),
    (None, None, "test gave no value (null)"),
    (math.nan, None, "test gave NaN"),
    (math.inf, None, "test gave inf, not a finite number"),
    (-1.0, None, "test gave -1, a negative number"),
    (True, None, "test gave True, not a number"),
])
def test_a_bad_reading_holds_the_count(value, error, said):
    d = Run(policy(), current=5).at(0, value, error)
    assert d.count is None
    assert d.reason == f"held at 5: {said}"
    assert d.state.failures == 1 and d.state.error == said


def test_a_bad_reading_with_no_count_yet_writes_nothing():
    d = Run(policy(min=2)).at(0, None, "test answered 500")
    assert d.count is None and d.reason == "no count yet: test answered 500"


def test_the_hold_says_how_many_times_in_a_row():
    run = Run(policy(), current=5)
    run.at(0, None, "datadog answered 503")
    run.at(1, None, "datadog answered 503")
    d = run.at(2, None, "datadog answered 503")
    assert d.reason == "held at 5: datadog answered 503 (three times in a row)"
    assert d.state.failures == 3
    d = run.at(3, 5)
    assert d.state.failures == 0 and d.state.error is None


def test_a_failure_may_still_raise_the_count_to_min():
    d = Run(policy(min=3), current=1).at(0, None, "boom")
    assert d.count == 3 and "min 3" in d.reason


def test_fallback_after_n_failures_rises_to_fallback():
    run = Run(policy(on_error="fallback", fallback=6, fallback_after=3), current=2)
    assert run.at(0, None, "x").count is None
    assert run.at(1, None, "x").count is None
    d = run.at(2, None, "x")
    assert d.count == 6 and d.reason.startswith("up 2 -> 6 (fallback 6)")


def test_fallback_never_lowers_the_count():
    run = Run(policy(on_error="fallback", fallback=3, fallback_after=1), current=8)
    d = run.at(0, None, "x")
    assert d.count is None and d.reason == "held at 8: x"


def test_fallback_sets_a_first_count():
    d = Run(policy(on_error="fallback", fallback=4, fallback_after=1)).at(0, None, "x")
    assert d.count == 4 and d.reason == "set to 4 (fallback after 1 failed reading in a row): x"


def test_a_failure_restarts_the_stabilization_window():
    run = Run(policy(stabilization=10), current=5)
    run.at(0, 5)
    for t in range(1, 20):
        run.at(t, None, "test answered 500")
    assert run.at(20, 0.5).count is None  # the hold at t=19 is in the window
    assert run.at(28.5, 0.5).count is None
    assert run.at(29.5, 0.5).count == 1


# ---------------------------------------------------------------- state and config


def test_the_state_survives_json():
    run = Run(policy(stabilization=60, cooldown=30), current=1)
    run.at(0, 7)
    run.at(1, 3)
    run.at(2, None, "x")
    again = PolicyState.from_json(run.state.to_json())
    assert again == run.state
    assert again.last_up == 1000.0 and again.failures == 1
    with pytest.raises(ValueError):
        PolicyState.from_json("[1, 2]")


def test_policy_config_errors_name_file_line_and_key(load_test_config):
    with pytest.raises(ConfigError) as err:
        load_test_config("""
            agent: {cluster: t}
            services:
              a:
                source: {type: static, count: 1}
                actuator: {type: process}
                policy: {min: 5, max: 3}
              b:
                source: {type: static, count: 1}
                actuator: {type: process}
                policy: {on_error: fallback}
              c:
                source: {type: static, count: 1}
                actuator: {type: process}
                policy: {max: 4, fallback: 9, cooldwn: 1m}
            """)
    text = str(err.value)
    assert "agent.yaml:6: services.a.policy: max (3) is below min (5)" in text
    assert ("agent.yaml:10: services.b.policy: on_error: fallback needs a fallback"
                    in text)
    assert "services.c.policy.cooldwn: unknown key 'cooldwn' (did you mean 'cooldown'?)" in text


def test_design_yaml_policy_is_accepted(load_test_config):
    config = load_test_config("""
        agent: {cluster: t}
        services:
          web:
            source: {type: static, count: 1}
            actuator: {type: process}
            policy: {min: 1, max: 20, cooldown: 60s, max_step: 5, on_error: hold}
        """)
    cfg = config.services["web"].policy
    assert (cfg.up_cooldown, cfg.down_cooldown, cfg.max_step) == (60, 60, 5)


# ---------------------------------------------------------------- properties


@st.composite
def policies(draw) -> PolicyConfig:
    low = draw(st.integers(0, 10))
    high = draw(st.one_of(st.none(), st.integers(low, 40)))
    fallback = draw(st.integers(low, high if high is not None else low + 20))
    return PolicyConfig(
        min=low, max=high, max_step=draw(st.one_of(st.none(), st.integers(1, 8))),
        cooldown_up=draw(st.sampled_from([0, 1, 5])),
        cooldown_down=draw(st.sampled_from([0, 2, 10])),
        stabilization=draw(st.sampled_from([0, 3, 20])),
        on_error=draw(st.sampled_from(["hold", "fallback"])), fallback=fallback,
        fallback_after=draw(st.integers(1, 4)))


def outside(cfg: PolicyConfig, count: int) -> float:
    """How far ``count`` lies outside [min, max]."""
    high = cfg.max if cfg.max is not None else math.inf
    return max(cfg.min - count, count - high, 0)


readings = st.one_of(
    st.floats(0, 80, allow_nan=False),
    st.sampled_from([None, math.nan, math.inf, -3.0, "error"]),
)


@settings(max_examples=300, deadline=None)
@given(cfg=policies(), start=st.one_of(st.none(), st.integers(0, 50)),
       steps=st.lists(st.tuples(st.floats(0, 6), readings), min_size=1, max_size=40))
def test_properties_hold_for_any_readings(cfg, start, steps):
    state, current, now = PolicyState(), start, 0.0
    for dt, value in steps:
        now += dt
        error = "source answered 500" if value == "error" else None
        good = error is None and value is not None and math.isfinite(value) and value >= 0
        d = decide(cfg, state, current, now, None if error else value, error)
        state = d.state
        if d.count is None:
            continue
        assert d.count != current  # written only when it changes
        high = cfg.max if cfg.max is not None else math.inf
        if current is None or cfg.min <= current <= high:
            assert cfg.min <= d.count <= high  # within [min, max]
        else:  # outside the range (a changed config): only ever moving into it
            assert outside(cfg, d.count) < outside(cfg, current)
        if current is not None and cfg.max_step is not None:
            assert abs(d.count - current) <= cfg.max_step  # at most max_step
        if not good and current is not None:
            assert d.count >= current  # an error never lowers the count
        current = d.count


@settings(max_examples=200, deadline=None)
@given(cfg=policies(), start=st.integers(0, 50),
       bad=st.lists(st.sampled_from([None, math.nan, "error"]), min_size=1, max_size=20))
def test_errors_alone_never_lower_the_count(cfg, start, bad):
    state, current = PolicyState(), start
    for i, value in enumerate(bad):
        error = "boom" if value == "error" else None
        d = decide(cfg, state, current, float(i), None if error else value, error)
        state = d.state
        if d.count is not None:
            current = d.count
        assert current >= start


# ---------------------------------------------------------------- several sources



class Sources:
    """Feeds several sources' readings through ``decide_sources``, like the scaler does."""

    def __init__(self, cfg: PolicyConfig, combine: str, expiry: dict[str, float],
                 current: int | None = None) -> None:
        self.cfg, self.current, self.state = cfg, current, PolicyState()
        self.combine = Combine.parse(combine, list(expiry))
        self.expiry = expiry

    def at(self, seconds: float, **polled) -> Decision:
        """``at(5, rps=4.5, hours=("", "schedule failed"))``: a value or a (None, error)."""
        readings = {n: (None, v[1]) if isinstance(v, tuple) else (v, None)
                    for n, v in polled.items()}
        d = decide_sources(self.cfg, self.combine, self.state, self.current, 1000.0 + seconds,
                           readings, self.expiry)
        self.state = d.state
        if d.count is not None:
            self.current = d.count
        return d


def test_max_of_several_sources_and_which_one_decided():
    run = Sources(policy(), "max", {"static": 90, "rps": 90})
    d = run.at(0, static=2, rps=4.5)
    assert d.count == 5
    assert d.reason == "set to 5: rps reads 4.5 (max of static 2, rps 4.5) (no count before)"
    assert run.state.decided_by == "rps"
    assert run.state.sources["rps"].reading == 4.5 and run.state.sources["static"].reading == 2
    d = run.at(10, static=2, rps=0.5)
    assert d.count == 2 and run.state.decided_by == "static"


def test_min_sum_and_an_expression():
    assert Sources(policy(), "min", {"a": 9, "b": 9}).at(0, a=3, b=7).count == 3
    assert Sources(policy(), "sum", {"a": 9, "b": 9}).at(0, a=3, b=7).count == 10
    expr = "max(rps, queue) if business_hours else 2"
    names = {"rps": 9, "queue": 9, "business_hours": 9}
    assert Sources(policy(), expr, names).at(0, rps=3, queue=6, business_hours=1).count == 6
    run = Sources(policy(), expr, names)
    d = run.at(0, rps=3, queue=6, business_hours=0)
    assert d.count == 2 and run.state.decided_by is None
    assert "the expression reads 2 ('max(rps, queue) if business_hours else 2' with" in d.reason


def test_a_source_without_a_good_reading_lets_the_count_rise_but_never_fall():
    run = Sources(policy(), "max", {"static": 90, "rps": 90})
    run.at(0, static=2, rps=4.5)
    assert run.current == 5
    d = run.at(10, static=2, rps=(None, "datadog answered 500"))
    assert d.count is None and run.current == 5
    assert d.reason == ("held at 5: static reads 2 (max of static 2; without rps: datadog "
                        "answered 500), wants 2; no scale-down while rps has no good reading")
    d = run.at(20, static=8, rps=(None, "datadog answered 500"))
    assert d.count == 8  # a rise needs no complete data
    assert run.state.sources["rps"].failures == 2
    assert run.state.sources["rps"].reading == 4.5  # the last good one is kept for status
    d = run.at(30, static=2, rps=1)
    assert d.count == 2  # all good again: down at once (no stabilization here)


def test_a_reading_older_than_its_expiry_is_no_good_reading():
    run = Sources(policy(), "max", {"static": 1000, "rps": 30})
    run.at(0, static=1, rps=6)
    d = run.at(20, static=1)  # rps not polled now: its reading is 20s old, within 30s
    assert d.count == 6 or d.count is None
    assert run.current == 6 and "without" not in d.reason
    d = run.at(40, static=1)
    assert d.count is None and run.current == 6
    assert "without rps: its reading is 40s old (expiry 30s)" in d.reason


def test_no_good_source_at_all_is_a_failure_never_zero():
    run = Sources(policy(on_error="fallback", fallback=3, fallback_after=2), "sum",
                  {"a": 90, "b": 90})
    d = run.at(0, a=(None, "a failed"), b=(None, "b failed"))
    assert d.count is None and d.reason.startswith("no count yet: no source has a good "
                                                   "reading (a: a failed; b: b failed)")
    d = run.at(1, a=(None, "a failed"), b=(None, "b failed"))
    assert d.count == 3  # the fallback, as with one source


def test_an_expression_uses_a_missing_sources_last_reading_and_may_only_rise():
    run = Sources(policy(), "rps * 2 + queue", {"rps": 90, "queue": 90})
    assert run.at(0, rps=2, queue=1).count == 5
    d = run.at(10, rps=(None, "down"), queue=0)  # 2 * 2 + 0 = 4 < 5: held
    assert d.count is None and "no scale-down while rps has no good reading" in d.reason
    d = run.at(20, rps=(None, "down"), queue=3)  # 2 * 2 + 3 = 7: up
    assert d.count == 7
    never = Sources(policy(), "rps + queue", {"rps": 90, "queue": 90})
    d = never.at(0, queue=3)
    assert d.count is None and "combine: rps never gave a reading" in d.reason


def test_a_stabilization_window_restarts_after_a_source_failed():
    run = Sources(policy(stabilization=30), "max", {"a": 900, "b": 900})
    run.at(0, a=5, b=1)
    run.at(40, a=(None, "down"), b=1)
    assert run.at(60, a=1, b=1).count is None  # 20s of good readings since the failure
    assert run.at(71, a=1, b=1).count == 1


@pytest.mark.parametrize("spec, message", [
    ("max(a,", "invalid expression 'max(a,': '(' was never closed at column 4"),
    ("a + c", "unknown name c in 'a + c'; the sources are named a, b"),
    ("a > b", "'a > b' gives False, not a count"),
    ("a.real", "'a.real': use only numbers, source names, operators"),
    ("__import__('os')", "unknown name __import__"),
])
def test_bad_expressions_are_refused_with_the_reason(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Combine.parse(spec, ["a", "b"])


@pytest.mark.parametrize("raw", [
    '{"last_up": "x"}', '{"last_up": Infinity}', '{"failures": 1e400}', '{"failures": true}',
    '{"recommendations": [[1, "2"]]}', '{"recommendations": [[1, 1000000000]]}',
    '{"recommendations": 5}', '{"error": 5}', "[" * 5000, '"text"',
])
def test_a_stored_state_of_the_wrong_shape_is_a_value_error(raw):
    from agent.policy import PolicyState

    with pytest.raises(ValueError):
        PolicyState.from_json(raw)


def test_counts_from_the_store_are_bounded():
    from agent.keys import parse_count

    assert parse_count("7") == 7 and parse_count(" 100000 ") == 100_000
    assert parse_count("999999999999") == 999_999_999_999  # the loop holds it at max_instances
    for raw in ("1" * 4301, "1" * 13, "1e3", "true", "-1", "٣", "3.0", "x" * 10_000):
        assert parse_count(raw) is None, raw


# ---------------------------------------------------------------- what is stored, and when


def test_only_what_decides_later_counts_is_durable():
    """The scaler writes the state when ``durable`` changes: not for a reading that changes
    nothing, but for a cooldown, the window, a failure streak, up to fallback_after."""
    cfg = policy(stabilization=60, on_error="fallback", fallback=2, fallback_after=3)
    state = decide(cfg, PolicyState(), None, 0.0, 4).state  # sets 4: last_up
    seen = [state.durable(cfg)]
    for t, value in ((10, 3.6), (20, 3.1)):  # both recommend 4: nothing to write
        state = decide(cfg, state, 4, t, value).state
        seen.append(state.durable(cfg))
    assert seen[0] == seen[1] == seen[2]
    state = decide(cfg, state, 4, 30, 2).state  # the window gains a lower count
    assert state.durable(cfg) != seen[-1]
    seen = [state.durable(cfg)]
    for t in (40, 41, 42, 43, 44):
        state = decide(cfg, state, 4, t, None, "down").state
        seen.append(state.durable(cfg))
    # failures 1, 2, 3 change it (the fallback counts them); 4 and 5 do not
    changed = [a != b for a, b in zip(seen, seen[1:], strict=False)]
    assert changed == [True, True, True, False, False]
    assert state.failures == 5
    state = decide(cfg, state, 4, 50, 4).state  # the streak ends
    assert state.durable(cfg) != seen[-1]


def test_a_taken_over_state_renews_only_its_newest_recommendation():
    state = PolicyState.from_json('{"recommendations": [[10, 8], [20, 3]], "last_up": 5, '
                                  '"failures": 1, "unknown": "ignored"}')
    assert state.taken_over(100.0).recommendations == [(10.0, 8), (100.0, 3)]
    assert PolicyState.from_json('{"recommendations": [[500, 3]]}').taken_over(
        100.0).recommendations == [(500.0, 3)]  # never moved back
    assert PolicyState().taken_over(100.0).recommendations == []
