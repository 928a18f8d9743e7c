"""The ``rolling`` strategy: replace instances a batch at a time, health-gated.

``stop-first`` (the default) stops a batch of old instances, starts their
replacements on the same slots and waits for them to pass the health check:
never fewer than ``count - batch`` healthy instances serve. ``start-first``
starts the replacements on free slots first and stops the old ones only once
the new ones are healthy: never fewer than ``count``. A new instance is
announced the moment its health check passes, before any old one is
withdrawn; old ones are withdrawn a batch at once, drained (``announce:
{drain}``) together, then stopped. Each step is worked out
from what runs, so a resumed deploy carries on where the last one stopped, and
a rollback is the same walk back to the old release. A deploy first fills the
slots a dead agent emptied and lets instances still starting pass (with their
full health timeout), so a resumed deploy never dips below ``count - batch``
and never blames an instance that was only starting.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

from pydantic import Field, field_validator

from agent import (
    DeployError,
    Deployment,
    Duration,
    Interrupted,
    LockLost,
    Strategy,
    StrategyConfig,
    hookimpl,
)


class RollingConfig(StrategyConfig):
    batch: int | str = 1
    "instances replaced at a time: a count, or a percentage of the count like 25%"
    order: Literal["stop-first", "start-first"] = "stop-first"
    "stop-first keeps count - batch healthy; start-first keeps count (needs free ports)"
    pause: Duration = 0.0
    "wait between batches"
    max_failures: int = Field(0, ge=0)
    "instances that may fail their health check (each is retried) before the deploy fails"
    on_failure: Literal["rollback", "pause"] = "rollback"
    "rollback restores the old release; pause stops and waits for `shipmate rollback`"

    @field_validator("batch")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value >= 1:
            return value
        if isinstance(value, str) and value.endswith("%") and value[:-1].isdigit() and (
                0 < int(value[:-1]) <= 100):
            return value
        raise ValueError("batch must be a count of at least 1 or a percentage like 25%")

    def size(self, count: int) -> int:
        """The batch size for a service of ``count`` instances."""
        if isinstance(self.batch, int):
            return self.batch
        return max(1, math.floor(count * int(self.batch[:-1]) / 100))


class RollingStrategy(Strategy):
    """Replaces the old release a batch at a time."""

    type_name = "rolling"
    Config = RollingConfig

    def run(self, deploy: Deployment) -> None:
        config: RollingConfig = self.config
        target, count = deploy.target, deploy.desired
        batch, failures = config.size(count), 0
        self._recover(deploy, count)
        while True:
            instances = deploy.instances()
            for dead in (i for i in instances if not i.running):
                deploy.stop(dead, "exited")
            running = [i for i in instances if i.running]
            new = [i for i in running if i.version == target.version and deploy.healthy(i)]
            # unhealthy instances of the target first (they serve nobody), then highest slots
            old = sorted((i for i in running if i not in new),
                         key=lambda i: (i.version != target.version, -i.slot))
            deploy.announce(*new)  # seen passing just now (a resumed deploy's too)
            deploy.progress(min(len(new), count), count, f"{len(new)} of {count} on "
                            f"{target.label}")
            if not old and len(new) >= count:
                extra = sorted(new, key=lambda i: -i.slot)[:len(new) - count]
                if extra:
                    deploy.stop_all(extra, "deploy: above the count")
                return
            step = old[:batch]
            flapping = [i.name for i in step if i.version == target.version]
            if flapping:  # started and passed before, failing now: a failure too
                failures += 1
                if failures > config.max_failures:
                    raise DeployError(f"{', '.join(flapping)} stopped passing its health check "
                                      f"({deploy.check_text()})")
            # stop-first never takes the service to zero: with nothing else left serving,
            # the replacement starts first
            stop_first = config.order == "stop-first" and len(running) - len(step) >= 1
            try:
                if stop_first or not step:
                    self._stop_first(deploy, step, running, count, batch)
                else:
                    self._start_first(deploy, step, running)
            except (Interrupted, LockLost):
                raise
            except Exception:
                failures += 1
                if failures > config.max_failures:
                    raise
                continue
            if config.pause and old[batch:]:
                deploy.sleep(config.pause)

    def _recover(self, deploy: Deployment, count: int) -> None:
        """First, before anything is stopped (a resumed deploy, or one that begins short):
        slots a dead agent emptied are filled, and instances of the target still starting
        get their full health timeout; neither counts as a failure unless it then fails."""
        instances = deploy.instances()
        for dead in (i for i in instances if not i.running):
            deploy.stop(dead, "exited")
        running = [i for i in instances if i.running]
        starting = [i for i in running
                    if i.version == deploy.target.version and not deploy.healthy(i)]
        taken = {i.slot for i in running}
        free = (s for s in itertools.count() if s not in taken)
        filled = [deploy.start(next(free)) for _ in range(max(0, count - len(running)))]
        if starting or filled:
            deploy.progress(len(running) - len(starting), count,
                            f"first {len(filled)} emptied slot(s) filled, {len(starting)} "
                            "instance(s) still starting given their health timeout")
            deploy.wait_healthy(starting + filled, self.config.health_timeout)

    def _stop_first(self, deploy: Deployment, step, running, count, batch) -> None:
        slots = [i.slot for i in step]
        if step:
            deploy.stop_all(step)
        taken = {i.slot for i in running}
        missing = count - len(running)  # fewer run than the count (one crashed): fill up too
        free = (s for s in itertools.count() if s not in taken)
        slots += [next(free) for _ in range(min(max(0, missing), batch))]
        deploy.wait_healthy([deploy.start(slot) for slot in slots], self.config.health_timeout)

    def _start_first(self, deploy: Deployment, step, running) -> None:
        taken = {i.slot for i in running}
        free = (s for s in itertools.count() if s not in taken)
        started = [deploy.start(next(free)) for _ in step]
        try:
            deploy.wait_healthy(started, self.config.health_timeout)
        except Exception:
            # never leave a failed surge instance behind
            deploy.stop_all(started, "deploy: failed health check")
            raise
        deploy.stop_all(step)  # the new ones were announced as they passed


@hookimpl
def shipmate_strategy_types() -> list[type[Strategy]]:
    return [RollingStrategy]
