"""Crash-loop records: the same from pass to pass while nothing happens (written on change)."""

from __future__ import annotations

from types import SimpleNamespace

from agent.restarts import Restarts, describe


def test_a_backing_off_slot_has_the_same_record_at_every_pass():
    mono = [100.0]
    restarts = Restarts(clock=lambda: mono[0], settings=lambda service: SimpleNamespace(
        backoff=1.0, max_backoff=300.0, reset_after=600.0))
    for _ in range(6):
        restarts.failed("web", 0, "exited", code=1)
    wall = 1_700_000_000.0
    first = restarts.problems("web", wall)
    for step in (0.1234, 1.0001, 9.87654, 30.00049):  # later passes; the clocks sampled apart
        mono[0] = 100.0 + step
        assert restarts.problems("web", wall + step + 0.0004 * step) == first
    assert first[0]["next_try_at"] == round(wall + 32.0, 3)
    assert describe(first[0], wall + 2).endswith("next try in 30s")
    mono[0] = 200.0  # past the next try: says so, and the record still does not move
    assert restarts.problems("web", wall + 100) == first
    assert describe(first[0], wall + 100).endswith(", restarting")
