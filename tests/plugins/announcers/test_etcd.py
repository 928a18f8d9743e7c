"""The etcd announcer against a real etcd (v3 and v2 APIs), alone and in the running agent."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import Context, Instance
from agent.config import ConfigError, StoreConfig
from agent.store import Store, open_store
from agent.store.embedded import EmbeddedStore
from plugins.announcers.etcd import EtcdAnnounceConfig, EtcdAnnouncer
from tests.helpers import eventually, port_block
from tests.services import Dockerd, Etcd

BACKENDS = ["etcd", "etcd2"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, etcd: Etcd) -> Iterator[Store]:
    """The agent's store on the real etcd, through the v3 (``etcd``) or v2 (``etcd2``) API."""
    store = open_store(StoreConfig(backend=request.param, endpoints=[etcd.endpoint],
                                   timeout=1.0))
    yield store
    store.close()


@pytest.fixture
def cluster() -> str:
    return f"a{uuid.uuid4().hex[:8]}"


@pytest.fixture
def announcer(store: Store, cluster: str, tmp_path: Path
              ) -> Iterator[Callable[..., EtcdAnnouncer]]:
    """``announcer(**config)``: an etcd announcer on ``store``, closed after the test."""
    made: list[EtcdAnnouncer] = []

    def make(**config: Any) -> EtcdAnnouncer:
        config.setdefault("key", f"/{cluster}/services/{{service}}/{{instance}}")
        made.append(EtcdAnnouncer(EtcdAnnounceConfig(**config),
                                  Context(cluster=cluster, store=store, state_dir=tmp_path)))
        return made[-1]

    yield make
    for one in made:
        one.close()
        for key in store.get_prefix(f"/{cluster}/"):
            store.delete(key)


def instance(cluster: str, slot: int, service: str = "web", host: str = "127.0.0.1",
             port: int | None = None) -> Instance:
    return Instance(name=f"{cluster}-{service}-{slot}-0123abcd", service=service, slot=slot,
                    version="0123abcd", host=host, port=port or 8000 + slot, cluster=cluster)


def announced(store: Store, prefix: str) -> dict[str, str]:
    return {key: entry.value for key, entry in store.get_prefix(prefix).items()}


# ---------------------------------------------------------------- the store alone


def test_sync_writes_healthy_removes_stale_and_rewrites_missing(store, cluster, announcer):
    ann = announcer()
    prefix = f"/{cluster}/services/web/"
    web0, web1 = instance(cluster, 0), instance(cluster, 1)
    ann.sync({"web": [web0, web1]})
    assert announced(store, prefix) == {
        prefix + web0.name: json.dumps({"host": "127.0.0.1", "port": 8000, "service": "web",
                                        "instance": web0.name, "version": "0123abcd"}),
        prefix + web1.name: json.dumps({"host": "127.0.0.1", "port": 8001, "service": "web",
                                        "instance": web1.name, "version": "0123abcd"})}

    store.delete(prefix + web1.name)  # an operator deletes one
    stale = prefix + f"{cluster}-web-7-0123abcd"  # an instance that no longer runs
    foreign = prefix + "other-web-0-0123abcd"  # another cluster's, same prefix
    by_hand = prefix + "manual"  # not an instance name at all
    for key in (stale, foreign, by_hand):
        store.put(key, "10.0.0.9:80")
    ann.sync({"web": [web0, web1]})
    assert set(announced(store, prefix)) == {prefix + web0.name, prefix + web1.name, foreign,
                                             by_hand}

    ann.sync({"web": [web1]})  # web0 became unhealthy
    assert set(announced(store, prefix)) == {prefix + web1.name, foreign, by_hand}
    ann.withdraw(web1)  # before web1 is stopped
    assert set(announced(store, prefix)) == {foreign, by_hand}


