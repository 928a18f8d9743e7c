"""The ``blue-green`` strategy on a real Docker engine, a real etcd and a real moto server
(classic ELB and ALB), the agent a real process that the tests SIGKILL at every step.

Each color holds ``count`` instances: blue on ``blue .. blue+count-1``, green on
``green ..``. The images ``shipmate-test/web:v1`` and ``:v2`` serve "v1" and "v2";
``:broken`` exits at once, so it never passes its health check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Any

import boto3
import pytest

from tests.helpers import eventually, port_block
from tests.plugins.strategies.support import (
    BROKEN,
    V1,
    V2,
    Cluster,
    OnJournal,
    Sampler,
    kill_at,
)

REGION = "us-east-1"


class Elb:
    """A classic ELB in moto whose listener on port 80 forwards to the blue port."""

    def __init__(self, moto: Any, blue: int, protocol: str = "HTTP") -> None:
        self.name = f"web-{uuid.uuid4().hex[:8]}"
        self.client = boto3.client("elb", region_name=REGION, endpoint_url=moto.endpoint_url)
        self.client.create_load_balancer(
            LoadBalancerName=self.name, AvailabilityZones=[f"{REGION}a"],
            Listeners=[{"Protocol": protocol, "LoadBalancerPort": 80,
                        "InstanceProtocol": protocol, "InstancePort": blue}])
        self.client.configure_health_check(LoadBalancerName=self.name, HealthCheck={
            "Target": f"HTTP:{blue}/index.html", "Interval": 10, "Timeout": 5,
            "UnhealthyThreshold": 2, "HealthyThreshold": 3})
        self.endpoint_url = moto.endpoint_url

    def describe(self) -> dict[str, Any]:
        return self.client.describe_load_balancers(
            LoadBalancerNames=[self.name])["LoadBalancerDescriptions"][0]

    def listener(self) -> dict[str, Any] | None:
        return next((d["Listener"] for d in self.describe()["ListenerDescriptions"]
                     if d["Listener"]["LoadBalancerPort"] == 80), None)

    def port(self) -> int | None:
        listener = self.listener()
        return listener["InstancePort"] if listener else None

    def health_target(self) -> str:
        return self.describe()["HealthCheck"]["Target"]

    def config(self) -> str:
        return (f"{{type: elb, name: {self.name}, listener_port: 80, region: {REGION}, "
                f"endpoint_url: '{self.endpoint_url}'}}")


def blue_green(blue: int, green: int, lb: str, *, bake: str = "1s", keep_old: bool = False
               ) -> str:
    return (f"{{type: blue-green, ports: [{blue}, {green}], health_timeout: 10s, "
            f"bake: {bake}, keep_old: {str(keep_old).lower()}, load_balancer: {lb}}}")


@pytest.fixture
def elb_cluster(make_cluster, moto):
    """``elb_cluster(count=2, **deploy)``: a service of v1 on blue behind a classic ELB, its
    agent running; returns (cluster, elb, blue, green)."""

    def make(count: int = 2, protocol: str = "HTTP", **deploy: Any
             ) -> tuple[Cluster, Elb, int, int]:
        blue = port_block(2 * count)
        green = blue + count
        elb = Elb(moto, blue, protocol)
        cluster = make_cluster(count=count, port=blue,
                               deploy=blue_green(blue, green, elb.config(), **deploy))
        cluster.start_agent()
        cluster.wait_settled(what=f"{count} instances of v1 on blue")
        return cluster, elb, blue, green

    return make


def serving_behind(cluster: Cluster, elb: Elb, blue: int):
    """A sampler's measure: (the listener's instance port, how many instances answer on the
    color it points at; while the listener is missing, on the color it last pointed at)."""
    last = {"port": blue}

    def measure() -> tuple[int | None, int]:
        port = elb.port()
        if port is not None:
            last["port"] = port
        return port, sum(b is not None for b in cluster.serving(last["port"]))

    return measure


def container_ids(cluster: Cluster, port: int, state: str = "running") -> set[str]:
    """Ids of the containers of the color whose base port is ``port``."""
    return {c["Id"] for c in cluster.containers() if c["State"] == state
            and cluster.count > int(c["Labels"]["shipmate.port"]) - port >= 0}


# ---------------------------------------------------------------- classic ELB


def test_elb_listener_follows_the_color_and_a_broken_image_touches_nothing(elb_cluster):
    cluster, elb, blue, green = elb_cluster(count=2)
    assert elb.port() == blue

    with Sampler(serving_behind(cluster, elb, blue)) as sampler:
        result = cluster.shipmate("deploy", "web", "--image", V2)
    assert result.returncode == 0, result.stderr + cluster.logs()
    assert f"web: deployed {V2}" in result.stdout
    release = cluster.wait_settled()
    assert (release["image"], release["port"]) == (V2, green)
    assert elb.port() == green and elb.health_target() == f"HTTP:{green}/index.html"
    assert elb.listener()["Protocol"] == "HTTP"
    assert cluster.serving(green) == ["v2", "v2"] and cluster.serving(blue) == [None, None]
    assert min(n for _, n in sampler.samples) == 2, sampler.samples
    assert {p for p, _ in sampler.samples} - {None} == {blue, green}
    # a classic listener is deleted and created again: a gap of two API calls, no more
    assert sum(p is None for p, _ in sampler.samples) <= 1, sampler.samples
    eventually(lambda: sorted(a["port"] for a in cluster.announced()) == [green, green + 1],
               timeout=10, what="green announced, blue not")

    assert cluster.shipmate("deploy", "web", "--image", V1).returncode == 0
    release = cluster.wait_settled()
    assert (release["image"], release["port"]) == (V1, blue)
    assert elb.port() == blue and elb.health_target() == f"HTTP:{blue}/index.html"
    assert cluster.serving(blue) == ["v1", "v1"]

    before, serving = elb.describe(), container_ids(cluster, blue)
    broken = cluster.shipmate("deploy", "web", "--image", BROKEN)
    assert broken.returncode == 1
    assert "deploy of web rolled back" in broken.stderr
    assert "exited before passing its health check (GET /)" in broken.stderr
    cluster.wait_settled()
    assert elb.describe()["ListenerDescriptions"] == before["ListenerDescriptions"]
    assert elb.describe()["HealthCheck"] == before["HealthCheck"]
    assert container_ids(cluster, blue) == serving  # the very same containers
    assert not container_ids(cluster, green, "exited") | container_ids(cluster, green)
    assert cluster.release()["deploy"]["result"] == "rolled-back"


def test_a_wrong_load_balancer_fails_before_anything_starts(make_cluster, moto):
    blue = port_block(4)
    missing = (f"{{type: elb, name: nosuch, listener_port: 80, region: {REGION}, "
               f"endpoint_url: '{moto.endpoint_url}'}}")
    cluster = make_cluster(count=2, port=blue, deploy=blue_green(blue, blue + 2, missing))
    cluster.start_agent()
    cluster.wait_settled()
    result = cluster.shipmate("deploy", "web", "--image", V2)
    assert result.returncode == 1
    assert "ELB nosuch in us-east-1: describe_load_balancers: AWS answered 400" in result.stderr
    assert "LoadBalancerNotFound" in result.stderr
    assert "testing" not in result.stderr + cluster.logs()  # the fake secret key never shows
    cluster.wait_settled()
    assert cluster.serving(blue) == ["v1", "v1"]


def test_a_failed_bake_switches_the_listener_back(elb_cluster, dockerd):
    cluster, elb, blue, green = elb_cluster(count=2, bake="4s")

    def kill_green() -> None:
        rows = [c for c in cluster.containers() if c["Labels"]["shipmate.port"] == str(green)]
        dockerd.client().api.kill(rows[0]["Id"])

    crash = OnJournal(cluster, lambda j: _step(j) == "baking", kill_green)
    with Sampler(serving_behind(cluster, elb, blue)) as sampler:
        result = cluster.shipmate("deploy", "web", "--image", V2)
    assert crash.fired.is_set()
    assert result.returncode == 1
    assert "during the bake" in result.stderr and "(GET /)" in result.stderr, result.stderr
    release = cluster.wait_settled()
    assert (release["image"], release["port"]) == (V1, blue)
    assert elb.port() == blue and elb.health_target() == f"HTTP:{blue}/index.html"
    assert cluster.serving(blue) == ["v1", "v1"] and cluster.serving(green) == [None, None]
    assert {p for p, _ in sampler.samples} - {None} == {blue, green}
    assert min(n for _, n in sampler.samples) >= 1, sampler.samples


def test_keep_old_parks_the_old_color_and_rollback_starts_the_same_containers(elb_cluster):
    cluster, elb, blue, green = elb_cluster(count=2, keep_old=True)
    first = container_ids(cluster, blue)

    assert cluster.shipmate("deploy", "web", "--image", V2).returncode == 0
    release = cluster.wait_settled()
    assert container_ids(cluster, blue, "exited") == first  # stopped, kept
    v1 = release["previous"]["version"]
    assert release["kept"] == v1
    # the agent goes on (quick passes, then every 2s): it neither removes nor counts them
    status = json.loads(cluster.shipmate("status", "--json").stdout)["services"][0]
    assert (status["running"], status["healthy"]) == (2, 2)
    assert sorted((i["port"], i["running"], i["kept"]) for i in status["instances"]) == [
        (blue, False, True), (blue + 1, False, True), (green, True, False),
        (green + 1, True, False)]
    time.sleep(2.5)  # a negative check: more than a full pass (interval 2s) leaves them be
    assert cluster.settled() and container_ids(cluster, blue, "exited") == first

    result = cluster.shipmate("rollback", "web")
    assert result.returncode == 0, result.stderr + cluster.logs()
    release = cluster.wait_settled()
    assert (release["image"], release["port"], release["version"]) == (V1, blue, v1)
    assert container_ids(cluster, blue) == first  # the kept containers, started again
    assert cluster.serving(blue) == ["v1", "v1"]
    assert elb.port() == blue
    assert len(container_ids(cluster, green, "exited")) == 2 and release["kept"] != v1


def test_deploy_with_blue_green_on_a_service_without_its_settings_is_refused(write_config):
    path = write_config("""
        agent: {cluster: c}
        services:
          web:
            command: [sleep, "60"]
            source: {type: static, count: 1}
            actuator: {type: process}
            deploy: {type: rolling}
        """)
    result = subprocess.run([sys.executable, "-m", "agent", "deploy", "web", "--image", "x",
                             "--strategy", "blue-green", "-c", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "strategy blue-green needs settings (ports)" in result.stderr
    assert "deploy: {type: blue-green, ...}" in result.stderr
    assert not (path.parent / ".shipmate").exists()  # refused before any request was written


# ---------------------------------------------------------------- ALB


def test_alb_forwards_to_the_new_colors_group_with_its_targets(make_cluster, moto):
    # one instance per color: moto keys a group's targets by Id alone (AWS by Id and port)
    blue = port_block(2)
    green = blue + 1
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto.endpoint_url)
    elbv2 = boto3.client("elbv2", region_name=REGION, endpoint_url=moto.endpoint_url)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{n}.0/24",
                                 AvailabilityZone=f"{REGION}{zone}")["Subnet"]["SubnetId"]
               for n, zone in ((1, "a"), (2, "b"))]
    name = f"web-{uuid.uuid4().hex[:8]}"
    lb = elbv2.create_load_balancer(Name=name, Subnets=subnets, Scheme="internal",
                                    Type="application")["LoadBalancers"][0]["LoadBalancerArn"]
    groups = [elbv2.create_target_group(
        Name=f"{name}-{color}", Protocol="HTTP", Port=port, VpcId=vpc, TargetType="ip",
        HealthCheckPath="/")["TargetGroups"][0]["TargetGroupArn"]
        for color, port in (("blue", blue), ("green", green))]
    elbv2.register_targets(TargetGroupArn=groups[0], Targets=[{"Id": "127.0.0.1",
                                                               "Port": blue}])
    listener = elbv2.create_listener(LoadBalancerArn=lb, Protocol="HTTP", Port=80, DefaultActions=[
        {"Type": "forward", "TargetGroupArn": groups[0]}])["Listeners"][0]["ListenerArn"]
    alb = (f"{{type: alb, listener_arn: '{listener}', target_groups: [{groups[0]}, {groups[1]}],"
           f" region: {REGION}, endpoint_url: '{moto.endpoint_url}'}}")
    cluster = make_cluster(count=1, port=blue, deploy=blue_green(blue, green, alb))
    cluster.start_agent()
    cluster.wait_settled()

    def forwards_to() -> list[str]:
        actions = elbv2.describe_listeners(ListenerArns=[listener])["Listeners"][0][
            "DefaultActions"]
        return [a["TargetGroupArn"] for a in actions if a["Type"] == "forward"]

    def targets(group: str) -> list[tuple[str, int]]:
        return [(t["Target"]["Id"], t["Target"]["Port"]) for t in elbv2.describe_target_health(
            TargetGroupArn=group)["TargetHealthDescriptions"]]

    result = cluster.shipmate("deploy", "web", "--image", V2)
    assert result.returncode == 0, result.stderr + cluster.logs()
    assert cluster.wait_settled()["port"] == green
    assert forwards_to() == [groups[1]]
    assert targets(groups[1]) == [("127.0.0.1", green)]
    assert cluster.serving(green) == ["v2"]

    assert cluster.shipmate("deploy", "web", "--image", V1).returncode == 0
    assert cluster.wait_settled()["port"] == blue
    assert forwards_to() == [groups[0]]
    assert targets(groups[0]) == [("127.0.0.1", blue)]


# ---------------------------------------------------------------- kill -9 at each step

def green_started(cluster: Cluster, green: int) -> bool:
    return any(c["Labels"]["shipmate.port"] == str(green) for c in cluster.containers())


def _step(journal: dict[str, Any]) -> str | None:
    """The blue/green step the journal records (under the strategy's own state)."""
    return journal.get("strategy_state", {}).get("step")


FORWARD = {
    # mid-start: one green container created (seen by the poll), the other not yet
    "starting": lambda j, started: _step(j) == "starting" and started(),
    # the moment the listener's state is recorded: the switch is under way
    "switching": lambda j, _: "lb_before" in j.get("strategy_state", {}),
    "baking": lambda j, _: _step(j) == "baking",
    "draining": lambda j, _: _step(j) == "draining",
    "draining-keep-old": lambda j, _: _step(j) == "draining",
}


@pytest.mark.parametrize("step", list(FORWARD))
def test_agent_killed_at_each_step_the_next_agent_finishes(step, elb_cluster, moto):
    keep_old = step.endswith("keep-old")
    cluster, elb, blue, green = elb_cluster(count=2, bake="2s", keep_old=keep_old,
                                            protocol="TCP" if step == "switching" else "HTTP")
    agent = cluster.agents[0]
    killer = kill_at(cluster, agent,
                     lambda j: FORWARD[step](j, lambda: green_started(cluster, green)))
    with Sampler(serving_behind(cluster, elb, blue)) as sampler:
        cluster.request(V2)
        journal = killer.wait()
        assert journal["phase"] == "running" and cluster.journal() is not None
        if step == "switching":  # the worst moment: the old listener deleted, no new one yet
            elb.client.delete_load_balancer_listeners(LoadBalancerName=elb.name,
                                                      LoadBalancerPorts=[80])
        cluster.start_agent()
        release = cluster.wait_settled(timeout=40, what="v2 on green")
    assert (release["image"], release["port"]) == (V2, green)
    assert release["deploy"]["result"] == "finished"
    assert elb.port() == green and elb.health_target() == f"HTTP:{green}/index.html"
    assert elb.listener()["Protocol"] == ("TCP" if step == "switching" else "HTTP")
    assert cluster.serving(green) == ["v2", "v2"]
    assert len(container_ids(cluster, blue, "exited")) == (2 if keep_old else 0)
    assert not container_ids(cluster, blue) | container_ids(cluster, green, "exited")
    assert min(n for _, n in sampler.samples) == 2, sampler.samples


def test_agent_killed_rolling_back_a_broken_image_the_next_agent_completes(elb_cluster):
    cluster, elb, blue, green = elb_cluster(count=2)
    before, serving = elb.describe(), container_ids(cluster, blue)
    killer = kill_at(cluster, cluster.agents[0], lambda j: j.get("phase") == "rolling-back")
    with Sampler(serving_behind(cluster, elb, blue)) as sampler:
        cluster.request(BROKEN)
        assert "exited before passing its health check" in killer.wait()["error"]
        cluster.start_agent()
        release = cluster.wait_settled(timeout=40, what="v1 on blue again")
    assert (release["image"], release["deploy"]["result"]) == (V1, "rolled-back")
    assert elb.describe()["ListenerDescriptions"] == before["ListenerDescriptions"]
    assert container_ids(cluster, blue) == serving
    assert not container_ids(cluster, green) | container_ids(cluster, green, "exited")
    assert min(n for _, n in sampler.samples) == 2, sampler.samples


def test_agent_killed_rolling_back_after_the_switch_the_next_switches_back(elb_cluster,
                                                                           dockerd):
    cluster, elb, blue, green = elb_cluster(count=2, bake="4s")

    def kill_green() -> None:
        rows = [c for c in cluster.containers() if c["Labels"]["shipmate.port"] == str(green)]
        dockerd.client().api.kill(rows[0]["Id"])

    crash = OnJournal(cluster, lambda j: _step(j) == "baking", kill_green)
    killer = kill_at(cluster, cluster.agents[0], lambda j: j.get("phase") == "rolling-back")
    with Sampler(serving_behind(cluster, elb, blue)) as sampler:
        cluster.request(V2)
        journal = killer.wait()
        assert crash.fired.is_set() and "lb_before" in journal["strategy_state"]
        cluster.start_agent()
        release = cluster.wait_settled(timeout=40, what="v1 on blue again")
    assert (release["image"], release["port"]) == (V1, blue)
    assert "during the bake" in release["deploy"]["reason"]
    assert elb.port() == blue and elb.health_target() == f"HTTP:{blue}/index.html"
    assert cluster.serving(blue) == ["v1", "v1"]
    assert not container_ids(cluster, green) | container_ids(cluster, green, "exited")
    assert min(n for _, n in sampler.samples) >= 1, sampler.samples
