"""The fleet actuator against a stand-in fleetd (tests/fleet_server.py, see FLEET_API.md).

The stand-in runs a real fleetd's timings scaled down (``time_scale=FAST``:
scheduling, lingering states, etcd's grace and recovery) and launches units
after ``launch_delay`` (0.3 s here instead of 3.5 s); a test that needs a
behaviour to last sets the server's ``timings`` (an activation systemd is slow
at, states lost for longer than the test), so that the suite stays fast.
Health checks reach real HTTP servers bound to the fake machines' primary IPs
(127.0.0.1-3).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import Context, InstanceSpec
from agent.config import ConfigError, HealthConfig, load_config
from agent.keys import Keys
from agent.runtime import Agent
from plugins.actuators.fleet import FleetActuator, FleetAPI, FleetConfig, FleetError, parse_unit
from tests.fleet_server import ETCD_MESSAGE, FleetServer, machine_id
from tests.helpers import eventually, port_block

M1, M2, M3 = machine_id(1), machine_id(2), machine_id(3)
FAST = 0.05  # the stand-in's timings: a twentieth of a real fleetd's
IPS = {M1: "127.0.0.1", M2: "127.0.0.2", M3: "127.0.0.3"}
UNIT = """\
[Unit]
Description=web {slot} of {service}
After=docker.service
After=network-online.target

[Service]
# the container, one per slot
ExecStartPre=-/usr/bin/docker rm -f {instance}
ExecStart=/usr/bin/docker run --rm --name {instance} \\
    -p {port}:8080 {image}
ExecStop=/usr/bin/docker stop {instance}

[X-Fleet]
Conflicts=fl-web-*
"""


@pytest.fixture
def fleet(tmp_path) -> Iterator[FleetServer]:
    with FleetServer(time_scale=FAST, launch_delay=0.3,
                     unix_socket=tmp_path / "fleet.sock") as server:
        yield server


def make(fleet: FleetServer, store, tmp_path, *, endpoint: str | None = None,
         unit: str = UNIT, cluster: str = "fl", **extra) -> FleetActuator:
    config = FleetConfig.model_validate({"endpoint": endpoint or fleet.endpoint, "unit": unit,
                                         "poll": 0.05, "launch_timeout": 5, **extra})
    return FleetActuator(config, Context(cluster, store, tmp_path))


@pytest.fixture
def actuator(fleet, embedded_store, tmp_path) -> FleetActuator:
    return make(fleet, embedded_store, tmp_path)


def spec(slot: int, port: int | None = 18000, version: str = "v1", service: str = "web",
         env: dict[str, str] | None = None, cluster: str = "fl") -> InstanceSpec:
    return InstanceSpec(cluster=cluster, service=service, slot=slot, version=version,
                        name=f"{cluster}-{service}-{slot}-{version}",
                        port=None if port is None else port + slot,
                        image="registry.example/web:1.4", env=env or {})


@contextlib.contextmanager
def http_servers(ips: list[str], ports: list[int]) -> Iterator[None]:
    """Real HTTP servers answering 200 on every ip:port (the "containers" of the units)."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    servers = [http.server.ThreadingHTTPServer((ip, port), Ok) for ip in ips for port in ports]
    for server in servers:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
    try:
        yield
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


# ---------------------------------------------------------------- the unit text


def test_unit_text_becomes_fleets_options_in_order():
    options = parse_unit(UNIT)
    assert options == [
        ("Unit", "Description", "web {slot} of {service}"),
        ("Unit", "After", "docker.service"),
        ("Unit", "After", "network-online.target"),  # repeated keys kept, in order
        ("Service", "ExecStartPre", "-/usr/bin/docker rm -f {instance}"),
        ("Service", "ExecStart",
         "/usr/bin/docker run --rm --name {instance} -p {port}:8080 {image}"),  # continuation
        ("Service", "ExecStop", "/usr/bin/docker stop {instance}"),
        ("X-Fleet", "Conflicts", "fl-web-*"),
    ]


