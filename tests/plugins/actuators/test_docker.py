"""The docker actuator against a real Docker engine (the session's private dockerd)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import Context, InstanceSpec
from agent.config import ConfigError, HealthConfig
from plugins.actuators.docker import DockerActuator, DockerConfig, DockerError
from tests.helpers import eventually, port_block
from tests.services import Dockerd, MissingDependency, Service, free_port, http_get

HTTPD = ["httpd", "-f", "-p", "{port}", "-h", "/www"]


def containers(dockerd: Dockerd, cluster: str) -> list[dict[str, Any]]:
    """Every container of ``cluster`` on the engine (running or not), as the API lists them."""
    return dockerd.client().api.containers(
        all=True, filters={"label": f"shipmate.cluster={cluster}"})


def remove_cluster(dockerd: Dockerd, cluster: str) -> None:
    for row in containers(dockerd, cluster):
        dockerd.client().api.remove_container(row["Id"], force=True)


@pytest.fixture
def cluster(dockerd: Dockerd) -> Iterator[str]:
    """A cluster name of this test alone; its containers are removed afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    remove_cluster(dockerd, name)


@pytest.fixture
def actuator(dockerd: Dockerd, cluster: str, embedded_store, tmp_path: Path
             ) -> Iterator[Callable[..., DockerActuator]]:
    """``actuator(**config)``: a docker actuator on the test engine (host defaults to it)."""
    made: list[DockerActuator] = []

    def make(**config: Any) -> DockerActuator:
        config.setdefault("host", dockerd.host)
        context = Context(cluster=cluster, store=embedded_store, state_dir=tmp_path)
        act = DockerActuator(DockerConfig(**config), context)
        made.append(act)
        return act

    yield make
    for act in made:
        act.close()


def spec(cluster: str, slot: int = 0, port: int | None = None, *, service: str = "web",
         version: str = "abc123", image: str = Dockerd.WEB_V1,
         command: list[str] | None = None, env: dict[str, str] | None = None) -> InstanceSpec:
    port = port if port is not None else free_port()
    command = [part.replace("{port}", str(port)) for part in (command or HTTPD)]
    return InstanceSpec(cluster=cluster, service=service, slot=slot, version=version,
                        name=f"{cluster}-{service}-{slot}-{version}", port=port, image=image,
                        command=command, env=env or {},
                        labels={"shipmate.cluster": cluster, "shipmate.service": service,
                                "shipmate.version": version, "shipmate.slot": str(slot)})


def serves(host: str, port: int, body: bytes = b"v1\n") -> bool:
    try:
        return http_get(f"http://{host}:{port}/", timeout=1) == (200, body)
    except OSError:
        return False


# ---------------------------------------------------------------- start, list, stop


def test_start_list_health_stop(dockerd, busybox_images, cluster, actuator):
    act = actuator()
    s = spec(cluster, slot=2)
    started = act.start(s)
    assert (started.name, started.slot, started.port, started.host) == (
        s.name, 2, s.port, "127.0.0.1")

    (listed,) = act.list()
    assert (listed.name, listed.service, listed.slot, listed.version, listed.port,
            listed.running) == (s.name, "web", 2, "abc123", s.port, True)
    labels = containers(dockerd, cluster)[0]["Labels"]
    assert {k: v for k, v in labels.items() if k.startswith("shipmate.")} == {
        "shipmate.cluster": cluster, "shipmate.service": "web", "shipmate.version": "abc123",
        "shipmate.slot": "2", "shipmate.port": str(s.port)}
    eventually(lambda: serves("127.0.0.1", s.port), what="httpd answers on the host network")
    assert act.healthy(listed, HealthConfig(http="/"))
    assert not act.healthy(listed, HealthConfig(http="/missing"))

    act.stop(listed, grace=1)  # httpd as PID 1 ignores SIGTERM: killed after 1 s
    assert containers(dockerd, cluster) == []
    assert act.list() == []
    act.stop(listed, grace=5)  # already gone: fine


