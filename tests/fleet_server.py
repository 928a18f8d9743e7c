"""A stand-in for fleetd v1.0.0's HTTP API, for the fleet actuator's tests.

fleet is archived upstream and cannot be installed here, so this module serves
its API v1 exactly as ``/work/shared/FLEET_API.md`` describes a real fleetd
answering (that page wins where fleet's own api-v1.md differs). It keeps a
small in-memory cluster: a few fake machines (ids, primary IPs, metadata) and
the units submitted to it, and plays fleet's engine and agents over time:

Its timings (``Timings``; constructor arguments, and ``timings`` while it runs)
default to a real fleetd's (``REALISTIC``) times ``time_scale``, so a test
passes ``time_scale=0.05`` and keeps the behaviour at a twentieth of the wait.
A timing may be a ``(low, high)`` range, drawn from by a seeded random.

- Scheduling is asynchronous: ``PUT`` with ``desiredState: launched`` leaves
  the unit unscheduled (no ``machineID``, ``currentState`` inactive) for
  ``schedule_delay`` (1 s); then ``machineID`` is set and ``launch_delay``
  (3.5 s) later ``currentState`` is ``launched`` and its state reads
  loaded/active/running. ``activation_delay`` (0 by default; seconds on a
  loaded machine) is how long systemd then takes to start it: for its first
  half the state reads the transitional loaded/inactive/dead, then
  loaded/activating/start, while ``currentState`` already says launched.
  ``loaded`` gives loaded/inactive/dead after the launch delay.
- ``PUT`` ``inactive`` unschedules the unit (``machineID`` gone at once) and
  ``DELETE`` removes it, but its state entries linger for ``linger`` (1-2 s)
  as they last read.
- The scheduler honours ``[X-Fleet]`` ``Global`` (every matching machine, one
  state per machine; the unit shows ``currentState`` inactive and no
  ``machineID``), ``MachineMetadata`` (keys ANDed, values of one key ORed),
  ``Conflicts`` (globs, both ways), ``MachineOf`` and ``MachineID``; among the
  candidates it picks the least loaded machine, ties broken by machine id
  (fleet's least-loaded scheduler). A unit that fits nowhere waits,
  unscheduled, and is placed as soon as a machine frees up or joins. Options
  are validated as fleetd's ``ValidateOptions`` does, ``Replaces`` included
  (not with ``MachineID``, ``Global`` or ``Conflicts``; a peer must not match it).
- etcd trouble: with etcd down, every call that needs etcd answers 500 with an
  empty message, each after ``etcd_error_delay`` (1 s: fleetd's etcd timeout),
  for ``etcd_grace`` (15-25 s), then every call answers 503 "fleet server
  unable to communicate with etcd" at once; once etcd is back fleetd goes on
  answering so for ``recovery_lag`` (4-14 s). After an etcd restart
  (``restart_etcd``) every unit state is gone for ``state_loss`` (24 s) while
  the units run on and ``/units`` shows them as before.
- The quirks: ``GET /state/NAME`` with no state drops the connection with an
  empty reply; a bogus ``desiredState`` on update is accepted (204) and from
  then on that unit answers 500 with an empty message to every call that names
  it (and drops out of ``GET /units``, which fleet's registry skips with a log
  line); paging is by ``token_limit`` (fleetd's ``--token_limit``, default
  100) with fleet's token format, including the full last page that still
  carries a token.

Test controls: ``timings`` (settable fields), ``set_etcd_down(True/False)``,
``outage(seconds)`` (down, then back by itself), ``restart_etcd(downtime)``,
``fail(unit)`` (systemd reports the unit failed), ``exit(unit)`` (its process
ended: inactive/dead while fleet says launched), ``fail_on_launch(*globs)``
(matching units fail as soon as they launch), ``add_machine``/
``remove_machine``; ``requests`` lists every request received. ``api()`` is a
tiny HTTP client for tests that want to see raw answers.

Served over TCP on a free loopback port (``endpoint``) and, optionally, over a
unix socket like fleetd's ``/var/run/fleet.sock`` (``unix_endpoint``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import hashlib
import http.client
import http.server
import json
import os
import random
import re
import shlex
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION = "1.0.0"
ETCD_MESSAGE = "fleet server unable to communicate with etcd"
STATES = ("inactive", "loaded", "launched")
UNIT_TYPES = {"service", "socket", "busname", "target", "snapshot", "device", "mount",
              "automount", "swap", "timer", "path", "slice", "scope"}
NAME_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:-_.\\@")
METADATA_PATH = re.compile(r"^/([^/]+)/metadata/([A-Za-z0-9_.-]+)$")
LINE_MAX = 2048  # go-systemd's SYSTEMD_LINE_MAX, checked by fleet's ValidateOptions

DISCOVERY = {
    "kind": "discovery#restDescription", "discoveryVersion": "v1", "id": "fleet:v1",
    "name": "schema", "version": "v1", "title": "fleet API", "description": "",
    "documentationLink": "http://github.com/coreos/fleet", "protocol": "rest",
    "icons": {"x16": "", "x32": ""}, "labels": [], "baseUrl": "$ENDPOINT/fleet/v1/",
    "basePath": "/fleet/v1/", "rootUrl": "$ENDPOINT/", "servicePath": "fleet/v1/",
    "batchPath": "batch", "parameters": {}, "auth": {},
    "schemas": {
        "Machine": {"id": "Machine", "type": "object", "properties": {
            "id": {"type": "string"}, "primaryIP": {"type": "string"},
            "metadata": {"type": "object", "properties": {},
                         "additionalProperties": {"type": "string"}}}},
        "MachinePage": {"id": "MachinePage", "type": "object", "properties": {
            "machines": {"type": "array", "items": {"$ref": "Machine"}},
            "nextPageToken": {"type": "string"}}},
        "UnitOption": {"id": "UnitOption", "type": "object", "properties": {
            "section": {"type": "string"}, "name": {"type": "string"},
            "value": {"type": "string"}}},
        "Unit": {"id": "Unit", "type": "object", "properties": {
            "name": {"type": "string"},
            "options": {"type": "array", "items": {"$ref": "UnitOption"}},
            "desiredState": {"type": "string", "enum": list(STATES)},
            "currentState": {"type": "string", "enum": list(STATES)},
            "machineID": {"type": "string", "required": True}}},
        "UnitPage": {"id": "UnitPage", "type": "object", "properties": {
            "units": {"type": "array", "items": {"$ref": "Unit"}},
            "nextPageToken": {"type": "string"}}},
        "UnitState": {"id": "UnitState", "type": "object", "properties": {
            "name": {"type": "string"}, "hash": {"type": "string"},
            "machineID": {"type": "string"}, "systemdLoadState": {"type": "string"},
            "systemdActiveState": {"type": "string"}, "systemdSubState": {"type": "string"}}},
        "UnitStatePage": {"id": "UnitStatePage", "type": "object", "properties": {
            "states": {"type": "array", "items": {"$ref": "UnitState"}},
            "nextPageToken": {"type": "string"}}},
    },
    "resources": {
        "Machines": {"methods": {"List": {
            "id": "fleet.Machine.List", "description": "Retrieve a page of Machine objects.",
            "httpMethod": "GET", "path": "machines",
            "parameters": {"nextPageToken": {"type": "string", "location": "query"}},
            "response": {"$ref": "MachinePage"}}}},
        "Units": {"methods": {
            "List": {"id": "fleet.Unit.List", "description": "Retrieve a page of Unit objects.",
                     "httpMethod": "GET", "path": "units",
                     "parameters": {"nextPageToken": {"type": "string", "location": "query"}},
                     "response": {"$ref": "UnitPage"}},
            "Get": {"id": "fleet.Unit.Get", "description": "Retrieve a single Unit object.",
                    "httpMethod": "GET", "path": "units/{unitName}",
                    "parameters": {"unitName": {"type": "string", "location": "path",
                                                "required": True}},
                    "parameterOrder": ["unitName"], "response": {"$ref": "Unit"}},
            "Delete": {"id": "fleet.Unit.Delete",
                       "description": "Delete the referenced Unit object.",
                       "httpMethod": "DELETE", "path": "units/{unitName}",
                       "parameters": {"unitName": {"type": "string", "location": "path",
                                                   "required": True}},
                       "parameterOrder": ["unitName"]},
            "Set": {"id": "fleet.Unit.Set", "description": "Create or update a Unit.",
                    "httpMethod": "PUT", "path": "units/{unitName}",
                    "parameters": {"unitName": {"type": "string", "location": "path",
                                                "required": True}},
                    "parameterOrder": ["unitName"], "request": {"$ref": "Unit"}}}},
        "UnitState": {"methods": {"List": {
            "id": "fleet.UnitState.List",
            "description": "Retrieve a page of UnitState objects.",
            "httpMethod": "GET", "path": "state",
            "parameters": {"nextPageToken": {"type": "string", "location": "query"},
                           "unitName": {"type": "string", "location": "query"},
                           "machineID": {"type": "string", "location": "query"}},
            "response": {"$ref": "UnitStatePage"}}}},
    },
}
DISCOVERY_JSON = json.dumps(DISCOVERY, indent=2) + "\n"


# ---------------------------------------------------------------- Go-isms


def go_json(value: Any) -> bytes:
    """Marshal like Go's encoding/json: compact, <>& escaped, non-ASCII kept."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text.encode()


