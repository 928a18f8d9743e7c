"""The ``asg`` source: one container per in-service instance of an AWS Auto Scaling group.

The count is the number of the group's instances in the ``InService``
lifecycle state times ``per_instance``, or with ``count_from: desired`` the
group's DesiredCapacity times ``per_instance``. Credentials come only from
boto3's default chain (environment, shared profile, instance role), never from
the YAML.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from agent import Source, SourceConfig, SourceError, Timeout, hookimpl
from plugins.aws import LazyClient


class AsgConfig(SourceConfig):
    group: str = Field(min_length=1)
    "the Auto Scaling group's name"
    region: str = Field(min_length=1)
    "its AWS region, e.g. eu-west-1"
    endpoint_url: str | None = None
    "another endpoint for the Auto Scaling API (a VPC endpoint, or a local fake)"
    per_instance: int = Field(1, ge=1)
    "containers per in-service instance"
    count_from: Literal["in_service", "desired"] = "in_service"
    "count the group's InService instances, or take its DesiredCapacity"
    timeout: Timeout = 10.0
    "how long one API call may take"


class AsgSource(Source):
    """Reads an Auto Scaling group through boto3."""

    type_name = "asg"
    requires = {"boto3": "shipmate[aws]"}
    Config = AsgConfig

    def __init__(self, config: AsgConfig, context: Any) -> None:
        super().__init__(config, context)
        self._autoscaling = LazyClient("autoscaling", region=config.region, attempts=2,
                                       endpoint_url=config.endpoint_url, timeout=config.timeout)

    def read(self) -> float:
        c = self.config
        where = f"Auto Scaling group {c.group!r} in {c.region}"
        answer = self._autoscaling.call("describe_auto_scaling_groups", f"asg: {where}",
                                        SourceError, AutoScalingGroupNames=[c.group])
        groups = [g for g in answer.get("AutoScalingGroups", [])
                  if g.get("AutoScalingGroupName") == c.group]
        if not groups:
            raise SourceError(f"asg: no {where}")
        group = groups[0]
        if c.count_from == "desired":
            count = group.get("DesiredCapacity")
            if not isinstance(count, int):
                raise SourceError(f"asg: {where} has no DesiredCapacity")
        else:
            count = sum(1 for i in group.get("Instances", [])
                        if i.get("LifecycleState") == "InService")
        return count * c.per_instance

    def from_raw(self, value: float) -> float:
        return value * self.config.per_instance

    def close(self) -> None:
        self._autoscaling.close()


@hookimpl
def shipmate_source_types() -> list[type[Source]]:
    return [AsgSource]