def test_start_sends_the_filled_in_unit_and_waits_for_launched(fleet, actuator):
    started = time.monotonic()
    instance = actuator.start(spec(0, env={"GREETING": 'say "hi" 100%'}))
    assert time.monotonic() - started >= 0.3  # fleet's launch delay
    assert (instance.name, instance.slot, instance.port, instance.host) == (
        "fl-web-0-v1", 0, 18000, "127.0.0.1")
    assert instance.running and instance.ref.active
    unit = fleet.get("/units/fl-web-0-v1.service")
    assert (unit["desiredState"], unit["currentState"], unit["machineID"]) == (
        "launched", "launched", M1)
    options = [(o["section"], o["name"], o.get("value", "")) for o in unit["options"]]
    assert ("Service", "ExecStart", "/usr/bin/docker run --rm --name fl-web-0-v1 "
            "-p 18000:8080 registry.example/web:1.4") in options
    assert ("Unit", "Description", "web 0 of web") in options
    assert ("Service", "Environment", '"GREETING=say \\"hi\\" 100%%"') in options
    assert [o for o in options if o[0] == "X-Shipmate"] == [
        ("X-Shipmate", "Cluster", "fl"), ("X-Shipmate", "Service", "web"),
        ("X-Shipmate", "Version", "v1"), ("X-Shipmate", "Slot", "0"),
        ("X-Shipmate", "Port", "18000")]
    (state,) = fleet.get("/state?unitName=fl-web-0-v1.service")["states"]
    assert state["systemdActiveState"] == "active"


def test_list_maps_this_clusters_units_to_instances(fleet, actuator, embedded_store, tmp_path):
    for slot in range(3):
        actuator.start(spec(slot))
    # a foreign unit and another cluster's unit are never reported
    fleet.api("PUT", "/fleet/v1/units/other.service", {"desiredState": "launched", "options": [
        {"section": "Service", "name": "ExecStart", "value": "/bin/sleep 1d"}]})
    make(fleet, embedded_store, tmp_path, cluster="elsewhere",
         unit="[Service]\nExecStart=/bin/x\n").start(spec(0, cluster="elsewhere"))
    assert len(fleet.all_units()) == 5
    listed = sorted(actuator.list(), key=lambda i: i.slot)
    assert [(i.name, i.service, i.slot, i.version, i.port, i.running, i.cluster)
            for i in listed] == [(f"fl-web-{n}-v1", "web", n, "v1", 18000 + n, True, "fl")
                                 for n in range(3)]
    hosts = {u["name"]: IPS[u["machineID"]] for u in fleet.all_units() if "machineID" in u}
    assert [i.host for i in listed] == [hosts[f"fl-web-{n}-v1.service"] for n in range(3)]
    assert len({i.host for i in listed}) == 3  # Conflicts=fl-web-* spread them


def test_list_follows_every_page_including_an_empty_last_one(embedded_store, tmp_path):
    with FleetServer(time_scale=0, token_limit=2) as fleet:
        actuator = make(fleet, embedded_store, tmp_path, unit="[Service]\nExecStart=/bin/x\n")
        for slot in range(4):  # 4 units, 4 states, 3 machines: two exact multiples of 2
            actuator.start(spec(slot))
        fleet.requests.clear()
        assert sorted(i.slot for i in actuator.list()) == [0, 1, 2, 3]
        pages = [target for method, target in fleet.requests if "/units" in target]
        assert pages == ["/fleet/v1/units", "/fleet/v1/units?nextPageToken=AgACAA%3D%3D",
                         "/fleet/v1/units?nextPageToken=AgADAA%3D%3D"]
        assert all(i.host for i in actuator.list())


def test_stop_sets_inactive_then_deletes(fleet, actuator):
    instance = actuator.start(spec(0))
    fleet.requests.clear()
    actuator.stop(instance, grace=5)
    assert fleet.get("/units") == {} and fleet.get("/state") == {}
    methods = [m for m, _ in fleet.requests if m != "GET"]
    assert methods == ["PUT", "DELETE"]
    actuator.stop(instance, grace=1)  # already gone: nothing to do, no error


def test_a_failed_unit_is_listed_as_not_running(fleet, actuator):
    actuator.start(spec(0))
    fleet.fail("fl-web-0-v1.service")
    (listed,) = actuator.list()
    assert not listed.running and not listed.ref.active
    assert listed.ref.systemd == "loaded/failed/failed"


def test_a_unit_on_its_way_counts_as_running_but_not_healthy(fleet, actuator):
    fleet.timings.launch_delay = 60
    with pytest.raises(FleetError):
        make(fleet, actuator.context.store, actuator.context.state_dir,
             launch_timeout=0.2).start(spec(0))
    (listed,) = actuator.list()
    assert listed.running and not listed.ref.active  # the loop must not kill a launch
    assert not actuator.healthy(listed, None)