def go_quote(text: str) -> str:
    """Go's %q for a string."""
    return json.dumps(text)


def omitempty(**fields: Any) -> dict[str, Any]:
    """The fields a Go struct with ``omitempty`` tags marshals (in the given order)."""
    return {k: v for k, v in fields.items() if v not in (None, "", [], {})}


class RequestError(Exception):
    """An answer fleet gives with ``sendError(code, message)``."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code, self.message = code, message


class EtcdTimeout(RequestError):
    """A 500 because etcd did not answer: it comes after fleetd's etcd timeout."""


class DropConnection(Exception):
    """The handler panicked: Go's http server closes the connection, no reply."""


def encode_token(limit: int, page: int) -> str:
    """fleet's page token: base64url (padded) of two little-endian uint16."""
    return base64.urlsafe_b64encode(struct.pack("<HH", limit, page)).decode()


def decode_token(value: str, token_limit: int) -> tuple[int, int]:
    """Parse a token as fleet does; RequestError(400) with Go's messages."""
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    stripped = value.rstrip("=")
    for i, char in enumerate(stripped):
        if char not in alphabet:
            raise RequestError(400, f"illegal base64 data at input byte {i}")
    if len(value) % 4 or len(value) - len(stripped) > 2 or len(stripped) % 4 == 1:
        raise RequestError(400, f"illegal base64 data at input byte {len(stripped)}")
    try:
        raw = base64.urlsafe_b64decode(value)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"illegal base64 data at input byte {len(stripped)}") from exc
    if len(raw) < 4:
        raise RequestError(400, "EOF" if not raw else "unexpected EOF")
    limit, page = struct.unpack("<HH", raw[:4])
    if limit != token_limit:
        raise RequestError(400, f"token limit must be {token_limit}")
    if page == 0:
        raise RequestError(400, "token page must be greater than zero")
    return limit, page