def test_listing_is_one_api_call_for_every_service(dockerd, busybox_images, cluster, actuator):
    act = actuator()
    for service in ("web", "api", "worker"):
        for slot in range(2):
            act.start(spec(cluster, slot, service=service, command=["sleep", "300"]))
    other = f"{cluster}x"  # another cluster on the same engine is not listed
    try:
        act_other = actuator()
        act_other.context.cluster = other
        act_other.start(spec(other, 0, command=["sleep", "300"]))
        before = act.api_calls
        listed = act.list()
        assert act.api_calls - before == 1
        assert sorted((i.service, i.slot) for i in listed) == sorted(
            (s, n) for s in ("web", "api", "worker") for n in range(2))
    finally:
        remove_cluster(dockerd, other)


def test_env_volumes_limits_restart_and_init(dockerd, busybox_images, cluster, actuator,
                                             tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.html").write_text("from the host\n")
    act = actuator(volumes=[f"{data}:/www:ro"], cpus=0.5, memory="64m",
                   restart="on-failure:2", init=True)
    s = spec(cluster, env={"GREETING": "hello"})
    act.start(s)
    eventually(lambda: serves("127.0.0.1", s.port, b"from the host\n"),
               what="httpd serves the bind-mounted folder")
    info = dockerd.client().api.inspect_container(s.name)
    host = info["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["RestartPolicy"], host["Init"]) == (
        500_000_000, 64 * 1024 * 1024, {"Name": "on-failure", "MaximumRetryCount": 2}, True)
    assert "GREETING=hello" in info["Config"]["Env"]
    # with an init as PID 1, SIGTERM ends httpd at once instead of after the grace period
    started = time.monotonic()
    act.stop(act.list()[0], grace=10)
    assert time.monotonic() - started < 5
    assert containers(dockerd, cluster) == []


# ---------------------------------------------------------------- exited, adoption, conflicts


def test_exited_container_is_listed_not_running_and_removed_by_stop(
        dockerd, busybox_images, cluster, actuator):
    act = actuator()
    act.start(spec(cluster, command=["sh", "-c", "exit 3"]))
    exited = eventually(lambda: [i for i in act.list() if not i.running], what="exit")[0]
    assert not act.healthy(exited, None)
    act.stop(exited, grace=5)
    assert containers(dockerd, cluster) == []


def test_a_created_but_never_started_container_is_replaced(
        dockerd, busybox_images, cluster, actuator):
    s = spec(cluster)
    left = dockerd.client().api.create_container(  # as an agent killed mid-start leaves it
        Dockerd.WEB_V1, ["sleep", "300"], name=s.name, labels=s.labels)
    act = actuator()
    (listed,) = act.list()
    assert not listed.running
    act.stop(listed, grace=1)
    started = act.start(s)
    assert started.ref["id"] != left["Id"]
    assert [r["State"] for r in containers(dockerd, cluster)] == ["running"]


def test_start_of_a_running_slot_adopts_it(dockerd, busybox_images, cluster, actuator):
    act = actuator()
    s = spec(cluster)
    first = act.start(s)
    again = actuator().start(s)  # as a restarted agent would
    assert again.ref["id"] == first.ref["id"] and again.running
    assert len(containers(dockerd, cluster)) == 1


def test_start_over_an_exited_container_of_the_slot_replaces_it(
        dockerd, busybox_images, cluster, actuator):
    act = actuator()
    old = act.start(spec(cluster, command=["sh", "-c", "exit 0"]))
    eventually(lambda: not act.list()[0].running, what="exit")
    new = act.start(spec(cluster))
    assert new.ref["id"] != old.ref["id"]
    (row,) = containers(dockerd, cluster)
    assert row["Id"] == new.ref["id"] and row["State"] == "running"


def test_a_foreign_container_with_the_slot_name_is_not_touched(
        dockerd, busybox_images, cluster, actuator):
    s = spec(cluster)
    foreign = dockerd.client().containers.run(Dockerd.WEB_V1, ["sleep", "300"], name=s.name,
                                              detach=True, network_mode="none")
    try:
        with pytest.raises(DockerError, match=f"a container named {s.name} exists but is not"):
            actuator().start(s)
        foreign.reload()
        assert foreign.status == "running"
    finally:
        foreign.remove(force=True)


def test_a_command_that_cannot_run_is_a_clear_error_and_leaves_nothing(
        dockerd, busybox_images, cluster, actuator):
    with pytest.raises(DockerError, match="start .*no-such-binary"):
        actuator().start(spec(cluster, command=["/no-such-binary"]))
    assert containers(dockerd, cluster) == []


# ---------------------------------------------------------------- images


def test_pull_never_with_a_missing_image_says_so(dockerd, cluster, actuator):
    with pytest.raises(DockerError, match="image example.invalid/none:1 is not on the engine "
                                          "and pull is never"):
        actuator(pull="never").start(spec(cluster, image="example.invalid/none:1"))


class Registry(Service):
    """A Docker registry (Debian's docker-registry, distribution v2) on a loopback port."""

    def __init__(self) -> None:
        self.binary = shutil.which("docker-registry")
        if self.binary is None:
            raise MissingDependency("binary 'docker-registry'",
                                    "install the Debian package docker-registry (scripts/test "
                                    "does)")
        super().__init__("shipmate-svc-registry-")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        (self.dir / "config.yml").write_text(json.dumps({  # JSON is YAML
            "version": 0.1, "log": {"level": "error"},
            "storage": {"filesystem": {"rootdirectory": str(self.dir / "data")}},
            "http": {"addr": self.address}}))

    def command(self) -> list[str]:
        return [self.binary, "serve", str(self.dir / "config.yml")]

    def ready(self) -> bool:
        return http_get(f"http://{self.address}/v2/", timeout=1)[0] == 200


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    try:
        service = Registry()
    except MissingDependency as err:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{err} (CI is set, so every service is required)", pytrace=False)
        pytest.skip(str(err))
    service.start()
    yield service
    service.close()


def push(dockerd: Dockerd, source: str, target: str) -> None:
    """Tag ``source`` as ``target``, push it (the engine trusts loopback registries), untag it."""
    api = dockerd.client().api
    repository, tag = target.rsplit(":", 1)
    api.tag(source, repository, tag)
    for line in api.push(repository, tag=tag, stream=True, decode=True):
        assert "error" not in line, line
    api.remove_image(target)


def test_pull_missing_and_always_from_a_registry(dockerd, busybox_images, cluster, actuator,
                                                 registry):
    image = f"{registry.address}/web:{cluster}"
    push(dockerd, Dockerd.WEB_V1, image)
    missing, always = actuator(pull="missing"), actuator(pull="always")
    first = spec(cluster, 0, image=image)
    missing.start(first)  # not on the engine: pulled
    eventually(lambda: serves("127.0.0.1", first.port, b"v1\n"), what="v1 pulled and serving")

    push(dockerd, Dockerd.WEB_V2, image)  # the registry now has new content under the tag
    dockerd.client().api.tag(Dockerd.WEB_V1, *image.rsplit(":", 1))  # the engine: still v1
    second, third = spec(cluster, 1, image=image), spec(cluster, 2, image=image)
    missing.start(second)  # on the engine: no pull
    always.start(third)  # pulled again: the new content
    eventually(lambda: serves("127.0.0.1", second.port, b"v1\n"), what="the local image")
    eventually(lambda: serves("127.0.0.1", third.port, b"v2\n"), what="the pulled image")


def test_a_failed_pull_is_a_clear_error(dockerd, busybox_images, cluster, actuator, registry):
    with pytest.raises(DockerError, match=rf"pull {registry.address}/none:1: .*not found"):
        actuator(pull="missing").start(spec(cluster, image=f"{registry.address}/none:1"))
    assert containers(dockerd, cluster) == []


# ---------------------------------------------------------------- health


@pytest.fixture(scope="module")
def healthcheck_image(dockerd: Dockerd) -> str:
    """The web image with a HEALTHCHECK that passes once /tmp/ok exists."""
    tag = "shipmate-test/web:healthcheck"
    dockerfile = (f"FROM {Dockerd.WEB_V1}\n"
                  "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD cat /tmp/ok\n")
    dockerd.client().images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    return tag


def test_healthcheck_status_wins_over_the_probe(dockerd, cluster, actuator, healthcheck_image):
    act = actuator()
    s = spec(cluster, image=healthcheck_image)
    act.start(s)
    eventually(lambda: serves("127.0.0.1", s.port), what="httpd answers")
    probe_ok = HealthConfig(http="/")
    eventually(lambda: act.list()[0].ref["health"] == "unhealthy", what="HEALTHCHECK fails")
    assert not act.healthy(act.list()[0], probe_ok)  # serving, but its own check says no
    dockerd.client().api.exec_start(
        dockerd.client().api.exec_create(s.name, ["sh", "-c", "echo > /tmp/ok"]))
    eventually(lambda: act.healthy(act.list()[0], HealthConfig(http="/missing")), timeout=10,
               what="HEALTHCHECK passes (the failing probe is not used)")


# ---------------------------------------------------------------- networks


@pytest.fixture
def network(dockerd: Dockerd, cluster: str) -> Iterator[str]:
    """A user-defined bridge network on a subnet of its own (the cluster's containers on it)."""
    name = f"smnet{uuid.uuid4().hex[:6]}"
    import docker

    third = int(uuid.uuid4().hex[:2], 16)
    ipam = docker.types.IPAMConfig(pool_configs=[
        docker.types.IPAMPool(subnet=f"10.213.{third}.0/24")])
    net = dockerd.client().networks.create(name, driver="bridge", ipam=ipam)
    yield name
    remove_cluster(dockerd, cluster)
    net.remove()


def test_named_network_with_published_port(dockerd, busybox_images, cluster, actuator,
                                           network):
    act = actuator(network=network, host_address="127.0.0.1")
    s = spec(cluster)
    act.start(s)
    (listed,) = act.list()
    assert (listed.host, listed.port) == ("127.0.0.1", s.port)
    eventually(lambda: serves("127.0.0.1", s.port), what="the published port answers")
    row = containers(dockerd, cluster)[0]
    assert network in row["NetworkSettings"]["Networks"]


def test_named_network_unpublished_is_reached_at_the_container_address(
        dockerd, busybox_images, cluster, actuator, network):
    act = actuator(network=network, publish=False)
    s = spec(cluster)
    started = act.start(s)
    (listed,) = act.list()
    assert listed.host == started.host and listed.host.startswith("10.213.")
    eventually(lambda: serves(listed.host, s.port), what="the container address answers")
    assert not serves("127.0.0.1", s.port)
    assert act.healthy(listed, HealthConfig(http="/"))


def test_host_address_defaults(monkeypatch, dockerd, cluster, embedded_store, tmp_path):
    def address(**config: Any) -> str:
        context = Context(cluster=cluster, store=embedded_store, state_dir=tmp_path)
        return DockerActuator(DockerConfig(**config), context).address

    monkeypatch.delenv("COREOS_PRIVATE_IPV4", raising=False)
    assert address(host=dockerd.host) == "127.0.0.1"
    assert address(host="tcp://10.1.2.3:2376") == "10.1.2.3"
    monkeypatch.setenv("COREOS_PRIVATE_IPV4", "10.0.0.5")
    assert address(host=dockerd.host) == "10.0.0.5"
    assert address(host=dockerd.host, host_address="10.9.9.9") == "10.9.9.9"


# ---------------------------------------------------------------- config and errors


def test_config_errors_name_the_key(load_test_config):
    with pytest.raises(ConfigError) as err:
        load_test_config("""
            agent: {cluster: c}
            services:
              web:
                image: x
                source: {type: static, count: 1}
                actuator:
                  type: docker
                  pull: sometimes
                  volumes: [/only-one-part]
                  restart: maybe
                  memory: lots
                  tls: {cert: /no/cert.pem}
        """)
    text = str(err.value)
    for key in ("actuator.pull", "actuator.volumes", "actuator.restart", "actuator.memory",
                "actuator.tls"):
        assert f"services.web.{key}" in text, text
    assert "cert and key go together" in text


def test_an_unreachable_engine_is_a_clear_error(cluster, actuator, tmp_path):
    act = actuator(host=f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(DockerError, match=rf"docker unix://{tmp_path}/no-docker.sock: list "
                                          "containers: cannot reach the engine"):
        act.list()
    with pytest.raises(DockerError, match="start|create"):
        act.start(spec(cluster))


# ---------------------------------------------------------------- through the agent

AGENT = """
agent:
  cluster: {cluster}
  interval: {interval}
  store: {{backend: embedded, path: {tmp}/state.db}}
  state_dir: {tmp}/state
services:
  web:
    image: {image}
    command: {command}
    port: {port}
    health: {{http: /, timeout: 1s}}
    source: {{type: static, count: {count}, interval: 1s}}
    actuator: {{type: docker, host: "{host}", init: true}}
"""


def agent_yaml(dockerd: Dockerd, cluster: str, tmp: Path, *, count: int = 2,
               interval: str = "60s", port: int | None = None) -> str:
    return AGENT.format(cluster=cluster, interval=interval, tmp=tmp, image=Dockerd.WEB_V1,
                        command=Dockerd.WEB_COMMAND,
                        port=port or port_block(count), count=count, host=dockerd.host)


def running_ids(dockerd: Dockerd, cluster: str) -> set[str]:
    return {r["Id"] for r in containers(dockerd, cluster) if r["State"] == "running"}


def test_agent_replaces_a_killed_container_at_once_and_leaves_unowned_ones(
        dockerd, busybox_images, cluster, run_agent, tmp_path, caplog):
    ghost = dockerd.client().containers.run(
        Dockerd.WEB_V1, ["sleep", "300"], detach=True, network_mode="none",
        name=f"{cluster}-ghost-0-x",
        labels={"shipmate.cluster": cluster, "shipmate.service": "ghost",
                "shipmate.slot": "0", "shipmate.version": "x"})
    caplog.set_level(logging.INFO)
    agent = run_agent(agent_yaml(dockerd, cluster, tmp_path, count=2, interval="60s"))
    first = eventually(lambda: len(running_ids(dockerd, cluster)) == 3 and running_ids(
        dockerd, cluster), timeout=30, what="2 web containers (and the ghost)")
    # the pass that sees both healthy schedules the next one 60 s away (no quick passes)
    eventually(lambda: agent.metrics.healthy.labels("web")._value.get() == 2, timeout=30,
               what="both healthy")
    web = next(r for r in containers(dockerd, cluster)
               if r["Labels"]["shipmate.service"] == "web")
    dockerd.client().api.kill(web["Id"])
    # the next timed pass is 60 s away: the engine's "die" event wakes the agent
    eventually(lambda: len(running_ids(dockerd, cluster)) == 3
               and web["Id"] not in running_ids(dockerd, cluster), timeout=30,
               what="the killed container replaced")
    assert len(containers(dockerd, cluster)) == 3  # the exited one was removed
    ghost.reload()
    assert ghost.status == "running" and ghost.id in first
    assert f"instance {cluster}-ghost-0-x of service 'ghost' belongs to no configured " \
           "service: left alone" in caplog.text


def test_agent_survives_an_engine_restart(tls_engine, cluster, run_agent, tmp_path, caplog):
    """The engine is stopped (its containers go with it) and started again."""
    engine = tls_engine
    caplog.set_level(logging.INFO)
    agent = run_agent(agent_yaml(engine, cluster, tmp_path, count=2, interval="60s"))
    try:
        eventually(lambda: len(running_ids(engine, cluster)) == 2, timeout=10,
                   what="2 containers")
        engine.stop()
        # an override wakes the agent (store watch): its pass fails to list, and goes on
        agent.store.put(f"/shipmate/{cluster}/services/web/override", "2")
        eventually(lambda: "cannot reach the engine" in caplog.text, timeout=10,
                   what="the failed listing reported")
    finally:
        engine.start()
    # the event stream reconnects and wakes the agent: no waiting for the 60 s pass
    eventually(lambda: len(running_ids(engine, cluster)) == 2, timeout=15,
               what="2 containers on the restarted engine")
    assert len(containers(engine, cluster)) == 2
    remove_cluster(engine, cluster)


# ---------------------------------------------------------------- TLS


def make_tls(folder: Path, name: str) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(cn: str, issuer: x509.Name | None, signer: Any, **ext: Any) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer or subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension in ext.values():
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(signer or key, hashes.SHA256()), key

    ca, ca_key = build(f"{name} CA", None, None, basic=x509.BasicConstraints(True, None),
                       usage=x509.KeyUsage(False, False, False, False, False, True, True, False,
                                           False))
    server, server_key = build("127.0.0.1", ca.subject, ca_key,
                               san=x509.SubjectAlternativeName(
                                   [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]))
    client, client_key = build("shipmate", ca.subject, ca_key,
                               eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))
    files = {}
    for label, cert, key in (("ca", ca, None), ("server", server, server_key),
                             ("client", client, client_key)):
        files[f"{label}-cert"] = folder / f"{name}-{label}.pem"
        files[f"{label}-cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            files[f"{label}-key"] = folder / f"{name}-{label}-key.pem"
            files[f"{label}-key"].write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
    return files


class TlsDockerd(Dockerd):
    """A private engine on its unix socket and on tcp://127.0.0.1:PORT with --tlsverify."""

    def __init__(self, tls: dict[str, Path]) -> None:
        super().__init__()
        self.tls, self.tcp = tls, f"tcp://127.0.0.1:{free_port()}"

    def command(self) -> list[str]:
        return [*super().command(), f"--host={self.tcp}", "--tlsverify",
                f"--tlscacert={self.tls['ca-cert']}", f"--tlscert={self.tls['server-cert']}",
                f"--tlskey={self.tls['server-key']}"]


@pytest.fixture(scope="module")
def tls_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsDockerd]:
    """An engine of this module alone (tests stop and start it) that also speaks TLS."""
    folder = tmp_path_factory.mktemp("tls")
    engine = TlsDockerd(make_tls(folder, "good"))
    engine.start()
    try:
        engine.build_busybox_images()
        engine.other_ca = make_tls(folder, "other")
        yield engine
    finally:
        engine.close()


def test_tls_engine_with_ca_and_client_certificate(tls_engine, cluster, embedded_store,
                                                   tmp_path):
    tls = tls_engine.tls

    def make(**config: Any) -> DockerActuator:
        context = Context(cluster=cluster, store=embedded_store, state_dir=tmp_path)
        return DockerActuator(DockerConfig(host=tls_engine.tcp, **config), context)

    act = make(tls={"ca": tls["ca-cert"], "cert": tls["client-cert"],
                    "key": tls["client-key"]})
    try:
        started = act.start(spec(cluster, command=["sleep", "300"]))
        assert [i.name for i in act.list()] == [started.name]
        assert act.address == "127.0.0.1"  # the tcp engine's host
        act.stop(act.list()[0], grace=0)
    finally:
        act.close()
        remove_cluster(tls_engine, cluster)

    wrong_ca = tls_engine.other_ca
    for config, reason in (
            ({}, "Client sent an HTTP request to an HTTPS server"),
            ({"tls": {"ca": wrong_ca["ca-cert"], "cert": tls["client-cert"],
                      "key": tls["client-key"]}}, "certificate verify failed"),
            ({"tls": {"ca": tls["ca-cert"]}}, "cannot reach the engine")):
        other = make(**config)
        with pytest.raises(DockerError, match=reason) as err:
            other.list()
        assert str(err.value).startswith(f"docker {tls_engine.tcp}: list containers: ")
        other.close()


def test_an_exited_container_has_its_exit_code_and_output(actuator, cluster):
    docker = actuator()
    docker.start(spec(cluster, image=Dockerd.WEB_BROKEN))
    exited = eventually(lambda: (found := docker.list()) and not found[0].running and found[0],
                        timeout=20, what="the broken container to exit")
    assert exited.exit_code == 1
    assert "can't change directory to '/www'" in docker.output(exited)