def test_launched_while_systemd_still_starts_it_is_not_an_exited_unit(fleet, actuator):
    fleet.timings.activation_delay = 3  # a loaded machine: systemd is slow to start it
    actuator._set("fl-web-0-v1.service", "launched", actuator.options(spec(0)))
    readings: list[tuple[str | None, str, bool, bool]] = []

    def active() -> bool:
        (listed,) = actuator.list() or [None]
        if listed is None:
            return False
        readings.append((listed.ref.current, listed.ref.systemd, listed.running,
                         actuator.healthy(listed, None)))
        return listed.ref.active

    eventually(active, timeout=30, what="systemd done starting it")
    starting = [r for r in readings if r[0] == "launched" and r[1] != "loaded/active/running"]
    assert {systemd for _, systemd, _, _ in starting} == {
        "loaded/inactive/dead", "loaded/activating/start"}  # the transitional states, in turn
    # not exited meanwhile (no restart, no crash loop), and not healthy before it is active
    assert all(running and not healthy for _, _, running, healthy in starting), readings


def test_a_launched_unit_inactive_for_longer_than_launch_timeout_has_exited(fleet, actuator):
    fleet.timings.activation_delay = 60
    impatient = make(fleet, actuator.context.store, actuator.context.state_dir,
                     launch_timeout=0.5)
    with pytest.raises(FleetError, match="not launched and active within 0.5s"):
        impatient.start(spec(0))
    impatient.list()  # the agent sees it inactive from now on
    eventually(lambda: not impatient.list()[0].running, timeout=30,
               what="inactive for longer than launch_timeout")


def test_a_unit_that_was_active_and_exits_is_not_running(fleet, actuator):
    actuator.start(spec(0))
    assert actuator.list()[0].running
    fleet.exit("fl-web-0-v1.service")
    (listed,) = actuator.list()
    assert (listed.ref.current, listed.ref.systemd) == ("launched", "loaded/inactive/dead")
    assert not listed.running  # its process ended: the loop replaces it
    actuator.stop(listed, grace=5)
    actuator.start(spec(0))  # the same unit started again begins afresh
    assert actuator.list()[0].running


def test_lost_states_keep_the_last_one_seen_for_state_memory(fleet, actuator, caplog):
    forgetful = make(fleet, actuator.context.store, actuator.context.state_dir,
                     state_memory=0.5)
    for slot in range(2):
        actuator.start(spec(slot))
    before = {i.name: i.host for i in actuator.list()}
    forgetful.list()
    fleet.timings.state_loss = 120  # a real fleetd: about 24 s
    fleet.restart_etcd()
    assert fleet.all_states() == [] and len(fleet.all_units()) == 2
    listed = actuator.list()
    assert {i.name: i.host for i in listed} == before
    assert all(i.running and i.ref.active and i.ref.remembered for i in listed)
    assert [i.ref.systemd for i in listed] == ["loaded/active/running"] * 2
    assert "fleet shows no state for unit fl-web-0-v1.service on machine" in caplog.text
    # past state_memory the state is unknown: still running (never replaced), not healthy
    eventually(lambda: not any(i.ref.active for i in forgetful.list()), timeout=30,
               what="the remembered states forgotten")
    assert all(i.running and not forgetful.healthy(i, None) for i in forgetful.list())
    assert "its state is unknown, so it is not healthy" in caplog.text


def test_a_global_unit_keeps_its_machines_while_fleet_lost_their_states(fleet, embedded_store,
                                                                         tmp_path):
    actuator = make(fleet, embedded_store, tmp_path, unit=GLOBAL, **{"global": True})
    actuator.start(spec(0))
    assert [i.host for i in actuator.list()] == ["127.0.0.1", "127.0.0.2"]
    fleet.timings.state_loss = 120
    fleet.restart_etcd()
    listed = actuator.list()
    assert [(i.slot, i.host, i.running, i.ref.active) for i in listed] == [
        (0, "127.0.0.1", True, True), (1, "127.0.0.2", True, True)]


def test_start_fails_at_once_when_systemd_reports_failure(fleet, actuator):
    fleet.fail_on_launch("fl-web-*")
    started = time.monotonic()
    with pytest.raises(FleetError, match=r"unit fl-web-0-v1.service failed on machine "
                                         r"\w{8} \(127.0.0.1\): systemd says "
                                         r"loaded/failed/failed"):
        actuator.start(spec(0))
    assert time.monotonic() - started < 2