def validate_name(name: str) -> None:
    """fleet's ValidateName (systemd's unit_name_is_valid)."""
    if not name:
        raise RequestError(400, "unit name cannot be empty")
    if len(name) > 256:
        raise RequestError(400, "unit name exceeds maximum length (256)")
    dot = name.rfind(".")
    if dot == -1:
        raise RequestError(400, 'unit name must contain "."')
    if dot == len(name) - 1:
        raise RequestError(400, 'unit name cannot end in "."')
    suffix = name[dot + 1:]
    if suffix not in UNIT_TYPES:
        raise RequestError(400, f"invalid unit type: {go_quote(suffix)}")
    for char in name[:dot]:
        if char not in NAME_CHARS:
            raise RequestError(400, f"invalid character {char!r} in unit name")
    if name.startswith("@"):
        raise RequestError(400, 'unit name cannot start in "@"')


def is_template(name: str) -> bool:
    stem = name.rsplit(".", 1)[0]
    return stem.endswith("@")


def serialize(options: list[dict[str, str]]) -> str:
    """go-systemd's Serialize: sections in order of first appearance, options in order."""
    sections: dict[str, list[dict[str, str]]] = {}
    for opt in options:
        sections.setdefault(opt["section"], []).append(opt)
    parts = []
    for section, opts in sections.items():
        lines = [f"[{section}]"] + [f"{o['name']}={o['value']}" for o in opts]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def unit_hash(options: list[dict[str, str]]) -> str:
    return hashlib.sha1(serialize(options).encode()).hexdigest()


def fleet_values(options: list[dict[str, str]], *names: str) -> list[str]:
    return [o["value"] for o in options if o["section"] == "X-Fleet" and o["name"] in names]


def truthy(value: str) -> bool:
    return value.lower() in ("true", "yes", "1", "on", "t")


@dataclass
class Requirements:
    """What ``[X-Fleet]`` asks of a machine."""

    is_global: bool
    metadata: dict[str, set[str]]
    conflicts: list[str]
    peers: list[str]
    replaces: list[str]
    machine_id: str | None

    @classmethod
    def of(cls, options: list[dict[str, str]]) -> Requirements:
        globals_ = fleet_values(options, "Global")
        metadata: dict[str, set[str]] = {}
        for value in fleet_values(options, "MachineMetadata", "X-ConditionMachineMetadata"):
            for pair in shlex.split(value):
                key, _, wanted = pair.partition("=")
                if key and wanted:
                    metadata.setdefault(key, set()).add(wanted)
        ids = fleet_values(options, "MachineID", "X-ConditionMachineID")
        return cls(
            is_global=bool(globals_) and truthy(globals_[-1]), metadata=metadata,
            conflicts=[c for v in fleet_values(options, "Conflicts", "X-Conflicts")
                       for c in v.split()],
            peers=[p for v in fleet_values(options, "MachineOf", "X-ConditionMachineOf")
                   for p in v.split()],
            replaces=[r for v in fleet_values(options, "Replaces") for r in v.split()],
            machine_id=ids[-1] if ids else None)

    def fits(self, machine: Machine) -> bool:
        return all(machine.metadata.get(k) in wanted for k, wanted in self.metadata.items())


def validate_options(options: list[dict[str, str]]) -> None:
    """fleet's ValidateOptions: a parseable unit file and compatible requirements."""
    for line in serialize(options).split("\n"):
        if len(line) > LINE_MAX:
            raise RequestError(400, f"line too long (max {LINE_MAX} bytes)")
    for opt in options:
        if any("\n" in opt[k] for k in ("section", "name", "value")):
            raise RequestError(400, "unable to find end of section")
    req = Requirements.of(options)
    for peer in req.peers:
        for conflict in req.conflicts:
            if fnmatch.fnmatchcase(peer, conflict):
                raise RequestError(400, f"unresolvable requirements: peer {go_quote(peer)} "
                                        f"matches conflict {go_quote(conflict)}")
        for replace in req.replaces:
            if fnmatch.fnmatchcase(peer, replace):
                raise RequestError(400, f"unresolvable requirements: peer {go_quote(peer)} "
                                        f"matches replace {go_quote(replace)}")
    # fleetd's switch, in its order: the first pair that applies is the answer
    checks = [
        (req.machine_id and req.peers, "MachineID cannot be used with Peers"),
        (req.machine_id and req.conflicts, "MachineID cannot be used with Conflicts"),
        (req.machine_id and req.is_global, "MachineID cannot be used with Global"),
        (req.machine_id and req.replaces, "MachineID cannot be used with Replaces"),
        (req.is_global and req.peers, "Global cannot be used with Peers"),
        (req.is_global and req.conflicts, "Global cannot be used with Conflicts"),
        (req.is_global and req.replaces, "Global cannot be used with Replaces"),
        (req.conflicts and req.replaces, "Conflicts cannot be used with Replaces"),
    ]
    for bad, message in checks:
        if bad:
            raise RequestError(400, message)


def decode_unit(body: bytes) -> dict[str, Any]:
    """Decode a schema.Unit as Go's json.Decoder does (case-insensitive fields)."""
    text = body.decode("utf-8", "replace").lstrip()
    if not text:
        raise RequestError(400, "unable to decode body: EOF")
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as exc:
        char = text[exc.pos] if exc.pos < len(text) else ""
        detail = (f"invalid character {char!r} looking for beginning of value" if char
                  else "unexpected EOF")
        raise RequestError(400, f"unable to decode body: {detail}") from exc
    kinds = {dict: "object", list: "array", str: "string", bool: "bool", int: "number",
             float: "number"}

    def mismatch(got: Any, want: str) -> RequestError:
        return RequestError(400, "unable to decode body: json: cannot unmarshal "
                                 f"{kinds.get(type(got), 'null')} into Go value of type {want}")

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise mismatch(value, "schema.Unit")
    fields = {"name": "name", "options": "options", "desiredstate": "desiredState",
              "currentstate": "currentState", "machineid": "machineID"}
    unit: dict[str, Any] = {}
    for key, item in value.items():
        name = fields.get(key.lower())
        if name is None or item is None:
            continue
        if name == "options":
            if not isinstance(item, list):
                raise mismatch(item, "[]*schema.UnitOption")
            opts = []
            for entry in item:
                if entry is None:
                    continue
                if not isinstance(entry, dict):
                    raise mismatch(entry, "schema.UnitOption")
                opt = {"section": "", "name": "", "value": ""}
                for k, v in entry.items():
                    if k.lower() in opt and v is not None:
                        if not isinstance(v, str):
                            raise mismatch(v, "string")
                        opt[k.lower()] = v
                opts.append(opt)
            unit["options"] = opts
        else:
            if not isinstance(item, str):
                raise mismatch(item, "string")
            unit[name] = item
    return unit