def test_formats_and_addresses(store, cluster, announcer, monkeypatch):
    monkeypatch.delenv("COREOS_PRIVATE_IPV4", raising=False)
    local, routed = instance(cluster, 0), instance(cluster, 1, host="10.213.0.7", port=9000)
    hostport = announcer(format="hostport", key=f"/{cluster}/hp/{{instance}}")
    skydns = announcer(format="skydns", key=f"/{cluster}/skydns/{{service}}/{{instance}}")
    fixed = announcer(host="10.0.0.42", key=f"/{cluster}/fixed/{{instance}}", format="hostport")
    for one in (hostport, skydns, fixed):
        one.sync({"web": [local, routed]})
    assert announced(store, f"/{cluster}/hp/") == {
        f"/{cluster}/hp/{local.name}": "127.0.0.1:8000",
        f"/{cluster}/hp/{routed.name}": "10.213.0.7:9000"}
    assert json.loads(store.get(f"/{cluster}/skydns/web/{local.name}").value) == {
        "host": "127.0.0.1", "port": 8000}
    assert set(announced(store, f"/{cluster}/fixed/").values()) == {
        "10.0.0.42:8000", "10.0.0.42:9000"}

    monkeypatch.setenv("COREOS_PRIVATE_IPV4", "10.0.0.5")  # a loopback address is not announced
    hostport.sync({"web": [local, routed]})
    assert announced(store, f"/{cluster}/hp/") == {
        f"/{cluster}/hp/{local.name}": "10.0.0.5:8000",
        f"/{cluster}/hp/{routed.name}": "10.213.0.7:9000"}


def test_keys_stay_while_refreshed_and_vanish_a_ttl_after_the_agent_is_gone(
        store, cluster, announcer):
    ann = announcer(ttl="2s")
    web0 = instance(cluster, 0)
    key = ann.key(web0)
    ann.sync({"web": [web0]})
    time.sleep(3.5)  # almost two ttls: kept alive in the background
    assert store.get(key) is not None
    ann.close()  # the agent is gone; nobody refreshes
    eventually(lambda: store.get(key) is None, timeout=4, what="the key expires")


def test_a_store_outage_is_survived_and_keys_come_back_within_a_ttl(
        store, cluster, announcer, etcd, caplog):
    caplog.set_level(logging.WARNING)
    ann = announcer(ttl="2s")
    web = [instance(cluster, 0), instance(cluster, 1)]
    keys = {ann.key(i) for i in web}
    ann.sync({"web": web})
    etcd.stop()
    try:
        time.sleep(4)  # two ttls: the lease (v3) or the keys' TTLs (v2) run out
    finally:
        etcd.start()
    back = time.monotonic()
    eventually(lambda: set(announced(store, f"/{cluster}/services/web/")) == keys, timeout=2.5,
               what="every key announced again within a ttl, with no pass")
    assert "announcements:" in caplog.text  # the outage was reported, not raised
    time.sleep(max(0.0, back + 3 - time.monotonic()))  # past a ttl: on a live lease now
    assert set(announced(store, f"/{cluster}/services/web/")) == keys


# ---------------------------------------------------------------- through the agent

AGENT = """
agent:
  cluster: {cluster}
  interval: 2s
  store: {{backend: {backend}, endpoints: ["{endpoint}"], timeout: 1s}}
  state_dir: {tmp}/state
services:
  web:
    image: {image}
    command: {command}
    port: {port}
    env: {env}
    health: {{http: {health}, timeout: 1s}}
    source: {{type: static, count: 3, interval: 1s}}
    actuator: {{type: docker, host: "{host}", init: true, volumes: ["{tmp}:/state"]}}
    announce: {{type: etcd, ttl: {ttl}}}
"""
HTTPD = '[httpd, -f, -p, "{port}", -h, /www]'


def agent_yaml(etcd: Etcd, dockerd: Dockerd, cluster: str, tmp: Path, *, port: int,
               backend: str = "etcd", ttl: str = "5s", health: str = "/",
               command: str = HTTPD, env: str = "{}") -> str:
    return AGENT.format(cluster=cluster, backend=backend, endpoint=etcd.endpoint, tmp=tmp,
                        image=Dockerd.WEB_V1, command=command, port=port, env=env,
                        health=health, host=dockerd.host, ttl=ttl)


@pytest.fixture
def docker_cluster(dockerd: Dockerd, etcd: Etcd, cluster: str) -> Iterator[str]:
    """``cluster``, whose containers and store keys are removed after the test."""
    yield cluster
    api = dockerd.client().api
    for row in api.containers(all=True, filters={"label": f"shipmate.cluster={cluster}"}):
        api.remove_container(row["Id"], force=True)
    etcd.etcdctl("del", "--prefix", f"/shipmate/{cluster}/")
    etcd.etcdctl("del", "--prefix", f"/services/web/{cluster}-")