def test_start_times_out_saying_where_it_is_stuck(fleet, actuator, embedded_store, tmp_path):
    stuck = make(fleet, embedded_store, tmp_path, launch_timeout=0.5,
                 unit="[Service]\nExecStart=/bin/x\n[X-Fleet]\nMachineMetadata=role=gpu\n")
    with pytest.raises(FleetError, match=r"unit fl-web-0-v1.service was not launched and "
                                         r"active within 0.5s: not scheduled on any machine"):
        stuck.start(spec(0))


def test_desired_states_are_checked_before_anything_is_sent(fleet, actuator):
    fleet.requests.clear()
    with pytest.raises(ValueError, match="refusing to send desiredState 'running' for unit "
                                         "a.service: only inactive, loaded, launched"):
        actuator._set("a.service", "running")
    assert fleet.requests == []


def test_fleets_errors_become_clear_messages(fleet):
    api = FleetAPI(fleet.endpoint, timeout=2)
    body = {"desiredState": "launched",
            "options": [{"section": "Service", "name": "ExecStart", "value": "/bin/x"}]}
    with pytest.raises(FleetError, match=r'fleet rejected PUT unit bad \(400 Bad Request: '
                                         r'unit name must contain "."\)'):
        api.request("PUT", "/units/bad", body, what="unit bad")
    with pytest.raises(FleetError, match=r"fleet refused PUT unit a.service \(409 Conflict: "
                                         r"unit does not exist and options field empty\)"):
        api.request("PUT", "/units/a.service", {"desiredState": "launched"}, what="unit a.service")
    with pytest.raises(FleetError, match=r"fleet refused PUT unit a.service \(415 Unsupported "
                                         r"Media Type: expected 1 Content-Type, got 0\)"):
        api.request("PUT", "/units/a.service", None, what="unit a.service")
    with pytest.raises(FleetError, match=r"fleet has no unit a.service \(404: unit does not "
                                         r"exist\)") as err:
        api.request("DELETE", "/units/a.service", what="unit a.service")
    assert err.value.status == 404
    api.request("PUT", "/units/a.service", body)
    fleet.api("PUT", "/fleet/v1/units/a.service", {"desiredState": "bogus"})
    with pytest.raises(FleetError, match=r"failed GET unit a.service with 500 and no message"):
        api.request("GET", "/units/a.service", what="unit a.service")


def test_list_raises_while_fleet_has_no_etcd(fleet, actuator):
    actuator.start(spec(0))
    fleet.timings.etcd_grace = 0.3  # 500s for 0.3 s (a real fleetd: 15-25 s), then 503s
    fleet.set_etcd_down(True)
    with pytest.raises(FleetError, match="failed GET /machines with 500 and no message"):
        actuator.list()

    def listing_error() -> str:
        try:
            actuator.list()
        except FleetError as exc:
            return str(exc)
        return ""

    eventually(lambda: f"is unavailable (503: {ETCD_MESSAGE})" in listing_error(), timeout=30,
               what="503 once the grace is over")
    fleet.set_etcd_down(False)
    eventually(lambda: not listing_error(), timeout=30, what="fleet answering again")
    assert [i.name for i in actuator.list()] == ["fl-web-0-v1"]


def test_an_empty_reply_is_a_clear_error(fleet):
    api = FleetAPI(fleet.endpoint, timeout=2)
    with pytest.raises(FleetError, match=r"closed the connection without answering GET "
                                         r"/state/x.service"):
        api.request("GET", "/state/x.service")


def test_unreachable_fleet_and_credentials_stay_out_of_messages(fleet):
    port = port_block(1)
    api = FleetAPI(f"http://admin:s3cret@127.0.0.1:{port}", timeout=1)
    with pytest.raises(FleetError) as err:
        api.pages("/units", "units")
    assert f"cannot reach fleet at http://127.0.0.1:{port}" in str(err.value)
    assert "s3cret" not in str(err.value)


def test_the_unix_socket_endpoint(fleet, embedded_store, tmp_path):
    actuator = make(fleet, embedded_store, tmp_path, endpoint=fleet.unix_endpoint)
    instance = actuator.start(spec(0))
    assert [i.name for i in actuator.list()] == ["fl-web-0-v1"]
    actuator.stop(instance, grace=1)
    assert actuator.list() == []