# ---------------------------------------------------------------- the cluster


@dataclass
class Machine:
    id: str
    primary_ip: str
    metadata: dict[str, str] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        return omitempty(id=self.id, metadata=dict(sorted(self.metadata.items())),
                         primaryIP=self.primary_ip)


Span = float | tuple[float, float]  # seconds, or a range drawn from uniformly each time

# a real fleetd v1.0.0's timings, as measured against one (seconds)
REALISTIC: dict[str, Span] = {
    "schedule_delay": 1.0,        # PUT launched -> machineID set
    "launch_delay": 3.5,          # machineID set -> currentState launched, systemd active
    "activation_delay": 0.0,      # launched -> active: seconds under load (systemd starting)
    "linger": (1.0, 2.0),         # PUT inactive / DELETE -> the state entry is gone
    "etcd_error_delay": 1.0,      # each 500 while etcd is down takes this long to come
    "etcd_grace": (15.0, 25.0),   # etcd down -> 500s turn into 503s
    "recovery_lag": (4.0, 14.0),  # etcd back -> fleetd answers again
    "state_loss": 24.0,           # etcd restarted -> every unit state is back
}


@dataclass
class Timings:
    """How long the stand-in takes for what a real fleetd does over time.

    Every field is seconds, or a ``(low, high)`` range drawn from uniformly (by
    the server's seeded random) each time it applies. Fields can be changed
    while the server runs.
    """

    schedule_delay: Span
    launch_delay: Span
    activation_delay: Span
    linger: Span
    etcd_error_delay: Span
    etcd_grace: Span
    recovery_lag: Span
    state_loss: Span

    @classmethod
    def scaled(cls, scale: float, **overrides: Span | None) -> Timings:
        """The realistic timings times ``scale``, except those given (not None)."""
        values: dict[str, Span] = {}
        for name, real in REALISTIC.items():
            given = overrides.get(name)
            if given is not None:
                values[name] = given
            elif isinstance(real, tuple):
                values[name] = (real[0] * scale, real[1] * scale)
            else:
                values[name] = real * scale
        return cls(**values)


def draw(span: Span, rng: random.Random) -> float:
    return rng.uniform(*span) if isinstance(span, tuple) else float(span)


@dataclass
class Ghost:
    """The state entry of a unit that was unscheduled: shown until ``until``."""

    state: dict[str, Any]
    until: float


@dataclass
class Placement:
    """A unit on one machine: what its agent was told, since when, and systemd's word."""

    target: str  # loaded | launched
    since: float
    failed: bool = False
    exited: bool = False  # its process ended (systemd: inactive/dead) while fleet says launched
    before: str | None = None  # what shows until ``target`` is reached (loaded, or nothing)
    delay: float | None = None  # drawn launch delay (from ``since``)
    activation: float | None = None  # drawn activation delay (from reaching ``target``)


@dataclass
class Unit:
    name: str
    options: list[dict[str, str]]
    desired: str
    placements: dict[str, Placement] = field(default_factory=dict)
    bogus: bool = False
    schedule_at: float = 0.0  # the engine places it from then on (scheduling is asynchronous)

    @property
    def requirements(self) -> Requirements:
        return Requirements.of(self.options)

    @property
    def is_global(self) -> bool:
        return self.requirements.is_global

    @property
    def hash(self) -> str:
        return unit_hash(self.options)


def machine_id(n: int) -> str:
    """A 32-hex machine id like systemd's; ids of machines 1, 2, 3... sort in that order."""
    return f"{n:x}" + hashlib.md5(f"fleet-test-machine-{n}".encode()).hexdigest()[len(f"{n:x}"):]


def default_machines() -> list[Machine]:
    """Three machines on 127.0.0.1-3 in two zones; two have role=web."""
    return [
        Machine(machine_id(1), "127.0.0.1", {"az": "us-east-1a", "role": "web"}),
        Machine(machine_id(2), "127.0.0.2", {"az": "us-east-1b", "role": "web"}),
        Machine(machine_id(3), "127.0.0.3", {"az": "us-east-1c", "role": "worker"}),
    ]