def running(dockerd: Dockerd, cluster: str) -> dict[str, int]:
    """Running containers of ``cluster``: id -> slot."""
    rows = dockerd.client().api.containers(filters={"label": f"shipmate.cluster={cluster}"})
    return {r["Id"]: int(r["Labels"]["shipmate.slot"]) for r in rows}


def every_container(dockerd: Dockerd, cluster: str) -> list[dict[str, Any]]:
    return dockerd.client().api.containers(
        all=True, filters={"label": f"shipmate.cluster={cluster}"})


def keys_v3(etcd: Etcd, cluster: str) -> dict[str, dict[str, Any]]:
    """The announcements of ``cluster``'s web instances, as etcdctl shows them."""
    lines = etcd.etcdctl("get", "--prefix", f"/services/web/{cluster}-").splitlines()
    return {k: json.loads(v) for k, v in zip(lines[::2], lines[1::2], strict=True)}


def expected(cluster: str, base: int, slots: range) -> dict[int, tuple[str, int]]:
    return {slot: ("127.0.0.1", base + slot) for slot in slots}


def announced_slots(etcd: Etcd, cluster: str) -> dict[int, tuple[str, int]]:
    out = {}
    for key, value in keys_v3(etcd, cluster).items():
        slot = int(key.rsplit("-", 2)[1])
        assert key == f"/services/web/{value['instance']}"
        out[slot] = (value["host"], value["port"])
    return out


def test_three_containers_three_keys_and_the_override(dockerd, busybox_images, etcd,
                                                      docker_cluster, run_agent, tmp_path):
    cluster, base = docker_cluster, port_block(3)
    run_agent(agent_yaml(etcd, dockerd, cluster, tmp_path, port=base))
    eventually(lambda: len(running(dockerd, cluster)) == 3
               and announced_slots(etcd, cluster) == expected(cluster, base, range(3)),
               timeout=15, what="3 containers and 3 keys with the right host:port")

    override = f"/shipmate/{cluster}/services/web/override"
    etcd.etcdctl("put", override, "1")
    eventually(lambda: len(running(dockerd, cluster)) == 1
               and announced_slots(etcd, cluster) == expected(cluster, base, range(1)),
               timeout=5, what="1 container and 1 key within 5 s")
    etcd.etcdctl("del", override)  # back to the source's count
    eventually(lambda: len(running(dockerd, cluster)) == 3
               and announced_slots(etcd, cluster) == expected(cluster, base, range(3)),
               timeout=10, what="3 containers and 3 keys again")


