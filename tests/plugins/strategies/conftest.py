"""Fixtures of the deploy tests: a service's cluster on the real Docker engine and etcd."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.plugins.strategies.support import Cluster


@pytest.fixture
def make_cluster(etcd, dockerd, busybox_images, tmp_path) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(count=, port=, deploy=)``: a cluster of its own (removed afterwards)."""
    made: list[Cluster] = []

    def make(**kwargs: Any) -> Cluster:
        cluster = Cluster(etcd=etcd, dockerd=dockerd, tmp=tmp_path, **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()