class Cluster:
    """fleet's registry, engine and agents, in memory. Call methods with ``lock`` held."""

    def __init__(self, machines: list[Machine], timings: Timings, rng: random.Random) -> None:
        self.machines = {m.id: m for m in machines}
        self.units: dict[str, Unit] = {}
        self.timings = timings
        self.rng = rng
        self.failing: list[str] = []  # globs of units whose process fails once launched
        self.ghosts: dict[tuple[str, str], Ghost] = {}  # (unit, machine): a lingering state
        self.states_lost_until: float | None = None  # after an etcd restart
        self.changed_at = 0.0  # when a machine or a placement last changed
        self.lock = threading.RLock()

    @property
    def launch_delay(self) -> float:
        return draw(self.timings.launch_delay, self.rng)

    # -- engine: place what waits, on each request (fleet's engine reconciles on a timer)
    def reconcile(self, now: float) -> None:
        for unit in self.units.values():
            for mid in [m for m in unit.placements if m not in self.machines]:
                del unit.placements[mid]  # the machine left: its units are rescheduled
                self.changed_at = now
        for unit in sorted(self.units.values(), key=lambda u: u.name):
            if unit.bogus or unit.desired not in ("loaded", "launched") or is_template(unit.name):
                continue
            if now < unit.schedule_at:
                continue  # the engine has not got to it yet
            since = min(now, max(unit.schedule_at, self.changed_at))
            req = unit.requirements
            if req.is_global:
                for machine in self._sorted_machines():
                    if machine.id not in unit.placements and req.fits(machine):
                        unit.placements[machine.id] = Placement(unit.desired, since)
            elif not unit.placements:
                target = self._pick(unit, req)
                if target is not None:
                    unit.placements[target] = Placement(unit.desired, since)

    def _sorted_machines(self) -> list[Machine]:
        return sorted(self.machines.values(), key=lambda m: m.id)

    def _on(self, machine: str) -> list[Unit]:
        return [u for u in self.units.values() if machine in u.placements]

    def _pick(self, unit: Unit, req: Requirements) -> str | None:
        candidates = []
        for machine in self._sorted_machines():
            if req.machine_id and machine.id != req.machine_id:
                continue
            if not req.fits(machine):
                continue
            here = self._on(machine.id)
            if any(fnmatch.fnmatchcase(other.name, pattern) for other in here
                   for pattern in req.conflicts):
                continue
            if any(fnmatch.fnmatchcase(unit.name, pattern) for other in here
                   for pattern in other.requirements.conflicts):
                continue
            if req.peers:
                peers = [self.units.get(p) for p in req.peers]
                if not all(p is not None and machine.id in p.placements for p in peers):
                    continue
            candidates.append((len(here), machine.id))
        return min(candidates)[1] if candidates else None

    # -- what the API shows
    def reached(self, placement: Placement, now: float) -> bool:
        if placement.delay is None:
            placement.delay = self.launch_delay
        return now - placement.since >= placement.delay

    def current_state(self, unit: Unit, now: float) -> str:
        if unit.is_global:
            return "inactive"  # fleet has no single schedule for a global unit
        for placement in unit.placements.values():
            if self.reached(placement, now):
                return placement.target
            return placement.before or "inactive"
        return "inactive"

    def unit_schema(self, unit: Unit, now: float) -> dict[str, Any]:
        machine = None if unit.is_global else next(iter(unit.placements), None)
        return omitempty(currentState=self.current_state(unit, now), desiredState=unit.desired,
                         machineID=machine, name=unit.name, options=[
                             omitempty(name=o["name"], section=o["section"], value=o["value"])
                             for o in unit.options])

    def _systemd(self, unit: Unit, placement: Placement, now: float) -> tuple[str, str] | None:
        """systemd's (active, sub) state of ``unit`` on one machine; None: no state entry."""
        reached = self.reached(placement, now)
        shown = placement.target if reached else placement.before
        if shown is None:
            return None
        if placement.failed or (shown == "launched" and any(
                fnmatch.fnmatchcase(unit.name, glob) for glob in self.failing)):
            return "failed", "failed"
        if shown != "launched" or placement.exited:
            return "inactive", "dead"
        if reached:
            if placement.activation is None:
                placement.activation = draw(self.timings.activation_delay, self.rng)
            starting = now - placement.since - (placement.delay or 0.0)
            if starting < placement.activation / 2:
                return "inactive", "dead"  # loaded, systemd has not begun to start it
            if starting < placement.activation:
                return "activating", "start"
        return "active", "running"

    def states(self, now: float) -> list[dict[str, Any]]:
        if self.states_lost_until is not None:
            if now < self.states_lost_until:
                return []  # etcd restarted: the agents have not published their states again
            self.states_lost_until = None
        shown: dict[tuple[str, str], dict[str, Any]] = {}
        for key, ghost in list(self.ghosts.items()):
            if now >= ghost.until:
                del self.ghosts[key]
            else:
                shown[key] = ghost.state
        for unit in self.units.values():
            for mid, placement in unit.placements.items():
                systemd = self._systemd(unit, placement, now)
                if systemd is not None:
                    shown[(unit.name, mid)] = omitempty(
                        hash=unit.hash, machineID=mid, name=unit.name,
                        systemdActiveState=systemd[0], systemdLoadState="loaded",
                        systemdSubState=systemd[1])
        return [shown[key] for key in sorted(shown)]

    # -- changes
    def unschedule(self, unit: Unit, now: float) -> None:
        """Take ``unit`` off its machines; their state entries linger a while."""
        for mid, placement in unit.placements.items():
            systemd = self._systemd(unit, placement, now)
            if systemd is not None:
                self.ghosts[(unit.name, mid)] = Ghost(omitempty(
                    hash=unit.hash, machineID=mid, name=unit.name,
                    systemdActiveState=systemd[0], systemdLoadState="loaded",
                    systemdSubState=systemd[1]), now + draw(self.timings.linger, self.rng))
        unit.placements.clear()
        self.changed_at = now

    def schedule(self, unit: Unit, now: float) -> None:
        """The engine will place ``unit`` after the scheduling delay."""
        unit.schedule_at = now + draw(self.timings.schedule_delay, self.rng)

    def set_target(self, unit: Unit, state: str, now: float) -> None:
        was = unit.desired
        unit.desired = state
        if state not in STATES:
            unit.bogus = True  # fleetd stores it, then cannot parse the unit again
            return
        if state == "inactive":
            self.unschedule(unit, now)
            return
        if was == "inactive":
            self.schedule(unit, now)
        for placement in unit.placements.values():
            if placement.target != state:
                # loaded -> launched starts the unit (another launch delay, showing
                # loaded meanwhile); launched -> loaded stops it at once
                reached = self.reached(placement, now)
                placement.before = placement.target if reached else placement.before
                placement.delay = self.launch_delay
                placement.since = now if state == "launched" else now - placement.delay
                placement.target, placement.failed, placement.exited = state, False, False
                placement.activation = None