def test_health_probes_the_machines_primary_ip(fleet, actuator):
    base = port_block(3)
    a, b = actuator.start(spec(0, port=base)), actuator.start(spec(1, port=base))
    check = HealthConfig(http="/", timeout=1)
    with http_servers([a.host], [a.port]):  # only slot 0's "container" answers
        assert actuator.healthy(a, check)
        assert not actuator.healthy(b, check)
    assert not actuator.healthy(a, check)


# ---------------------------------------------------------------- global units


GLOBAL = "[Service]\nExecStart=/usr/bin/web --port {port}\n[X-Fleet]\nMachineMetadata=role=web\n"


def test_a_global_unit_is_one_instance_per_matching_machine(fleet, embedded_store, tmp_path):
    actuator = make(fleet, embedded_store, tmp_path, unit=GLOBAL, **{"global": True})
    first = actuator.start(spec(0))
    assert first.host == "127.0.0.1" and first.port == 18000
    second = actuator.start(spec(1))  # the same unit: already everywhere
    assert (second.slot, second.host, second.port) == (1, "127.0.0.2", 18000)
    (unit,) = fleet.all_units()
    assert unit["name"] == "fl-web-global-v1.service" and "machineID" not in unit
    assert {"name": "Global", "section": "X-Fleet", "value": "true"} in unit["options"]
    listed = sorted(actuator.list(), key=lambda i: i.slot)
    assert [(i.slot, i.host, i.port, i.running) for i in listed] == [
        (0, "127.0.0.1", 18000, True), (1, "127.0.0.2", 18000, True)]
    assert [i.name for i in listed] == ["fl-web-0-v1", "fl-web-1-v1"]  # one announcement each
    with pytest.raises(FleetError, match="2 machine\\(s\\) match it, so slot 2 has no machine"):
        actuator.start(spec(2))
    with pytest.raises(FleetError, match="fleet cannot stop global unit fl-web-global-v1.service "
                                         "on one machine"):
        actuator.stop(listed[1], grace=1)
    assert len(fleet.all_states()) == 2
    actuator.stop(listed[0], grace=1)  # a count of 0: gone everywhere
    assert fleet.all_units() == [] and fleet.all_states() == []


def test_a_failed_machine_copy_of_a_global_unit_stays_but_is_unhealthy(fleet, embedded_store,
                                                                       tmp_path):
    actuator = make(fleet, embedded_store, tmp_path, unit=GLOBAL, **{"global": True})
    actuator.start(spec(0))
    fleet.fail("fl-web-global-v1.service", machine=M2)
    listed = sorted(actuator.list(), key=lambda i: i.slot)
    assert [i.running for i in listed] == [True, True]
    assert [actuator.healthy(i, None) for i in listed] == [True, False]


# ---------------------------------------------------------------- config


def test_config_errors_name_the_file_line_and_key(load_test_config):
    text = """\
    agent: {{cluster: fl}}
    services:
      web:
        source: {{type: static, count: 1}}
        actuator:
          type: fleet
          endpoint: {endpoint}
          unit: |
            {unit}
    """
    cases = [
        ("ftp://x", "[Service]\n        ExecStart=/bin/x", "endpoint must start with unix://"),
        ("unix:///s", "[Service]\n        Exec Start=/bin/x", "line 2 of the unit"),
        ("unix:///s", "ExecStart=/bin/x", "ExecStart= comes before any [Section]"),
        ("unix:///s", "[Service]\n        ExecStop=/bin/x", "has no ExecStart="),
        ("unix:///s", "[Service]\n        ExecStart=/bin/x\n        [X-Fleet]\n"
                      "        MachineMetaData=a=b", "[X-Fleet] has no option 'MachineMetaData'"),
        ("unix:///s", "[Service]\n        ExecStart=/bin/x\n        [X-Shipmate]\n"
                      "        Slot=1", "[X-Shipmate] is written by the agent"),
        ("unix:///s", "[Service]\n        ExecStart=/bin/x\n        [X-Fleet]\n"
                      "        Global=true", "Global=true but global is false"),
    ]
    for endpoint, unit, message in cases:
        with pytest.raises(ConfigError) as err:
            load_test_config(text.format(endpoint=endpoint,
                                         unit=unit.replace("\n        ", "\n            ")))
        (line,) = err.value.errors
        assert "agent.yaml:" in line and "services.web.actuator" in line and message in line, line


