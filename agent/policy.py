"""The scaling policy: readings in, a safe desired count out.

Pure functions: the caller supplies the current count and the clock, so every
rule is unit-testable. An error never lowers the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.config import PolicyConfig


@dataclass(frozen=True)
class Decision:
    """The count to write (None: keep what is there) and why, in words."""

    count: int | None
    reason: str


def decide(reading: float | None, error: str | None, current: int | None,
           policy: PolicyConfig, since_change: float | None) -> Decision:
    """Turn one reading into a decision.

    :param reading: the source's value (instances wanted), or None on error.
    :param error: why there is no reading.
    :param current: the desired count now in the store (None if unknown).
    :param since_change: seconds since the desired count last changed (None: never).
    """
    if reading is None or error is not None or math.isnan(reading):
        why = error or "no reading"
        return Decision(None, f"held at {current}: {why}")
    wanted = max(policy.min, math.ceil(reading))
    if policy.max is not None:
        wanted = min(policy.max, wanted)
    if current is None:
        return Decision(wanted, f"initial count {wanted} (reading {reading:g})")
    if wanted == current:
        return Decision(None, f"steady at {current} (reading {reading:g})")
    if since_change is not None and since_change < policy.cooldown:
        return Decision(None, f"held at {current}: cooldown ({since_change:.0f}s of "
                              f"{policy.cooldown:.0f}s) before moving to {wanted}")
    if policy.max_step is not None and abs(wanted - current) > policy.max_step:
        step = policy.max_step if wanted > current else -policy.max_step
        wanted = current + step
    return Decision(wanted, f"{current} -> {wanted} (reading {reading:g})")
