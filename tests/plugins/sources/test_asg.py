"""The ``asg`` source against a real moto server (the real boto3 code path and API shape)."""

from __future__ import annotations

import logging
import uuid

import pytest

from agent import SourceError
from agent.config import ConfigError
from tests.services import free_port

REGION = "us-east-1"


@pytest.fixture(scope="module")
def aws(moto):
    """boto3 clients on the moto server and a factory of Auto Scaling groups."""
    import boto3

    autoscaling = boto3.client("autoscaling", endpoint_url=moto.endpoint_url, region_name=REGION)
    ec2 = boto3.client("ec2", endpoint_url=moto.endpoint_url, region_name=REGION)
    image = ec2.describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"]

    class Aws:
        client = autoscaling
        endpoint_url = moto.endpoint_url

        @staticmethod
        def group(desired: int) -> str:
            """A new group with ``desired`` instances (moto starts them InService)."""
            name = f"web-{uuid.uuid4().hex[:8]}"
            autoscaling.create_launch_configuration(
                LaunchConfigurationName=name, ImageId=image, InstanceType="t2.micro")
            autoscaling.create_auto_scaling_group(
                AutoScalingGroupName=name, LaunchConfigurationName=name, MinSize=0, MaxSize=20,
                DesiredCapacity=desired, AvailabilityZones=[f"{REGION}a"])
            return name

        @staticmethod
        def instances(name: str) -> list[dict]:
            groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
            return groups["AutoScalingGroups"][0]["Instances"]

    return Aws


@pytest.fixture
def source(load_test_config, shipmate_plugins, tmp_path, embedded_store):
    """``source(**keys)`` -> an AsgSource built from YAML like a user writes."""
    from agent.kinds import Context

    made = []

    def make(**keys) -> object:
        body = ", ".join(f"{k}: {v}" for k, v in {"region": REGION, **keys}.items())
        config = load_test_config(f"""
            agent: {{cluster: t}}
            services:
              web:
                source: {{type: asg, {body}}}
                actuator: {{type: process}}
            """)
        cls = shipmate_plugins.types["source"]["asg"].cls
        obj = cls(config.services["web"].source,
                  Context(cluster="t", store=embedded_store, state_dir=tmp_path))
        made.append(obj)
        return obj

    yield make
    for obj in made:
        obj.close()


def test_one_per_in_service_instance(aws, source):
    group = aws.group(4)
    asg = source(group=group, endpoint_url=aws.endpoint_url)
    assert asg.read() == 4
    aws.client.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=2)
    assert len(aws.instances(group)) == 2
    assert asg.read() == 2


def test_per_instance_multiplies(aws, source):
    group = aws.group(3)
    assert source(group=group, endpoint_url=aws.endpoint_url, per_instance=2).read() == 6


def test_instances_out_of_service_do_not_count(aws, source):
    group = aws.group(3)
    standby = aws.instances(group)[0]["InstanceId"]
    aws.client.enter_standby(AutoScalingGroupName=group, InstanceIds=[standby],
                             ShouldDecrementDesiredCapacity=True)
    states = sorted(i["LifecycleState"] for i in aws.instances(group))
    assert states == ["InService", "InService", "Standby"]
    assert source(group=group, endpoint_url=aws.endpoint_url).read() == 2


def test_count_from_desired_capacity(aws, source):
    group = aws.group(3)
    asg = source(group=group, endpoint_url=aws.endpoint_url, count_from="desired",
                 per_instance=3)
    assert asg.read() == 9


def test_an_unknown_group_is_an_error_naming_it(aws, source):
    with pytest.raises(SourceError, match=r"asg: no Auto Scaling group 'nope' in us-east-1"):
        source(group="nope", endpoint_url=aws.endpoint_url).read()


def test_no_credentials_is_a_clear_error(aws, source, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role here
    with pytest.raises(SourceError, match="asg: Auto Scaling group 'web' in us-east-1: "
                                          "no AWS credentials found"):
        source(group="web", endpoint_url=aws.endpoint_url).read()


def test_credentials_come_from_the_environment_and_never_show(aws, source, monkeypatch,
                                                               caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASHIPMATETESTKEY1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "shipmate-test-secret-value")
    group = aws.group(1)
    assert source(group=group, endpoint_url=aws.endpoint_url).read() == 1
    with pytest.raises(SourceError) as err:
        source(group="absent", endpoint_url=aws.endpoint_url).read()
    assert "shipmate-test-secret-value" not in caplog.text + str(err.value)


def test_an_unreachable_endpoint(source):
    asg = source(group="web", endpoint_url=f"http://127.0.0.1:{free_port()}", timeout="1s")
    with pytest.raises(SourceError, match=r"asg: Auto Scaling group 'web' in us-east-1: "
                                          r"describe_auto_scaling_groups: Could not connect"):
        asg.read()


def test_config_errors_name_the_key(load_test_config):
    with pytest.raises(ConfigError) as err:
        load_test_config("""
            agent: {cluster: t}
            services:
              web:
                source: {type: asg, region: eu-west-1, per_instance: 0, count_from: running,
                         secret_key: abc}
                actuator: {type: process}
            """)
    text = str(err.value)
    assert "services.web.source.group: required key is missing" in text
    assert "services.web.source.per_instance: Input should be greater than or equal to 1" in text
    assert "services.web.source.count_from: Input should be 'in_service' or 'desired'" in text
    assert "services.web.source.secret_key: unknown key 'secret_key'" in text