@pytest.mark.parametrize(("global_", "x_fleet", "message"), [
    ("true", "Replaces=old.service", "a global unit cannot use \\[X-Fleet\\] Replaces="),
    ("false", "Replaces=old.service\\nConflicts=web*",
     "Conflicts= cannot be used with Replaces="),
    ("false", "Replaces=old.service\\nMachineID=abc", "MachineID= cannot be used with Replaces="),
])
def test_replaces_is_checked_as_fleetd_does(load_test_config, global_, x_fleet, message):
    with pytest.raises(ConfigError, match=message):
        load_test_config(f"""
            agent: {{cluster: fl}}
            services:
              web:
                source: {{type: static, count: 1}}
                actuator:
                  type: fleet
                  global: {global_}
                  unit: "[Service]\\nExecStart=/bin/x\\n[X-Fleet]\\n{x_fleet}\\n"
        """)


def test_a_global_unit_cannot_have_conflicts(load_test_config):
    with pytest.raises(ConfigError, match="a global unit cannot use \\[X-Fleet\\] Conflicts="):
        load_test_config("""
            agent: {cluster: fl}
            services:
              web:
                source: {type: static, count: 1}
                actuator:
                  type: fleet
                  global: true
                  unit: "[Service]\\nExecStart=/bin/x\\n[X-Fleet]\\nConflicts=web*\\n"
        """)


# ---------------------------------------------------------------- through the agent loop


AGENT = """
agent:
  cluster: fl
  interval: 1s
  grace: 2s
  store: {{backend: embedded, path: state.db}}
  state_dir: state
services:
  web:
    image: registry.example/web:1.4
    port: {port}
    health: {{http: /, timeout: 1s}}
    source: {{type: static, count: 0, interval: 1s}}
    policy: {{min: 0}}
    announce: {{type: etcd, ttl: 10s}}
    actuator:
      type: fleet
      endpoint: {endpoint}
      launch_timeout: 10s
      poll: 50ms
      unit: |
        [Unit]
        Description=web slot {{slot}}
        [Service]
        ExecStart=/usr/bin/docker run --rm --name {{instance}} -p {{port}}:8080 {{image}}
        [X-Fleet]
        Conflicts=fl-web-*
"""


@pytest.fixture
def running_agent(fleet, write_config, monkeypatch) -> Iterator[tuple[Agent, int]]:
    monkeypatch.delenv("COREOS_PRIVATE_IPV4", raising=False)  # announce the machines' IPs
    port = port_block(3)
    agent = Agent(write_config(AGENT.format(port=port, endpoint=fleet.endpoint)))
    thread = threading.Thread(target=agent.run, daemon=True)
    with http_servers(list(IPS.values()), [port, port + 1, port + 2]):
        thread.start()
        yield agent, port
        agent.stop()
        thread.join(10)


def launched(fleet: FleetServer) -> list[tuple[str, str]]:
    """(unit, machine) of every unit fleet shows launched and active, by name."""
    active = {(s["name"], s["machineID"]) for s in fleet.all_states()
              if s["systemdActiveState"] == "active"}
    return sorted((u["name"], u["machineID"]) for u in fleet.all_units()
                  if u.get("currentState") == "launched" and (u["name"], u["machineID"]) in active)


def announced(agent: Agent) -> dict[str, dict]:
    return {k.rsplit("/", 1)[1]: json.loads(e.value)
            for k, e in agent.store.get_prefix("/services/web/").items()}


def test_scale_0_to_3_to_1_through_the_agent(fleet, running_agent):
    agent, port = running_agent
    override = Keys("/shipmate/fl").service("web", "override")
    eventually(lambda: agent.metrics.passes._value.get() >= 1, what="a first pass")
    assert fleet.all_units() == []
    agent.store.put(override, "3")
    eventually(lambda: len(launched(fleet)) == 3, timeout=10, what="3 units launched")
    units = fleet.all_units()
    names = sorted(u["name"] for u in units)
    assert len(names) == 3 and all(n.startswith(f"fl-web-{i}-") for i, n in enumerate(names))
    assert len(fleet.all_states()) == 3
    # healthy on their machines' primary IPs, then announced with those addresses
    eventually(lambda: len(announced(agent)) == 3, timeout=10, what="3 announcements")
    where = {u["name"].removesuffix(".service"): IPS[u["machineID"]] for u in units}
    assert {name: (a["host"], a["port"]) for name, a in announced(agent).items()} == {
        name: (where[name], port + int(name.split("-")[2])) for name in where}

    agent.store.put(override, "1")
    eventually(lambda: len(fleet.all_units()) == 1, timeout=10, what="scale down to 1")
    (unit,) = fleet.all_units()
    assert unit["name"].startswith("fl-web-0-") and unit["currentState"] == "launched"
    assert [s["name"] for s in fleet.all_states()] == [unit["name"]]
    eventually(lambda: list(announced(agent)) == [unit["name"].removesuffix(".service")],
               timeout=5, what="the stopped ones withdrawn")


