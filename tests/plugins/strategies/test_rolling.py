"""The ``rolling`` strategy on a real Docker engine and a real etcd, the agent a real process.

The images ``shipmate-test/web:v1`` and ``:v2`` serve "v1" and "v2"; ``:broken``
exits at once, so it never passes its health check.
"""

from __future__ import annotations

from tests.helpers import eventually, port_block
from tests.plugins.strategies.support import BROKEN, V1, V2, Sampler, kill_at

ROLLING = "{type: rolling, batch: 1, health_timeout: 10s}"


def test_four_instances_roll_to_v2_with_three_serving_and_broken_v3_rolls_back(make_cluster):
    port = port_block(4)
    cluster = make_cluster(count=4, port=port, deploy=ROLLING)
    cluster.start_agent()
    cluster.wait_settled(what="4 instances of v1")

    with Sampler(lambda: sum(b is not None for b in cluster.serving(port))) as sampler:
        result = cluster.shipmate("deploy", "web", "--image", V2)
    assert result.returncode == 0, result.stderr + cluster.logs()
    assert f"web: deployed {V2}" in result.stdout
    assert len(sampler.samples) > 20 and min(sampler.samples) >= 3, sampler.samples
    release = cluster.wait_settled()
    assert release["image"] == V2 and release["previous"]["image"] == V1
    assert cluster.serving(port) == ["v2"] * 4
    eventually(lambda: sorted((a["port"], a["version"]) for a in cluster.announced()) == [
        (port + i, release["version"]) for i in range(4)], timeout=10,
        what="4 announcements of v2")

    with Sampler(lambda: sum(b is not None for b in cluster.serving(port))) as sampler:
        broken = cluster.shipmate("deploy", "web", "--image", BROKEN)
    assert broken.returncode == 1, broken.stdout
    assert "deploy of web rolled back" in broken.stderr
    assert "exited before passing its health check (GET /)" in broken.stderr
    assert min(sampler.samples) >= 3, sampler.samples
    release = cluster.wait_settled()
    assert release["image"] == V2 and release["deploy"]["result"] == "rolled-back"
    assert cluster.serving(port) == ["v2"] * 4


def test_agent_killed_mid_batch_the_next_agent_finishes(make_cluster):
    port = port_block(3)
    cluster = make_cluster(count=3, port=port, deploy=ROLLING)
    agent = cluster.start_agent()
    old = cluster.wait_settled(what="3 instances of v1")
    killer = kill_at(cluster, agent, lambda j: (j.get("progress") or {}).get("done") == 1)

    with Sampler(lambda: (sum(b is not None for b in cluster.serving(port)),
                          len(cluster.running()))) as sampler:
        cluster.request(V2)
        journal = killer.wait()
        assert journal["phase"] == "running"
        assert cluster.journal()["phase"] == "running"  # the dead agent left it for the next
        cluster.start_agent()
        release = cluster.wait_settled(timeout=40, what="3 instances of v2")
    assert release["image"] == V2 and release["previous"]["version"] == old["version"]
    assert cluster.serving(port) == ["v2"] * 3
    serving = [s for s, _ in sampler.samples]
    assert min(serving) >= 2, serving  # batch 1, stop-first: count - 1, even while no agent ran
    assert max(n for _, n in sampler.samples) <= 3  # never a duplicate of a slot


def test_agent_killed_while_rolling_back_the_next_agent_completes_the_rollback(make_cluster):
    port = port_block(2)
    cluster = make_cluster(count=2, port=port, deploy=ROLLING)
    agent = cluster.start_agent()
    old = cluster.wait_settled(what="2 instances of v1")
    killer = kill_at(cluster, agent, lambda j: j.get("phase") == "rolling-back")

    with Sampler(lambda: sum(b is not None for b in cluster.serving(port))) as sampler:
        cluster.request(BROKEN)
        journal = killer.wait()
        assert "exited before passing its health check" in journal["error"]
        cluster.start_agent()
        release = cluster.wait_settled(timeout=40, what="2 instances of v1 again")
    assert release["version"] == old["version"]
    assert release["deploy"]["result"] == "rolled-back"
    assert "exited before passing its health check (GET /)" in release["deploy"]["reason"]
    assert cluster.serving(port) == ["v1"] * 2
    assert min(sampler.samples) >= 1, sampler.samples
