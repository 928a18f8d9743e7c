"""Prove that each real-service fixture works."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterable, Iterator

import pytest

from tests.services import Dockerd, Etcd, Moto, Prometheus, free_port, http_get, wait_until


def test_etcd_put_get_survives_restart(etcd: Etcd) -> None:
    etcd.etcdctl("put", "/shipmate-test/key", "42")
    assert etcd.etcdctl("get", "--print-value-only", "/shipmate-test/key").strip() == "42"

    etcd.stop()
    with pytest.raises(RuntimeError):
        etcd.etcdctl("get", "/shipmate-test/key", "--dial-timeout=300ms", "--command-timeout=500ms")
    etcd.start()

    assert etcd.endpoint == f"http://127.0.0.1:{etcd.port}"
    assert etcd.etcdctl("get", "--print-value-only", "/shipmate-test/key").strip() == "42"
    status, body = http_get(f"{etcd.endpoint}/v2/keys/")  # the v2 API is on too
    assert status == 200, body


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_web_image_serves_its_version(
    dockerd: Dockerd, busybox_images: dict[str, str], version: str
) -> None:
    port = free_port()
    container = dockerd.client().containers.run(
        busybox_images[version],
        ["httpd", "-f", "-p", str(port), "-h", "/www"],
        network_mode="host",
        detach=True,
    )
    try:
        wait_until(
            lambda: http_get(f"http://127.0.0.1:{port}/") == (200, f"{version}\n".encode()),
            10,
            "web answers",
        )
    finally:
        container.remove(force=True)


def test_broken_image_exits_at_once(dockerd: Dockerd, busybox_images: dict[str, str]) -> None:
    container = dockerd.client().containers.run(
        busybox_images["broken"],
        ["httpd", "-f", "-p", str(free_port()), "-h", "/www"],
        network_mode="host",
        detach=True,
    )
    try:
        assert container.wait(timeout=10)["StatusCode"] == 1
    finally:
        container.remove(force=True)


def test_moto_answers_autoscaling(moto: Moto) -> None:
    import boto3

    client = boto3.client("autoscaling", endpoint_url=moto.endpoint_url)
    client.create_launch_configuration(
        LaunchConfigurationName="lc", ImageId="ami-12345678", InstanceType="t2.micro"
    )
    client.create_auto_scaling_group(
        AutoScalingGroupName="web-asg",
        LaunchConfigurationName="lc",
        MinSize=0,
        MaxSize=5,
        DesiredCapacity=2,
        AvailabilityZones=["us-east-1a"],
    )
    try:
        groups = client.describe_auto_scaling_groups(AutoScalingGroupNames=["web-asg"])[
            "AutoScalingGroups"
        ]
        assert [g["DesiredCapacity"] for g in groups] == [2]
        assert len(groups[0]["Instances"]) == 2
    finally:
        moto.reset()


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = b"# TYPE shipmate_test_value gauge\nshipmate_test_value 7\n"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metrics_target() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_prometheus_scrapes_target(
    prometheus_server: Callable[[Iterable[str]], Prometheus], metrics_target: str
) -> None:
    prom = prometheus_server([metrics_target])
    prom.wait_for_up(timeout=15)
    assert [r["value"][1] for r in prom.query("shipmate_test_value")] == ["7"]