# A web server that, when told to stop, first records whether its announcement is
# still in etcd (v2 API: a GET of the key; v3 API: a range request), then exits.
STOP_PROBE = r"""
lookup() {
  if [ "$API" = etcd2 ]; then
    wget -q -O /dev/null "http://127.0.0.1:$ETCD/v2/keys/services/web/$NAME"
  else
    key=$(printf %s "/services/web/$NAME" | busybox base64)
    wget -q -O - --post-data "{\"key\":\"$key\"}" "http://127.0.0.1:$ETCD/v3/kv/range" \
      | busybox grep -q '"kvs"'
  fi
}
stopping() {
  if ! wget -q -O /dev/null "http://127.0.0.1:$ETCD/version"; then echo no-etcd
  elif lookup; then echo announced
  else echo withdrawn; fi > "/state/$NAME"
  kill "$pid"; exit 0
}
trap stopping TERM
httpd -f -p "$1" -h /www & pid=$!
wait
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_announced_after_health_passes_and_withdrawn_before_the_stop(
        backend, dockerd, busybox_images, etcd, docker_cluster, run_agent, tmp_path):
    cluster, base = docker_cluster, port_block(3)
    store = open_store(StoreConfig(backend=backend, endpoints=[etcd.endpoint]))
    (tmp_path / "stop-probe.sh").write_text(STOP_PROBE)
    agent = run_agent(agent_yaml(
        etcd, dockerd, cluster, tmp_path, port=base, backend=backend, health="/ready",
        command='[sh, /state/stop-probe.sh, "{port}"]',
        env=f'{{NAME: "{{instance}}", ETCD: "{etcd.port}", API: {backend}}}'))

    def keys() -> set[str]:
        return set(store.get_prefix(f"/services/web/{cluster}-"))

    eventually(lambda: len(running(dockerd, cluster)) == 3, timeout=15, what="3 containers")
    passes = agent.metrics.passes._value.get()
    eventually(lambda: agent.metrics.passes._value.get() >= passes + 2, timeout=5,
               what="two more passes")
    assert keys() == set()  # running, but /ready does not answer yet: not announced
    api = dockerd.client().api
    for container in running(dockerd, cluster):
        api.exec_start(api.exec_create(container, ["sh", "-c", "echo ok > /www/ready"]))
    eventually(lambda: len(keys()) == 3, timeout=5, what="3 keys once healthy")

    store.put(f"/shipmate/{cluster}/services/web/override", "1")
    eventually(lambda: len(running(dockerd, cluster)) == 1 and len(keys()) == 1, timeout=10,
               what="scaled down to 1")
    stopped = [p for p in tmp_path.iterdir() if p.name.startswith(f"{cluster}-web-")]
    assert sorted(p.read_text().strip() for p in stopped) == ["withdrawn", "withdrawn"]
    # the probe can tell: stopped behind the agent's back, the last one is still announced
    (last,) = running(dockerd, cluster)
    name = api.inspect_container(last)["Name"].lstrip("/")
    api.stop(last, timeout=5)
    eventually(lambda: (tmp_path / name).exists(), timeout=5, what="the probe's answer")
    assert (tmp_path / name).read_text().strip() == "announced"
    store.close()


def test_agent_killed_then_restarted_repairs_containers_and_keys(
        dockerd, busybox_images, etcd, docker_cluster, tmp_path, write_config):
    cluster, base = docker_cluster, port_block(3)
    path = write_config(agent_yaml(etcd, dockerd, cluster, tmp_path, port=base))
    log = tmp_path / "agent.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)],
                                    stdout=out, stderr=subprocess.STDOUT)

    agent = start()
    try:
        eventually(lambda: len(running(dockerd, cluster)) == 3
                   and announced_slots(etcd, cluster) == expected(cluster, base, range(3)),
                   timeout=20, what="3 containers and 3 keys")
        agent.send_signal(signal.SIGKILL)
        agent.wait()

        api = dockerd.client().api
        by_slot = {slot: cid for cid, slot in running(dockerd, cluster).items()}
        api.remove_container(by_slot[1], force=True)  # one container removed by hand
        gone = next(k for k, v in keys_v3(etcd, cluster).items() if v["port"] == base + 2)
        etcd.etcdctl("del", gone)  # one key deleted
        stale = f"/services/web/{cluster}-web-5-0123abcd"
        etcd.etcdctl("put", stale, '{"host": "127.0.0.1", "port": 1}')  # a stale key

        agent = start()
        seen_containers = []

        def repaired() -> bool:
            seen_containers.append(len(every_container(dockerd, cluster)))
            return (len(running(dockerd, cluster)) == 3
                    and announced_slots(etcd, cluster) == expected(cluster, base, range(3)))

        eventually(repaired, timeout=20, what="3 containers and 3 correct keys again")
        assert max(seen_containers) <= 3  # never a duplicate
        now = running(dockerd, cluster)
        assert by_slot[0] in now and by_slot[2] in now  # the survivors were adopted
        assert stale not in keys_v3(etcd, cluster)
        time.sleep(2.5)  # a pass later: still exactly 3
        assert len(every_container(dockerd, cluster)) == 3
        assert announced_slots(etcd, cluster) == expected(cluster, base, range(3))
    finally:
        agent.kill()
        agent.wait()


def test_etcd_outage_stops_nothing_and_everything_is_announced_again(
        dockerd, busybox_images, etcd, docker_cluster, run_agent, tmp_path, caplog):
    cluster, base = docker_cluster, port_block(3)
    caplog.set_level(logging.WARNING)
    run_agent(agent_yaml(etcd, dockerd, cluster, tmp_path, port=base, ttl="5s"))
    eventually(lambda: len(running(dockerd, cluster)) == 3
               and len(announced_slots(etcd, cluster)) == 3, timeout=15,
               what="3 containers and 3 keys")
    before = running(dockerd, cluster)
    etcd.stop()
    try:
        deadline = time.monotonic() + 15  # three ttls without etcd
        while time.monotonic() < deadline:
            assert running(dockerd, cluster) == before, "a container changed without etcd"
            time.sleep(0.5)
    finally:
        etcd.start()
    eventually(lambda: announced_slots(etcd, cluster) == expected(cluster, base, range(3)),
               timeout=5, what="every instance announced again within one ttl")
    assert running(dockerd, cluster) == before
    assert "store unreachable, changing nothing" in caplog.text
    # and the agent leads and acts again (it campaigns every 5 s while it does not lead)
    etcd.etcdctl("put", f"/shipmate/{cluster}/services/web/override", "2")
    eventually(lambda: len(running(dockerd, cluster)) == 2, timeout=8, what="scale to 2")


@pytest.fixture
def lone(embedded_store, tmp_path) -> Iterator[EtcdAnnouncer]:
    """An etcd announcer (ttl 2 s) on the embedded store, for the bookkeeping alone."""
    announcer = EtcdAnnouncer(EtcdAnnounceConfig(ttl="2s"),
                              Context("t", embedded_store, tmp_path))
    yield announcer
    announcer.close()


def web_instance(slot: int = 0, version: str = "abc") -> Instance:
    return Instance(name=f"t-web-{slot}-{version}", service="web", slot=slot, version=version,
                    host="10.0.0.5", port=8080 + slot, cluster="t")


def test_a_pass_that_looked_before_a_withdrawal_does_not_announce_again(embedded_store, lone):
    web = web_instance()
    key = "/services/web/t-web-0-abc"
    lone.sync({"web": [web]})
    assert embedded_store.get(key) is not None
    lone.withdraw(web)  # a deploy withdraws it, then stops it...
    lone.sync({"web": [web]})  # ...while a pass that saw it healthy syncs
    assert embedded_store.get(key) is None
    lone.stopped(web, gone=True)
    lone.sync({"web": [web]})  # a pass that looked before the stop ended
    assert embedded_store.get(key) is None
    lone.sync({"web": []})  # it is gone: a later instance of that name may come back
    lone.sync({"web": [web]})
    assert embedded_store.get(key) is not None


def test_a_withdrawal_holds_however_long_the_stop_takes(embedded_store, lone):
    web = web_instance()
    key = "/services/web/t-web-0-abc"
    lone.sync({"web": [web]})
    lone.withdraw(web)
    deadline = time.monotonic() + 5  # more than two ttls (2 s) of a stop still under way
    while time.monotonic() < deadline:
        lone.sync({"web": [web]})  # still running and healthy while it stops
        lone.sync({"web": []})  # a pass in which its health check happened to fail
        assert embedded_store.get(key) is None, "announced again while it was being stopped"
        time.sleep(0.2)
    lone.stopped(web, gone=True)
    lone.sync({"web": []})
    lone.sync({"web": [web]})  # a new instance of that name
    assert embedded_store.get(key) is not None


def test_a_failed_stop_ends_the_withdrawal(embedded_store, lone):
    web = web_instance()
    lone.sync({"web": [web]})
    lone.withdraw(web)
    lone.stopped(web, gone=False)  # it still runs and serves: announced by the next pass
    lone.sync({"web": [web]})
    assert embedded_store.get("/services/web/t-web-0-abc") is not None


def test_announce_now_outlives_a_pass_that_looked_earlier(embedded_store, lone):
    old, new = web_instance(0, "abc"), web_instance(1, "def")
    lone.sync({"web": [old]})
    lone.announce(new)  # a deploy saw it pass its check
    assert embedded_store.get("/services/web/t-web-1-def").value == json.dumps(
        {"host": "10.0.0.5", "port": 8081, "service": "web", "instance": new.name,
         "version": "def"})
    lone.sync({"web": [old]})  # a pass that looked before it passed
    assert embedded_store.get("/services/web/t-web-1-def") is not None
    lone.sync({"web": [old, new]})  # a pass saw it: from now on the passes decide
    lone.sync({"web": [old]})
    assert embedded_store.get("/services/web/t-web-1-def") is None
    lone.withdraw(old)
    lone.announce(old)  # started again and passed: the withdrawal ends
    assert embedded_store.get("/services/web/t-web-0-abc") is not None


def test_announced_but_never_seen_by_a_pass_goes_after_a_ttl(embedded_store, lone):
    new = web_instance(1, "def")
    lone.announce(new)  # then it died before any pass saw it healthy
    lone.sync({"web": []})
    assert embedded_store.get("/services/web/t-web-1-def") is not None

    def gone() -> bool:  # once its ttl (2 s) has passed, a pass removes it
        lone.sync({"web": []})
        return embedded_store.get("/services/web/t-web-1-def") is None

    eventually(gone, timeout=15, what="the never-seen announcement removed after its ttl")


def test_a_pass_writes_the_new_keys_before_it_deletes_the_stale(embedded_store, lone):
    old, new = web_instance(0, "abc"), web_instance(1, "def")
    lone.sync({"web": [old]})
    events: list[tuple[str, bool]] = []
    watch = embedded_store.watch("/services/web/", lambda got: events.extend(
        (e.key.rsplit("/", 1)[-1], e.value is not None) for e in got))
    try:
        lone.sync({"web": [new]})
        eventually(lambda: len(events) == 2, timeout=10, what="two changes")
    finally:
        watch.cancel()
    assert events == [(new.name, True), (old.name, False)]  # never an empty set between


def test_drain_is_an_announce_key_with_a_2s_default(load_test_config):
    base = """
        agent: {cluster: t}
        services:
          web:
            command: [sleep, "100"]
            source: {type: static, count: 1}
            actuator: {type: process}
            announce: %s
    """
    assert load_test_config(base % "{type: etcd}").services["web"].announce.drain == 2.0
    assert load_test_config(base % "{type: etcd, drain: 0}").services["web"].announce.drain == 0
    with pytest.raises(ConfigError, match="drain"):
        load_test_config(base % "{type: etcd, drain: -1s}")


class SlowPuts(EmbeddedStore):
    """The embedded store with a slow network in front of its puts (a big first sync)."""

    delay = 0.0
    puts = 0

    def put(self, key: str, value: str, **kwargs: Any) -> int:
        time.sleep(self.delay)
        self.puts += 1
        return super().put(key, value, **kwargs)


def test_a_long_sync_starves_neither_the_lease_nor_a_withdrawal(tmp_path, monkeypatch):
    store = SlowPuts(tmp_path / "slow.db")
    ann = EtcdAnnouncer(EtcdAnnounceConfig(ttl="2s"), Context("t", store, tmp_path))
    try:
        web = [web_instance(slot) for slot in range(300)]
        store.delay = 0.01  # 300 puts: 3 s and more, past the 2 s lease
        done = threading.Event()
        began = time.monotonic()
        threading.Thread(target=lambda: (ann.sync({"web": web}), done.set()),
                         daemon=True).start()
        first, last = "/services/web/t-web-0-abc", "/services/web/t-web-299-abc"
        eventually(lambda: store.get(first), 10, "the first key")
        asked = time.monotonic()
        ann.withdraw(web[299])  # its stop begins meanwhile: it waits for no sync
        assert time.monotonic() - asked < 1.0
        while not done.is_set():
            assert store.get(first) is not None, "the lease ran out during the sync"
            time.sleep(0.1)
        assert time.monotonic() - began > 2.5  # the sync did outlast the lease's ttl
        keys = set(store.get_prefix("/services/web/"))
        assert len(keys) == 299 and last not in keys

        # an unchanged service costs nothing: no put, and no value is built again
        built = []
        value = EtcdAnnouncer.value
        monkeypatch.setattr(EtcdAnnouncer, "value",
                            lambda self, i: built.append(i) or value(self, i))
        store.puts = 0
        ann.sync({"web": web})
        assert store.puts == 0 and built == []
        assert len(store.get_prefix("/services/web/")) == 299
    finally:
        ann.close()
        store.close()
