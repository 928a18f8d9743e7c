"""The fleet stand-in answers as FLEET_API.md says a real fleetd v1.0.0 does.

These are the stand-in's own conformance tests: paths, status codes, bodies,
headers, paging tokens, the asynchronous states and the quirks, each checked
on the wire (raw HTTP), so the fleet actuator's tests run against something
that behaves like fleet, not like what the actuator expects.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time

import pytest

from tests.fleet_server import (
    ETCD_MESSAGE,
    REALISTIC,
    FleetServer,
    Machine,
    Timings,
    machine_id,
)
from tests.helpers import eventually

EXEC = [{"section": "Service", "name": "ExecStart", "value": "/usr/bin/sleep 1d"}]
M1, M2, M3 = machine_id(1), machine_id(2), machine_id(3)
FAST = 0.05  # every timing a twentieth of a real fleetd's


@pytest.fixture
def fleet(tmp_path):
    """Fast timings, placement at once (for the scheduler's rules; see ``slow``)."""
    with FleetServer(time_scale=FAST, schedule_delay=0, launch_delay=0.2,
                     unix_socket=tmp_path / "fleet.sock") as server:
        yield server


class Clock:
    """A clock the test moves itself: a real fleetd's timings, without the waits."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def slow(clock):
    """A real fleetd's timings (``REALISTIC``) on the test's ``clock``."""
    with FleetServer(clock=clock, etcd_error_delay=0) as server:
        yield server


def put(fleet: FleetServer, name: str, desired: str | None = "launched",
        options: list | None = None) -> tuple[int, bytes]:
    body: dict = {}
    if desired is not None:
        body["desiredState"] = desired
    if options is not None:
        body["options"] = options
    status, _, data = fleet.api("PUT", f"/fleet/v1/units/{name}", body)
    return status, data


def error(data: bytes) -> tuple[int, str]:
    parsed = json.loads(data)
    return parsed["error"]["code"], parsed["error"]["message"]


def fleet_x(**values: str) -> list[dict]:
    return EXEC + [{"section": "X-Fleet", "name": k, "value": v} for k, v in values.items()]


# ---------------------------------------------------------------- resources and headers


def test_every_answer_names_fleetd_and_empty_lists_are_empty_objects(fleet):
    for path in ("/fleet/v1/units", "/v1-alpha/units", "/fleet/v1/state"):
        status, headers, body = fleet.api("GET", path)
        assert (status, body) == (200, b"{}")
        assert headers["Server"] == "fleetd/1.0.0"
        assert headers["Content-Type"] == "application/json"
    status, headers, _ = fleet.api("GET", "/no/such/path")
    assert headers["Server"] == "fleetd/1.0.0"


def test_machines_page(fleet):
    page = fleet.get("/machines")
    assert list(page) == ["machines"]
    assert [(m["id"], m["primaryIP"]) for m in page["machines"]] == [
        (M1, "127.0.0.1"), (M2, "127.0.0.2"), (M3, "127.0.0.3")]
    assert list(page["machines"][0]) == ["id", "metadata", "primaryIP"]
    assert page["machines"][0]["metadata"] == {"az": "us-east-1a", "role": "web"}
    assert all(len(m["id"]) == 32 for m in page["machines"])


def test_a_machine_without_metadata_omits_the_field():
    with FleetServer([Machine(machine_id(9), "127.0.0.9")]) as fleet:
        assert fleet.get("/machines") == {"machines": [{"id": machine_id(9),
                                                        "primaryIP": "127.0.0.9"}]}


def test_discovery_document(fleet):
    status, headers, body = fleet.api("GET", "/fleet/v1/discovery")
    doc = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert doc["id"] == "fleet:v1" and doc["basePath"] == "/fleet/v1/"
    assert set(doc["resources"]) == {"Machines", "Units", "UnitState"}


def test_wrong_methods_and_unknown_paths(fleet):
    cases = [
        ("POST", "/fleet/v1/units", 405, "only GET supported against this resource"),
        ("PATCH", "/fleet/v1/units/a.service", 405,
         "only GET, PUT and DELETE supported against this resource"),
        ("DELETE", "/fleet/v1/state", 405, "only GET supported against this resource"),
        ("PUT", "/fleet/v1/machines", 405, "only GET and PATCH supported against this resource"),
        ("GET", "/fleet/v1", 405, ""),
        ("GET", "/", 405, ""),
        ("GET", "/fleet/v1/nothing", 404, ""),
        ("GET", "/fleet/v1/units/", 404, ""),
        ("GET", "/fleet/v1/units/a/b.service", 404, ""),
        ("GET", "/fleet/v1/machines/x", 404, ""),
    ]
    for method, path, code, message in cases:
        status, headers, body = fleet.api(method, path)
        assert (status, error(body)) == (code, (code, message)), (method, path)
        assert headers["Content-Type"] == "application/json"
    _, _, body = fleet.api("GET", "/fleet/v1/nothing")
    assert body == b'{"error":{"code":404,"message":""}}'  # Go's compact JSON


# ---------------------------------------------------------------- units


def test_create_get_and_delete_a_unit(fleet):
    status, _, body = fleet.api("GET", "/fleet/v1/units/a.service")
    assert (status, error(body)) == (404, (404, "unit does not exist"))
    status, headers, body = fleet.api("PUT", "/fleet/v1/units/a.service", {"options": EXEC})
    assert (status, body) == (201, b"") and "Content-Type" not in headers
    unit = fleet.get("/units/a.service")
    assert unit == {"currentState": "inactive", "desiredState": "inactive",
                    "name": "a.service", "options": [
                        {"name": "ExecStart", "section": "Service", "value": "/usr/bin/sleep 1d"}]}
    assert list(unit) == sorted(unit)  # Go marshals the generated struct's fields in order
    status, _, body = fleet.api("DELETE", "/fleet/v1/units/a.service")
    assert (status, body) == (204, b"")
    status, _, body = fleet.api("DELETE", "/fleet/v1/units/a.service")
    assert (status, error(body)) == (404, (404, "unit does not exist"))
    assert fleet.get("/units") == {}


def test_put_content_type_must_be_one_application_json(fleet):
    raw = json.dumps({"desiredState": "launched", "options": EXEC}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", fleet.port, timeout=5)
    conn.putrequest("PUT", "/fleet/v1/units/a.service")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(raw)))
    conn.endheaders(raw)
    response = conn.getresponse()
    assert (response.status, error(response.read())) == (
        415, (415, "expected 1 Content-Type, got 2"))
    conn.close()
    status, _, body = fleet.api("PUT", "/fleet/v1/units/a.service", raw=raw)
    assert (status, error(body)) == (415, (415, "expected 1 Content-Type, got 0"))
    status, _, body = fleet.api("PUT", "/fleet/v1/units/a.service", raw=raw,
                                headers={"Content-Type": "text/plain"})
    assert (status, error(body)) == (415, (415, "only acceptable Content-Type is application/json"))
    assert fleet.get("/units") == {}


def test_put_body_and_name_errors(fleet):
    cases = [
        (b"", "unable to decode body: EOF"),
        (b"{nope", "unable to decode body: invalid character 'n' looking for beginning of value"),
        (b'{"options": "x"}', "unable to decode body: json: cannot unmarshal string into Go "
                              "value of type []*schema.UnitOption"),
        (b'{"name": "b.service", "options": []}',
         'name in URL "a.service" differs from unit name in request body "b.service"'),
    ]
    for raw, message in cases:
        status, _, body = fleet.api("PUT", "/fleet/v1/units/a.service", raw=raw,
                                    headers={"Content-Type": "application/json"})
        assert (status, error(body)) == (400, (400, message)), raw
    for name, message in [("a", 'unit name must contain "."'),
                          ("a.nope", 'invalid unit type: "nope"'),
                          ("a.", 'unit name cannot end in "."'),
                          ("@a.service", 'unit name cannot start in "@"')]:
        status, body = put(fleet, name, options=EXEC)
        assert (status, error(body)) == (400, (400, message)), name


def test_new_unit_needs_options_and_an_existing_one_needs_a_state(fleet):
    status, body = put(fleet, "a.service")
    assert (status, error(body)) == (409, (409, "unit does not exist and options field empty"))
    assert put(fleet, "a.service", desired=None, options=EXEC) == (201, b"")
    status, body = put(fleet, "a.service", desired=None, options=EXEC)  # identical options
    assert (status, error(body)) == (
        409, (409, "must provide DesiredState to update existing unit"))
    status, body = put(fleet, "a.service", desired=None)  # absent options
    assert status == 409
    assert put(fleet, "a.service", "loaded") == (204, b"")  # a state change only
    assert put(fleet, "a.service", "loaded", EXEC) == (204, b"")  # same options: still 204
    changed = [{"section": "Service", "name": "ExecStart", "value": "/usr/bin/sleep 2d"}]
    assert put(fleet, "a.service", "launched", changed) == (201, b"")  # replaced
    assert fleet.get("/units/a.service")["options"][0]["value"] == "/usr/bin/sleep 2d"


def test_options_are_validated(fleet):
    cases = [
        (fleet_x(Global="true", Conflicts="b*"), "Global cannot be used with Conflicts"),
        (fleet_x(Global="true", MachineOf="b.service"), "Global cannot be used with Peers"),
        (fleet_x(MachineID=M1, Conflicts="b*"), "MachineID cannot be used with Conflicts"),
        (fleet_x(MachineID=M1, Replaces="b.service"), "MachineID cannot be used with Replaces"),
        (fleet_x(Global="true", Replaces="b.service"), "Global cannot be used with Replaces"),
        (fleet_x(Conflicts="c*", Replaces="b.service"), "Conflicts cannot be used with Replaces"),
        (fleet_x(MachineOf="b.service", Replaces="b*"),
         'unresolvable requirements: peer "b.service" matches replace "b*"'),
        (fleet_x(MachineOf="b.service", Conflicts="b*"),
         'unresolvable requirements: peer "b.service" matches conflict "b*"'),
        (EXEC + [{"section": "Service", "name": "Environment", "value": "x" * 3000}],
         "line too long (max 2048 bytes)"),
    ]
    for options, message in cases:
        status, body = put(fleet, "a.service", options=options)
        assert (status, error(body)) == (400, (400, message))
    assert fleet.get("/units") == {}
    assert put(fleet, "r.service", options=fleet_x(Replaces="b.service")) == (201, b"")  # alone


def test_a_template_cannot_be_activated(fleet):
    assert put(fleet, "web@.service", desired=None, options=EXEC) == (201, b"")
    status, body = put(fleet, "web@.service", "launched")
    assert (status, error(body)) == (400, (400, 'cannot activate template "web@.service"'))
    assert put(fleet, "web@.service", "inactive") == (204, b"")


def test_a_bogus_desired_state_is_accepted_then_the_unit_answers_500_forever(fleet):
    put(fleet, "a.service", "launched", EXEC)
    assert put(fleet, "a.service", "running") == (204, b"")
    for method, body in (("GET", None), ("DELETE", None), ("PUT", {"desiredState": "launched"})):
        status, _, data = fleet.api(method, "/fleet/v1/units/a.service", body)
        assert (status, error(data)) == (500, (500, "")), method
    assert fleet.get("/units") == {}  # fleet's registry skips the unit it cannot parse


# ---------------------------------------------------------------- states over time


def systemd(state: dict) -> str:
    return "/".join(state[k] for k in ("systemdLoadState", "systemdActiveState",
                                        "systemdSubState"))


def test_the_default_timings_are_a_real_fleetds_and_scale_together():
    assert FleetServer().timings == Timings(**REALISTIC)
    assert (REALISTIC["schedule_delay"], REALISTIC["launch_delay"]) == (1.0, 3.5)
    fast = FleetServer(time_scale=0.1, launch_delay=0.2).timings
    assert fast.schedule_delay == pytest.approx(0.1) and fast.launch_delay == 0.2
    assert fast.etcd_grace == pytest.approx((1.5, 2.5))  # a range stays a range
    assert fast.state_loss == pytest.approx(2.4)


def test_scheduling_is_asynchronous_and_launch_follows(clock, slow):
    put(slow, "a.service", "launched", EXEC)
    unit = slow.get("/units/a.service")
    assert "machineID" not in unit and unit["currentState"] == "inactive"
    clock.advance(0.9)
    assert "machineID" not in slow.get("/units/a.service")
    clock.advance(0.2)  # about 1 s after the PUT: scheduled, not launched yet
    unit = slow.get("/units/a.service")
    assert unit["machineID"] == M1 and unit["currentState"] == "inactive"
    assert slow.get("/state") == {}
    clock.advance(3.3)
    assert slow.get("/units/a.service")["currentState"] == "inactive"
    clock.advance(0.2)  # 3.5 s after it was scheduled (at 1 s)
    assert slow.get("/units/a.service")["currentState"] == "launched"
    serialized = "[Service]\nExecStart=/usr/bin/sleep 1d\n"
    assert slow.get("/state") == {"states": [{
        "hash": hashlib.sha1(serialized.encode()).hexdigest(), "machineID": M1,
        "name": "a.service", "systemdActiveState": "active", "systemdLoadState": "loaded",
        "systemdSubState": "running"}]}


def test_under_load_systemd_shows_its_start_while_fleet_says_launched(clock, slow):
    slow.timings.activation_delay = 2.0
    put(slow, "a.service", "launched", EXEC)
    clock.advance(1.0 + 3.5)
    assert slow.get("/units/a.service")["currentState"] == "launched"
    (state,) = slow.get("/state")["states"]
    assert systemd(state) == "loaded/inactive/dead"  # the transitional state
    clock.advance(1.0)
    assert systemd(slow.get("/state")["states"][0]) == "loaded/activating/start"
    clock.advance(1.0)
    assert systemd(slow.get("/state")["states"][0]) == "loaded/active/running"


def test_a_states_entry_lingers_after_inactive_and_delete(clock, slow):
    for name in ("a.service", "b.service"):
        put(slow, name, "launched", EXEC)
    clock.advance(5)
    assert len(slow.get("/state")["states"]) == 2
    assert put(slow, "a.service", "inactive") == (204, b"")
    assert slow.api("DELETE", "/fleet/v1/units/b.service")[0] == 204
    assert "machineID" not in slow.get("/units/a.service")  # unscheduled at once
    assert [u["name"] for u in slow.get("/units")["units"]] == ["a.service"]
    clock.advance(0.9)  # fleet's agents have not caught up: the states read as they did
    assert [(s["name"], systemd(s)) for s in slow.get("/state")["states"]] == [
        ("a.service", "loaded/active/running"), ("b.service", "loaded/active/running")]
    clock.advance(1.2)  # 1-2 s
    assert slow.get("/state") == {}


def test_loaded_then_inactive(fleet):
    put(fleet, "a.service", "loaded", EXEC)
    eventually(lambda: fleet.get("/units/a.service")["currentState"] == "loaded")
    (state,) = fleet.get("/state")["states"]
    assert (state["systemdLoadState"], state["systemdActiveState"], state["systemdSubState"]) == (
        "loaded", "inactive", "dead")
    assert put(fleet, "a.service", "inactive") == (204, b"")
    unit = fleet.get("/units/a.service")
    assert "machineID" not in unit and unit["currentState"] == "inactive"
    eventually(lambda: fleet.get("/state") == {}, what="the state entry gone")


def test_state_filters_and_the_single_state_quirk(fleet):
    for name in ("a.service", "b.service"):
        put(fleet, name, "launched", EXEC)
    eventually(lambda: len(fleet.get("/state").get("states", [])) == 2)
    assert [s["name"] for s in fleet.get("/state?unitName=b.service")["states"]] == ["b.service"]
    assert fleet.get("/state?unitName=b") == {}  # exact match only
    assert [s["name"] for s in fleet.get(f"/state?machineID={M2}")["states"]] == ["b.service"]
    assert fleet.get(f"/state?machineID={M2[:8]}") == {}
    assert fleet.get("/state/a.service")["machineID"] == M1
    with pytest.raises(http.client.RemoteDisconnected):
        fleet.api("GET", "/fleet/v1/state/nothing.service")  # fleetd panics: empty reply


def test_a_failed_unit_stays_launched_with_systemd_failed(fleet):
    put(fleet, "a.service", "launched", EXEC)
    eventually(lambda: fleet.get("/state").get("states"))
    fleet.fail("a.service")
    (state,) = fleet.get("/state")["states"]
    assert (state["systemdActiveState"], state["systemdSubState"]) == ("failed", "failed")
    assert fleet.get("/units/a.service")["currentState"] == "launched"


# ---------------------------------------------------------------- scheduling


def test_units_spread_over_the_least_loaded_machines(fleet):
    for n in range(4):
        put(fleet, f"u{n}.service", "launched", EXEC)
    machines = [u["machineID"] for u in fleet.get("/units")["units"]]
    assert machines == [M1, M2, M3, M1]


def test_global_units_run_on_every_machine_that_matches(fleet):
    put(fleet, "all.service", "launched", fleet_x(Global="true"))
    put(fleet, "web.service", "launched", fleet_x(Global="true", MachineMetadata="role=web"))
    eventually(lambda: len(fleet.get("/state").get("states", [])) == 5)
    states = fleet.get("/state")["states"]
    assert sorted(s["machineID"] for s in states if s["name"] == "all.service") == [M1, M2, M3]
    assert sorted(s["machineID"] for s in states if s["name"] == "web.service") == [M1, M2]
    unit = fleet.get("/units/all.service")
    assert "machineID" not in unit and unit["currentState"] == "inactive"  # no single schedule
    fleet.add_machine(Machine(machine_id(4), "127.0.0.4", {"role": "web"}))
    eventually(lambda: len(fleet.get("/state?unitName=web.service").get("states", [])) == 3)


def test_machine_metadata_conflicts_and_machine_of(fleet):
    put(fleet, "w1.service", "launched", fleet_x(MachineMetadata="role=worker"))
    assert fleet.get("/units/w1.service")["machineID"] == M3
    put(fleet, "az.service", "launched",
        fleet_x(MachineMetadata='"az=us-east-1b" "az=us-east-1c" role=web'))
    assert fleet.get("/units/az.service")["machineID"] == M2
    put(fleet, "side.service", "launched", fleet_x(MachineOf="w1.service"))
    assert fleet.get("/units/side.service")["machineID"] == M3
    for n in range(4):
        put(fleet, f"web-{n}.service", "launched", fleet_x(Conflicts="web-*"))
    units = {u["name"]: u.get("machineID") for u in fleet.get("/units")["units"]}
    assert sorted(units[f"web-{n}.service"] or "" for n in range(3)) == [M1, M2, M3]
    assert units["web-3.service"] is None  # nowhere to go: waits unscheduled
    assert fleet.get("/units/web-3.service")["currentState"] == "inactive"
    fleet.api("DELETE", "/fleet/v1/units/web-1.service")
    assert fleet.get("/units/web-3.service")["machineID"] == units["web-1.service"]


def test_patch_machine_metadata(fleet):
    ops = [{"op": "add", "path": f"/{M1}/metadata/disk", "value": {"value": "ssd"}}]
    status, headers, body = fleet.api("PATCH", "/fleet/v1/machines", ops)
    assert (status, body) == (204, b"")
    assert fleet.get("/machines")["machines"][0]["metadata"]["disk"] == "ssd"
    put(fleet, "db.service", "launched", fleet_x(MachineMetadata="disk=ssd"))
    assert fleet.get("/units/db.service")["machineID"] == M1
    bad = [
        ([{"op": "move", "path": f"/{M1}/metadata/disk", "value": {"value": "x"}}],
         "invalid op: expect add, remove, or replace"),
        ([{"op": "add", "path": f"/{M1}/disk", "value": {"value": "x"}}],
         "machine metadata path invalid"),
        ([{"op": "add", "path": f"/{M1}/metadata/a b", "value": {"value": "x"}}],
         "machine metadata path invalid"),
        ([{"op": "replace", "path": f"/{M1}/metadata/disk"}],
         "invalid value: add and replace require a value"),
    ]
    for ops, message in bad:
        status, _, body = fleet.api("PATCH", "/fleet/v1/machines", ops)
        assert (status, error(body)) == (400, (400, message))
    fleet.api("PATCH", "/fleet/v1/machines", [{"op": "remove", "path": f"/{M1}/metadata/disk"}])
    assert "disk" not in fleet.get("/machines")["machines"][0]["metadata"]


# ---------------------------------------------------------------- paging


def test_paging_tokens_and_the_empty_last_page(fleet):
    for n in range(100):
        put(fleet, f"u{n:03}.service", "inactive", EXEC)
    first = fleet.get("/units")
    assert len(first["units"]) == 100 and first["nextPageToken"] == "ZAACAA=="  # (100, 2)
    assert list(first) == ["nextPageToken", "units"]
    assert fleet.get("/units?nextPageToken=ZAACAA==") == {}  # exact multiple: an empty last page
    put(fleet, "u100.service", "inactive", EXEC)
    assert [u["name"] for u in fleet.get("/units?nextPageToken=ZAACAA==")["units"]] == [
        "u100.service"]
    assert len(fleet.all_units()) == 101


def test_small_pages_and_bad_tokens():
    with FleetServer(token_limit=2, time_scale=0) as fleet:
        for n in range(4):
            put(fleet, f"u{n}.service", "launched", EXEC)
        assert fleet.get("/state")["nextPageToken"] == "AgACAA=="
        assert fleet.get("/state?nextPageToken=AgACAA==")["nextPageToken"] == "AgADAA=="
        assert fleet.get("/state?nextPageToken=AgADAA==") == {}
        assert len(fleet.all_states()) == 4
        assert fleet.get("/machines")["nextPageToken"] == "AgACAA=="
        cases = [("ZAACAA==", "token limit must be 2"), ("AgAAAA==", "token page must be "
                                                        "greater than zero"),
                 ("AgA=", "unexpected EOF"), ("!!", "illegal base64 data at input byte 0"),
                 ("AgACAA==&nextPageToken=AgACAA==", "too many values for page token")]
        for token, message in cases:
            status, _, body = fleet.api("GET", f"/fleet/v1/units?nextPageToken={token}")
            assert (status, error(body)) == (400, (400, message)), token


# ---------------------------------------------------------------- etcd trouble


def test_etcd_down_gives_slow_500s_then_503s_and_recovers_late(clock, slow):
    slow.timings.etcd_error_delay = 0.2
    put(slow, "a.service", "launched", EXEC)
    clock.advance(5)
    slow.set_etcd_down(True)
    for method, path in (("GET", "/fleet/v1/units"), ("GET", "/fleet/v1/state"),
                         ("GET", "/fleet/v1/machines"),
                         ("DELETE", "/fleet/v1/units/a.service")):
        asked = time.monotonic()
        status, _, body = slow.api(method, path)
        assert (status, error(body)) == (500, (500, "")), path
        assert time.monotonic() - asked >= 0.2  # each 500 waits for fleetd's etcd timeout
    assert slow.api("GET", "/fleet/v1/discovery")[0] == 200  # needs no etcd
    clock.advance(14.9)
    assert slow.api("GET", "/fleet/v1/units")[0] == 500  # 15-25 s of 500s
    clock.advance(10.2)
    for path in ("/fleet/v1/units", "/fleet/v1/discovery", "/nothing"):
        status, headers, body = slow.api("GET", path)
        assert (status, error(body)) == (503, (503, ETCD_MESSAGE)), path
        assert headers["Server"] == "fleetd/1.0.0"
    slow.set_etcd_down(False)
    assert slow.api("GET", "/fleet/v1/units")[0] == 503  # recovery lags 4-14 s
    clock.advance(3.9)
    assert slow.api("GET", "/fleet/v1/units")[0] == 503
    clock.advance(10.2)
    assert slow.get("/units/a.service")["currentState"] == "launched"  # nothing lost


def test_an_outage_ends_by_itself():
    with FleetServer(time_scale=0, etcd_grace=0.2) as fleet:
        fleet.outage(0.6)
        assert fleet.api("GET", "/fleet/v1/units")[0] == 500
        eventually(lambda: fleet.api("GET", "/fleet/v1/units")[0] == 503, timeout=30)
        eventually(lambda: fleet.api("GET", "/fleet/v1/units")[0] == 200, timeout=30)


def test_after_an_etcd_restart_every_state_is_gone_for_a_while(clock, slow):
    for name in ("a.service", "b.service"):
        put(slow, name, "launched", EXEC)
    clock.advance(5)
    units = slow.get("/units")
    slow.restart_etcd()
    assert slow.get("/state") == {}
    assert slow.get("/units") == units  # the units run on, launched where they were
    with pytest.raises(http.client.RemoteDisconnected):
        slow.api("GET", "/fleet/v1/state/a.service")
    clock.advance(23.9)
    assert slow.get("/state") == {}
    clock.advance(0.2)  # about 24 s
    assert [s["name"] for s in slow.get("/state")["states"]] == ["a.service", "b.service"]


def test_an_etcd_restart_with_downtime_loses_the_states_once_fleetd_answers():
    with FleetServer(time_scale=0, etcd_grace=60, recovery_lag=0, state_loss=60) as fleet:
        put(fleet, "a.service", "launched", EXEC)
        eventually(lambda: fleet.get("/state"), what="a state")
        fleet.restart_etcd(downtime=0.3)
        assert fleet.api("GET", "/fleet/v1/units")[0] == 500
        eventually(lambda: fleet.api("GET", "/fleet/v1/units")[0] == 200, timeout=30,
                   what="etcd back")
        assert fleet.get("/state") == {}
        assert fleet.get("/units/a.service")["currentState"] == "launched"


# ---------------------------------------------------------------- unix socket


def test_the_same_api_over_a_unix_socket(fleet, tmp_path):
    put(fleet, "a.service", "launched", EXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(tmp_path / "fleet.sock"))
    sock.sendall(b"GET /fleet/v1/units HTTP/1.1\r\nHost: fleet\r\nConnection: close\r\n\r\n")
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Server: fleetd/1.0.0" in head
    assert json.loads(body)["units"][0]["name"] == "a.service"
    assert fleet.unix_endpoint == f"unix://{tmp_path / 'fleet.sock'}"
