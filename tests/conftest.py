"""Fixtures that start real services for the tests (see tests/services.py).

A fixture whose binary is missing fails when the environment variable CI is
set (CI installs everything via scripts/test) and skips, naming what is
missing, on a developer machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import pytest

from tests.services import (
    Dockerd,
    Etcd,
    EtcdCluster,
    Haproxy,
    MissingDependency,
    Moto,
    Prometheus,
    Service,
)

S = TypeVar("S", bound=Service)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _started(factory: Callable[[], S]) -> S:
    """Create and start a service; fail (CI) or skip (elsewhere) if it is not installed."""
    try:
        service = factory()
    except MissingDependency as err:
        if _in_ci():
            pytest.fail(f"{err} (CI is set, so every service is required)", pytrace=False)
        pytest.skip(f"{err} (set CI=true to make this a failure)")
    try:
        service.start()
    except BaseException:
        service.close()
        raise
    return service


@pytest.fixture(scope="session")
def etcd() -> Iterator[Etcd]:
    """A running etcd with the v2 and v3 APIs.

    ``.endpoint``, ``.port``, ``.etcdctl(*args)``; ``.stop()`` and ``.start()`` keep
    the port and data.  Shared by the session: a test that stops it starts it again.
    """
    service = _started(Etcd)
    yield service
    service.close()


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """Three etcd members on loopback (``.endpoints``, ``.members``, ``.etcdctl(*args)``)."""
    cluster = _started(EtcdCluster)
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    """A private Docker daemon (``.host`` = "unix://...") with the busybox test images imported."""
    service = _started(Dockerd)
    try:
        service.build_busybox_images()
    except BaseException:
        service.close()
        raise
    yield service
    service.close()


@pytest.fixture(scope="session")
def busybox_images(dockerd: Dockerd) -> dict[str, str]:
    """Tags on ``dockerd``: {"v1": ..., "v2": ..., "broken": ...} (Dockerd.build_busybox_images)."""
    return dockerd.images


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    """A running moto_server (``.endpoint_url``, ``.reset()``); fake AWS credentials in the env."""
    service = _started(Moto)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.delenv(name, raising=False)
        yield service
    service.close()


@pytest.fixture
def prometheus_server() -> Iterator[Callable[[Iterable[str]], Prometheus]]:
    """Factory: ``prometheus_server(["127.0.0.1:PORT"])`` starts Prometheus scraping them."""
    started: list[Prometheus] = []

    def start(targets: Iterable[str]) -> Prometheus:
        service = _started(lambda: Prometheus(targets))
        started.append(service)
        return service

    yield start
    for service in started:
        service.close()


@pytest.fixture
def haproxy_server() -> Iterator[Callable[..., Haproxy]]:
    """Factory: ``haproxy_server(redispatch=False)`` starts a haproxy on loopback (``.url``,
    ``.set_servers([...])`` renders its backends and reloads it), stopped after the test."""
    started: list[Haproxy] = []

    def start(redispatch: bool = False) -> Haproxy:
        service = _started(lambda: Haproxy(redispatch=redispatch))
        started.append(service)
        return service

    yield start
    for service in started:
        service.close()


# --- project fixtures below ---