def passes(agent: Agent) -> int:
    return int(agent.metrics.passes._value.get())


def test_fleet_outage_changes_nothing_and_the_agent_carries_on(fleet, running_agent):
    agent, _ = running_agent
    override = Keys("/shipmate/fl").service("web", "override")
    agent.store.put(override, "2")
    eventually(lambda: len(launched(fleet)) == 2, timeout=10, what="2 units launched")
    eventually(lambda: len(announced(agent)) == 2, timeout=10, what="the pass completed")
    before, shown = launched(fleet), announced(agent)
    fleet.timings.etcd_grace = 0.5  # 500s for 0.5 s, then 503s (a real fleetd: 15-25 s)
    fleet.requests.clear()
    fleet.set_etcd_down(True)
    agent.store.put(override, "1")  # a scale-down asked for while fleet cannot answer
    # the loop goes on through both kinds of error: two passes on 500s, two on 503s
    seen = passes(agent)
    eventually(lambda: passes(agent) >= seen + 2, timeout=30, what="passes on 500s")
    eventually(lambda: fleet.api("GET", "/fleet/v1/units")[0] == 503, timeout=30,
               what="503s")
    seen = passes(agent)
    eventually(lambda: passes(agent) >= seen + 2, timeout=30, what="passes on 503s")
    changes = [(m, t) for m, t in fleet.requests if m in ("PUT", "DELETE")]
    assert changes == []  # nothing started, stopped or deleted on partial data
    with fleet.cluster.lock:
        assert sorted(fleet.cluster.units) == [name for name, _ in before]
    assert announced(agent) == shown  # nothing withdrawn either
    fleet.set_etcd_down(False)
    eventually(lambda: fleet.api("GET", "/fleet/v1/units")[0] == 200, timeout=30,
               what="fleet answering again (its recovery lags)")
    eventually(lambda: len(fleet.all_units()) == 1, timeout=30, what="carrying on after it")
    assert launched(fleet) == before[:1]


def test_an_etcd_restart_that_loses_fleets_states_withdraws_nothing(fleet, running_agent):
    agent, _ = running_agent
    agent.store.put(Keys("/shipmate/fl").service("web", "override"), "2")
    eventually(lambda: len(announced(agent)) == 2, timeout=10, what="2 announcements")
    shown = announced(agent)
    fleet.timings.state_loss = 120  # longer than the test: the states stay lost throughout
    fleet.requests.clear()
    fleet.restart_etcd()
    seen = passes(agent)
    eventually(lambda: passes(agent) >= seen + 2, timeout=30, what="two passes without states")
    assert fleet.all_states() == []
    assert announced(agent) == shown  # every instance kept its last known health
    assert [(m, t) for m, t in fleet.requests if m in ("PUT", "DELETE")] == []


def test_a_failed_unit_is_replaced_by_the_loop(fleet, running_agent):
    agent, _ = running_agent
    agent.store.put(Keys("/shipmate/fl").service("web", "override"), "1")
    eventually(lambda: len(launched(fleet)) == 1, timeout=10, what="1 unit launched")
    ((name, _),) = launched(fleet)
    fleet.requests.clear()
    fleet.fail(name)
    eventually(lambda: ("DELETE", f"/fleet/v1/units/{name}") in fleet.requests, timeout=10,
               what="the failed unit removed")
    eventually(lambda: [n for n, _ in launched(fleet)] == [name], timeout=10,
               what="its slot launched again")


# ---------------------------------------------------------------- contrib/fleet