# ---------------------------------------------------------------- HTTP


class Handler(http.server.BaseHTTPRequestHandler):
    """One request against fleet's mux."""

    protocol_version = "HTTP/1.1"
    server: Any
    fleet: FleetServer

    def version_string(self) -> str:
        return f"fleetd/{self.fleet.version}"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: tests read answers, not logs

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        self.fleet = self.server.fleet
        body = self._body()
        try:
            code, headers, payload = self.fleet.answer(self.command, self.path, self.headers,
                                                       body)
        except DropConnection:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        if code not in (204, 304):
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD" and code not in (204, 304):
            self.wfile.write(payload)

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST = do_HEAD = do_OPTIONS = _dispatch


class _TCPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    fleet: FleetServer


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    fleet: FleetServer


class FleetServer:
    """A fake fleetd: ``start()``, then talk to ``endpoint`` or ``unix_endpoint``."""

    def __init__(self, machines: list[Machine] | None = None, *, time_scale: float = 1.0,
                 schedule_delay: Span | None = None, launch_delay: Span | None = None,
                 activation_delay: Span | None = None, linger: Span | None = None,
                 etcd_error_delay: Span | None = None, etcd_grace: Span | None = None,
                 recovery_lag: Span | None = None, state_loss: Span | None = None,
                 seed: int = 0, clock: Callable[[], float] = time.monotonic,
                 token_limit: int = 100, version: str = VERSION,
                 unix_socket: str | os.PathLike[str] | None = None,
                 tls: Any = None) -> None:
        """A stand-in whose timings are a real fleetd's (``REALISTIC``) times
        ``time_scale``, except the ones given here (seconds, or a ``(low, high)`` range)."""
        self.clock = clock  # what "now" is (a test may pass one it advances itself)
        self.tls = tls  # an ssl.SSLContext (server side): serve https on the TCP port
        self.timings = Timings.scaled(
            time_scale, schedule_delay=schedule_delay, launch_delay=launch_delay,
            activation_delay=activation_delay, linger=linger, etcd_error_delay=etcd_error_delay,
            etcd_grace=etcd_grace, recovery_lag=recovery_lag, state_loss=state_loss)
        self.rng = random.Random(seed)
        self.cluster = Cluster(machines if machines is not None else default_machines(),
                               self.timings, self.rng)
        self.token_limit = token_limit
        self.version = version
        self.unix_socket = Path(unix_socket) if unix_socket else None
        self._down_since: float | None = None  # etcd lost (or not recovered from) since
        self._grace = 0.0  # of this outage: 500s, then 503s
        self._recovered_at: float | None = None  # etcd is back: fleetd answers from then on
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._timers: list[threading.Timer] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request

    # -- lifecycle
    def start(self) -> FleetServer:
        tcp = _TCPServer(("127.0.0.1", 0), Handler)
        tcp.fleet = self
        if self.tls is not None:
            tcp.socket = self.tls.wrap_socket(tcp.socket, server_side=True)
        self._servers.append(tcp)
        self.port = tcp.server_address[1]
        if self.unix_socket is not None:
            self.unix_socket.unlink(missing_ok=True)
            unix = _UnixServer(str(self.unix_socket), Handler)
            unix.fleet = self
            self._servers.append(unix)
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name="fake-fleetd", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
        if self.unix_socket is not None:
            self.unix_socket.unlink(missing_ok=True)

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://127.0.0.1:{self.port}"

    @property
    def unix_endpoint(self) -> str:
        assert self.unix_socket is not None, "start the server with unix_socket=PATH"
        return f"unix://{self.unix_socket}"

    # -- test controls
    @property
    def machines(self) -> list[Machine]:
        with self.cluster.lock:
            return sorted(self.cluster.machines.values(), key=lambda m: m.id)

    def set_etcd_down(self, down: bool) -> None:
        """Make fleetd lose (True) or regain (False) its etcd.

        fleetd answers again ``recovery_lag`` after etcd is back (until then as
        while it was down)."""
        with self.cluster.lock:
            now = self.clock()
            if not down:
                if self._down_since is not None and self._recovered_at is None:
                    self._recovered_at = now + draw(self.timings.recovery_lag, self.rng)
            else:
                self._recovered_at = None
                if self._down_since is None:
                    self._down_since = now
                    self._grace = draw(self.timings.etcd_grace, self.rng)

    def restart_etcd(self, downtime: float = 0.0) -> None:
        """fleet's etcd restarts: down for ``downtime`` seconds (0: fleetd does not
        notice), then every unit state is gone for ``state_loss`` seconds while the
        units go on running and ``/units`` shows them as before."""

        def lose_states() -> None:
            with self.cluster.lock:
                self.set_etcd_down(False)
                start = self._recovered_at or self.clock()
                self.cluster.states_lost_until = start + draw(self.timings.state_loss, self.rng)

        if downtime <= 0:
            lose_states()
            return
        self.set_etcd_down(True)
        timer = threading.Timer(downtime, lose_states)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def outage(self, seconds: float) -> None:
        """etcd is unreachable for ``seconds`` from now, then comes back by itself."""
        self.set_etcd_down(True)
        timer = threading.Timer(seconds, self.set_etcd_down, args=(False,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def fail(self, unit: str, machine: str | None = None) -> None:
        """systemd reports ``unit`` failed (on ``machine``, default: every machine it is on)."""
        with self.cluster.lock:
            for mid, placement in self.cluster.units[unit].placements.items():
                if machine in (None, mid):
                    placement.failed = True

    def exit(self, unit: str) -> None:
        """``unit``'s process ends: systemd reports it inactive/dead, fleet still launched."""
        with self.cluster.lock:
            for placement in self.cluster.units[unit].placements.values():
                placement.exited = True

    def fail_on_launch(self, *globs: str) -> None:
        """Units matching ``globs`` fail as soon as they are launched (a crashing process)."""
        with self.cluster.lock:
            self.cluster.failing[:] = globs

    def add_machine(self, machine: Machine) -> None:
        with self.cluster.lock:
            self.cluster.machines[machine.id] = machine
            self.cluster.changed_at = self.clock()

    def remove_machine(self, mid: str) -> None:
        with self.cluster.lock:
            del self.cluster.machines[mid]

    # -- a tiny client for tests that want raw answers
    def api(self, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None,
            raw: bytes | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request to the TCP endpoint; ``(status, headers, body bytes)``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            data = raw if raw is not None else (
                json.dumps(body).encode() if body is not None else None)
            hdrs = dict(headers or {})
            if body is not None and "Content-Type" not in hdrs:
                hdrs["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=hdrs)
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        """GET ``path`` (under /fleet/v1) and decode the JSON answer; asserts 200."""
        status, _, body = self.api("GET", "/fleet/v1" + path)
        assert status == 200, (status, body)
        return json.loads(body)

    def all_units(self) -> list[dict[str, Any]]:
        """Every unit, following nextPageToken."""
        return self._all("/units", "units")

    def all_states(self) -> list[dict[str, Any]]:
        """Every unit state, following nextPageToken."""
        return self._all("/state", "states")

    def _all(self, path: str, key: str) -> list[dict[str, Any]]:
        out, token = [], None
        while True:
            page = self.get(path + (f"?nextPageToken={token}" if token else ""))
            out += page.get(key, [])
            token = page.get("nextPageToken")
            if not token:
                return out

    # -- the API
    def answer(self, method: str, target: str, headers: Any,
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one request, as fleetd v1.0.0 would answer it."""
        url = urllib.parse.urlsplit(target)
        path = urllib.parse.unquote(url.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        self.requests.append((method, target))
        try:
            with self.cluster.lock:
                if self._etcd_phase() == 503:
                    raise RequestError(503, ETCD_MESSAGE)
                return self._route(method, path, query, headers, body)
        except RequestError as err:
            if isinstance(err, EtcdTimeout):  # fleetd's etcd client gives up after a while
                time.sleep(draw(self.timings.etcd_error_delay, self.rng))
            payload = go_json({"error": {"code": err.code, "message": err.message}})
            return err.code, {"Content-Type": "application/json"}, payload

    def _etcd_phase(self) -> int:
        """200 with etcd reachable; 500 while fleetd still tries it; then 503."""
        if self._down_since is None:
            return 200
        now = self.clock()
        if self._recovered_at is not None and now >= self._recovered_at:
            self._down_since = self._recovered_at = None
            return 200
        return 500 if now - self._down_since < self._grace else 503

    def _registry(self) -> float:
        """Touch etcd: 500 with an empty message while it is down; else the time."""
        if self._etcd_phase() != 200:
            raise EtcdTimeout(500)
        now = self.clock()
        self.cluster.reconcile(now)
        return now

    def _route(self, method: str, path: str, query: dict[str, list[str]], headers: Any,
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        for prefix in ("/fleet/v1", "/v1-alpha"):
            if path == prefix:
                raise RequestError(405)
            if not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix):]
            if rest == "/discovery":
                if method != "GET":
                    raise RequestError(405, "only GET supported against this resource")
                return 200, {"Content-Type": "application/json"}, DISCOVERY_JSON.encode()
            if rest == "/machines":
                return self._machines(method, query, body)
            for resource in ("units", "state"):
                base = f"/{resource}"
                if rest == base:
                    if method != "GET":
                        raise RequestError(405, "only GET supported against this resource")
                    return self._list(resource, query)
                if rest.startswith(base + "/"):
                    item = rest[len(base) + 1:]
                    if not item or "/" in item:
                        raise RequestError(404)
                    if resource == "state":
                        if method != "GET":
                            raise RequestError(405, "only GET supported against this resource")
                        return self._state(item)
                    return self._unit(method, item, headers, body)
            break
        raise RequestError(405 if path == "/" else 404)

    def _page(self, query: dict[str, list[str]]) -> tuple[int, int]:
        values = query.get("nextPageToken", [])
        if len(values) > 1:
            raise RequestError(400, "too many values for page token")
        if not values:
            return self.token_limit, 1
        return decode_token(values[0], self.token_limit)

    def _paged(self, key: str, items: list[Any], token: tuple[int, int]) -> bytes:
        limit, page = token
        start, stop = (page - 1) * limit, page * limit
        chosen, next_token = [], None
        if start < len(items):
            if stop > len(items):
                stop = len(items)
            else:
                next_token = encode_token(limit, page + 1)
            chosen = items[start:stop]
        # Go's generated structs: fields in alphabetical order, all omitempty
        if key == "machines":
            return go_json(omitempty(machines=chosen, nextPageToken=next_token))
        return go_json(omitempty(nextPageToken=next_token, **{key: chosen}))

    def _list(self, resource: str, query: dict[str, list[str]]) -> tuple[int, dict, bytes]:
        token = self._page(query)
        now = self._registry()
        if resource == "units":
            units = sorted(self.cluster.units.values(), key=lambda u: u.name)
            items = [self.cluster.unit_schema(u, now) for u in units if not u.bogus]
            return 200, {"Content-Type": "application/json"}, self._paged("units", items, token)
        machine = next(iter(query.get("machineID", [])), "")
        unit = next(iter(query.get("unitName", [])), "")
        states = [s for s in self.cluster.states(now)
                  if (not machine or s["machineID"] == machine) and (not unit or s["name"] == unit)]
        return 200, {"Content-Type": "application/json"}, self._paged("states", states, token)

    def _state(self, name: str) -> tuple[int, dict, bytes]:
        now = self._registry()
        for state in self.cluster.states(now):
            if state["name"] == name:
                return 200, {"Content-Type": "application/json"}, go_json(state)
        raise DropConnection()  # fleetd dereferences a nil state and panics

    def _machines(self, method: str, query: dict[str, list[str]],
                  body: bytes) -> tuple[int, dict, bytes]:
        if method == "GET":
            token = self._page(query)
            self._registry()
            items = [m.schema() for m in sorted(self.cluster.machines.values(),
                                                key=lambda m: m.id)]
            return 200, {"Content-Type": "application/json"}, self._paged("machines", items,
                                                                         token)
        if method != "PATCH":
            raise RequestError(405, "only GET and PATCH supported against this resource")
        try:
            ops = json.loads(body.decode() or "null")
        except ValueError as exc:
            raise RequestError(400, "invalid character looking for beginning of value") from exc
        if not isinstance(ops, list):
            raise RequestError(400, "json: cannot unmarshal object into Go value of type "
                                    "[]api.machineMetadataOp")
        parsed = []
        for op in ops:
            if not isinstance(op, dict):
                raise RequestError(400, "json: cannot unmarshal into Go value of type "
                                        "api.machineMetadataOp")
            value = op.get("value")
            if value is not None and not isinstance(value, dict):
                raise RequestError(400, "json: cannot unmarshal string into Go struct field "
                                        "machineMetadataOp.Value of type map[string]string")
            parsed.append((op.get("op"), op.get("path") or "", (value or {}).get("value", "")))
        for operation, path, value in parsed:
            if operation not in ("add", "remove", "replace"):
                raise RequestError(400, "invalid op: expect add, remove, or replace")
            if not METADATA_PATH.match(path):
                raise RequestError(400, "machine metadata path invalid")
            if operation != "remove" and not value:
                raise RequestError(400, "invalid value: add and replace require a value")
        self.cluster.changed_at = self._registry()
        for operation, path, value in parsed:
            match = METADATA_PATH.match(path)
            assert match is not None
            machine = self.cluster.machines.get(match.group(1))
            if machine is None:
                continue  # fleetd writes the key for a machine that is not there
            if operation == "remove":
                machine.metadata.pop(match.group(2), None)
            else:
                machine.metadata[match.group(2)] = value
        return 204, {"Content-Type": "application/json"}, b""

    def _unit(self, method: str, name: str, headers: Any,
              body: bytes) -> tuple[int, dict, bytes]:
        if method == "GET":
            now = self._registry()
            unit = self._existing(name)
            if unit is None:
                raise RequestError(404, "unit does not exist")
            return 200, {"Content-Type": "application/json"}, go_json(
                self.cluster.unit_schema(unit, now))
        if method == "DELETE":
            now = self._registry()
            unit = self._existing(name)
            if unit is None:
                raise RequestError(404, "unit does not exist")
            self.cluster.unschedule(unit, now)
            del self.cluster.units[name]
            return 204, {}, b""
        if method == "PUT":
            return self._put(name, headers, body)
        raise RequestError(405, "only GET, PUT and DELETE supported against this resource")

    def _existing(self, name: str) -> Unit | None:
        unit = self.cluster.units.get(name)
        if unit is not None and unit.bogus:
            raise RequestError(500)  # its desiredState cannot be parsed any more
        return unit

    def _put(self, name: str, headers: Any, body: bytes) -> tuple[int, dict, bytes]:
        types = headers.get_all("Content-Type") or []
        if len(types) != 1:
            raise RequestError(415, f"expected 1 Content-Type, got {len(types)}")
        if types[0].split(";", 1)[0].strip() != "application/json":
            raise RequestError(415, "only acceptable Content-Type is application/json")
        su = decode_unit(body)
        su.setdefault("name", name)
        if su["name"] != name:
            raise RequestError(400, f"name in URL {go_quote(name)} differs from unit name in "
                                    f"request body {go_quote(su['name'])}")
        validate_name(name)
        now = self._registry()
        existing = self._existing(name)
        options = su.get("options") or []
        desired = su.get("desiredState", "")
        if existing is None:
            if not options:
                raise RequestError(409, "unit does not exist and options field empty")
            validate_options(options)
            if desired and desired not in STATES:
                raise RequestError(500)  # CreateUnit parses the state; the error is internal
            unit = self.cluster.units[name] = Unit(name, options, desired or "inactive")
            if unit.desired != "inactive":
                self.cluster.schedule(unit, now)
            self.cluster.reconcile(now)
            return 201, {}, b""
        if options and unit_hash(options) != existing.hash:
            validate_options(options)
            if desired and desired not in STATES:
                raise RequestError(500)
            self.cluster.unschedule(existing, now)  # the new unit file is scheduled afresh
            existing.options = options
            existing.desired = "inactive"
            self.cluster.set_target(existing, desired or "inactive", now)
            self.cluster.reconcile(now)
            return 201, {}, b""
        if not desired:
            raise RequestError(409, "must provide DesiredState to update existing unit")
        if is_template(name) and desired != "inactive":
            raise RequestError(400, f"cannot activate template {go_quote(name)}")
        self.cluster.set_target(existing, desired, now)
        self.cluster.reconcile(now)
        return 204, {}, b""