def test_the_contrib_fleet_files_are_valid(shipmate_plugins):
    contrib = Path(__file__).parents[3] / "contrib" / "fleet"
    config = load_config(contrib / "agent.yaml", shipmate_plugins)
    web = config.services["web"].actuator
    assert parse_unit(web.unit) == parse_unit((contrib / "web.service").read_text())
    assert config.services["edge"].actuator.global_
    agent_unit = parse_unit((contrib / "shipmate.service").read_text())
    assert ("X-Fleet", "MachineMetadata", "role=control") in agent_unit
    (start,) = [v for s, n, v in agent_unit if (s, n) == ("Service", "ExecStart")]
    assert start.endswith("run -c /etc/shipmate/agent.yaml")
    assert not any("COREOS_PRIVATE_IPV4" in v for _, _, v in agent_unit)


def test_a_rolling_deploy_replaces_the_units_one_at_a_time(fleet, running_agent):
    from agent.deploys import request_deploy

    agent, _ = running_agent
    keys = Keys("/shipmate/fl")
    agent.store.put(keys.service("web", "override"), "3")
    eventually(lambda: len(launched(fleet)) == 3, timeout=10, what="3 units launched")
    old = {name for name, _ in launched(fleet)}
    samples: list[tuple[int, int]] = []  # (units in fleet, launched and active)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((len(fleet.all_units()), len(launched(fleet))))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    fleet.requests.clear()
    request_deploy(agent.store, keys, "web", image="registry.example/web:1.5", by="test",
                   reason="test")
    eventually(lambda: agent.store.get(keys.service("web", "deploy")) is None, timeout=30,
               what="the deploy to end")
    done.set()
    sampler.join()
    release = json.loads(agent.store.get(keys.service("web", "release")).value)
    assert release["image"] == "registry.example/web:1.5"
    assert release["deploy"]["result"] == "finished"
    new = {name for name, _ in launched(fleet)}
    assert len(new) == 3 and not new & old
    # one at a time: never more than 3 units, never fewer than 2 serving
    assert max(units for units, _ in samples) == 3
    assert min(serving for _, serving in samples) >= 2, samples
    changes = [(method, path.rsplit("/", 1)[1].split("?")[0]) for method, path in fleet.requests
               if method in ("PUT", "DELETE") and "/units/" in path]
    deletes = [unit for method, unit in changes if method == "DELETE"]
    assert sorted(deletes) == sorted(old)
    for deleted in deletes:  # each old unit is gone before the next new one is sent
        index = changes.index(("DELETE", deleted))
        started_before = {u for m, u in changes[:index] if m == "PUT" and u not in old}
        assert len(started_before) == deletes.index(deleted)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tests.services import Pki

    return Pki(tmp_path_factory.mktemp("fleet-pki"))


def test_fleet_over_https_with_a_private_ca_and_client_certificates(pki, embedded_store,
                                                                     tmp_path):
    import ssl

    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(pki.path("server"), pki.path("server", "key"))
    server_tls.load_verify_locations(pki.path("ca"))
    server_tls.verify_mode = ssl.CERT_REQUIRED
    good = {"ca": str(pki.path("ca")), "cert": str(pki.path("client")),
            "key": str(pki.path("client", "key"))}
    with FleetServer(time_scale=FAST, launch_delay=0.3, tls=server_tls) as server:
        assert server.endpoint.startswith("https://")
        assert make(server, embedded_store, tmp_path, tls=good).list() == []
        for tls, expected in (({**good, "ca": str(pki.path("other_ca"))}, "CERTIFICATE_VERIFY"),
                              ({"ca": str(pki.path("ca"))}, "cannot reach fleet"),
                              ({**good, "key": str(pki.path("other_client", "key"))},
                               "cannot load the certificates")):
            with pytest.raises(FleetError, match=expected):
                make(server, embedded_store, tmp_path, tls=tls).list()


def test_fleet_tls_paths_must_be_absolute():
    with pytest.raises(ValueError, match="tls.ca must be an absolute path"):
        FleetConfig.model_validate({"endpoint": "https://fleet:8443", "unit": UNIT,
                                    "tls": {"ca": "ca.pem"}})


@pytest.mark.parametrize("image", ["--privileged -v /:/host busybox", "web:1 --net=host",
                                   "web:1\nExecStartPre=/bin/sh", "web:%h"])
def test_an_image_that_could_become_options_is_never_pasted_into_a_unit(actuator, image):
    bad = spec(0)
    bad = InstanceSpec(**{**bad.__dict__, "image": image})
    with pytest.raises(FleetError, match="not an image reference"):
        actuator.options(bad)
