"""The ``fleet`` actuator: instances are fleet units on a CoreOS cluster.

The agent talks to fleet's HTTP API v1 (``endpoint``: ``unix:///var/run/fleet.sock``
or ``http(s)://host:port``) and fleet places the units on its machines. The
service's unit is systemd unit text in the actuator block's ``unit:`` key::

    actuator:
      type: fleet
      endpoint: unix:///var/run/fleet.sock
      unit: |
        [Unit]
        Description={service} slot {slot}
        [Service]
        ExecStartPre=-/usr/bin/docker rm -f {instance}
        ExecStart=/usr/bin/docker run --rm --name {instance} -p {port}:8080 {image}
        ExecStop=/usr/bin/docker stop {instance}
        [X-Fleet]
        MachineMetadata=role=web
        Conflicts={service}-*

**Units.** One unit per slot, named ``<instance>.service`` where the instance
name (``<cluster>-<service>-<slot>-<version>``) carries the shipmate facts.
The unit text is parsed like systemd does (sections, ``Key=Value``, repeated
keys kept in order, ``\\`` continuations joined with a space, ``#``/``;``
comments) into fleet's list of options, with ``{port}``, ``{instance}``,
``{service}``, ``{slot}``, ``{version}``, ``{cluster}``, ``{image}`` and
``{command}`` filled in per slot (other braces are left alone). The service's
``env`` becomes ``Environment=`` lines of ``[Service]`` (visible in ``fleetctl
cat``: keep secrets in an ``EnvironmentFile=`` on the machines). The agent adds
an ``[X-Shipmate]`` section (``Cluster``, ``Service``, ``Slot``, ``Version``,
``Port``): systemd ignores ``X-`` sections and fleet stores them as they are,
so listing reads the facts back from the unit itself rather than parsing its
name; units without it, or of another cluster, are never touched.

**Listing.** ``list()`` reads ``/machines``, ``/units`` and ``/state``, each
page after page (an empty last page included). Any error raises, so the loop
freezes the service instead of acting on partial data: while fleet answers
5xx (its etcd is down) nothing is started or stopped, and the agent carries on
when fleet answers again. An instance's host is the ``primaryIP`` of the
machine the unit runs on. A unit is *running* unless it failed
(``systemdActiveState`` failed), exited or is no longer meant to run
(``desiredState`` not launched): those are reported as not running and the
loop replaces them. A unit still on its way (not scheduled yet, or launched
while systemd still starts it: activating, or the transitional
loaded/inactive/dead a loaded machine shows first) counts as running, so the
loop never kills a launch in progress nor counts it as a crash. A launched
unit that systemd reports inactive has *exited* only if the agent saw it active
before, or it has stayed inactive for longer than ``launch_timeout``. A unit
is healthy only once fleet reports it launched and systemd active, and then
the service's ``health`` check (HTTP/TCP on primaryIP:port) decides.

**Lost states.** After fleet's etcd restarts, fleet shows no unit states for
a while (about 24 s) although the units run on. A unit whose state goes
missing keeps the last state the agent saw for up to ``state_memory`` (60 s),
so its announcement stays and its health check goes on deciding; after that
its state is unknown: still running (never replaced for it), but not healthy.

**Start and stop.** ``start`` PUTs the unit with ``desiredState: launched``,
then polls ``/units/NAME`` and ``/state?unitName=NAME`` until it is launched
and active; it fails at once if systemd reports it failed, and after
``launch_timeout`` otherwise, saying where it got stuck (the unit stays in
fleet; the next pass replaces it if it failed). ``stop`` sets
``desiredState: inactive``, waits up to the grace period for its state to go,
then DELETEs it. Only ``inactive``, ``loaded`` and ``launched`` are ever sent:
fleetd accepts any other value and then answers 500 for that unit forever.
``GET /state/NAME`` is never used (fleetd drops the connection when there is no
state).

**Global units** (``global: true``, or ``Global=true`` in ``[X-Fleet]``): one
unit, ``<cluster>-<service>-global-<version>.service``, that fleet runs on every
machine matching its ``MachineMetadata`` (the 1:1 mapping to an Auto Scaling
Group: use the ``asg`` source with ``per_instance: 1``). ``list()`` reports one
instance per machine state of the unit, in slots 0, 1, ... by machine id, all on
the service's ``port``, named like any instance (``<cluster>-<service>-<slot>-
<version>``, so announcements and status read them as usual). The desired count
is informational: fleet, not the count, decides where it runs. Starting any
slot submits the unit and waits until it is active on every matching machine;
a slot beyond the machines that match fails with a message saying so (it comes
when a machine joins). Only a count of 0 removes the unit (stopping slot 0
destroys it everywhere); fleet cannot stop a global unit on one machine, so
stopping another slot is refused with an error. A failed machine instance of a
global unit stays listed as running but unhealthy (not announced): systemd's
``Restart=`` or an operator deals with it, since replacing it would restart
every machine's copy.
"""

from __future__ import annotations

import http.client
import json
import logging
import shlex
import socket
import ssl
import threading
import time
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_fixed,
)

from agent import (
    Actuator,
    Duration,
    Instance,
    InstanceSpec,
    TLSConfig,
    TypeConfig,
    fill,
    hookimpl,
    is_image_reference,
    probe,
)

log = logging.getLogger("shipmate.fleet")

API = "/fleet/v1"
STATES = ("inactive", "loaded", "launched")
SECTION = "X-Shipmate"
FLEET_KEYS = ("Global", "MachineMetadata", "Conflicts", "MachineOf", "MachineID", "Replaces",
              "X-ConditionMachineMetadata", "X-Conflicts", "X-ConditionMachineOf",
              "X-ConditionMachineID")
PAGES_MAX = 10_000


class FleetError(Exception):
    """fleet refused or failed a request; the message names the unit and fleet's words.

    ``status`` is fleet's HTTP status (None if it did not answer); ``transient``
    says whether asking again later may help (fleet unreachable or 5xx).
    """

    def __init__(self, message: str, status: int | None = None,
                 transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


# ---------------------------------------------------------------- unit text


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """Systemd unit text as fleet's options: ``(section, name, value)`` in file order.

    Comments (``#``, ``;``) and blank lines are skipped; a line ending in ``\\``
    continues on the next one (joined with a space). Raises ValueError naming
    the line of the unit text that is wrong.
    """
    logical: list[tuple[int, str]] = []
    buf: str | None = None
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if buf is None:
            if not line or line[0] in "#;":
                continue
            buf, start = line, number
        elif line and line[0] in "#;":
            continue  # systemd ignores comments inside a continued line
        else:
            buf = f"{buf} {line}" if line else buf
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        logical.append((start, buf))
        buf = None
    if buf is not None:
        logical.append((start, buf))
    options: list[tuple[str, str, str]] = []
    section: str | None = None
    for number, line in logical:
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3 or "[" in line[1:-1] or "]" in line[1:-1]:
                raise ValueError(f"line {number} of the unit: {line!r} is not a [Section] header")
            section = line[1:-1]
            continue
        name, eq, value = line.partition("=")
        name = name.strip()
        if not eq or not name or any(c.isspace() for c in name):
            raise ValueError(f"line {number} of the unit: {line!r} is not Key=Value "
                             "or a [Section] header")
        if section is None:
            raise ValueError(f"line {number} of the unit: {name}= comes before any [Section]")
        options.append((section, name, value.strip()))
    return options


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("true", "yes", "1", "on", "t")


def _fleet_values(options: list[tuple[str, str, str]], *names: str) -> list[str]:
    return [v for s, n, v in options if s == "X-Fleet" and n in names]


def _is_global(options: list[tuple[str, str, str]]) -> bool:
    values = _fleet_values(options, "Global")
    return bool(values) and _truthy(values[-1])  # fleet: the last value wins


def _metadata(options: list[tuple[str, str, str]]) -> dict[str, set[str]]:
    """``MachineMetadata`` as fleet reads it: keys ANDed, values of one key ORed."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for value in _fleet_values(options, "MachineMetadata", "X-ConditionMachineMetadata"):
        for pair in shlex.split(value):
            key, _, val = pair.partition("=")
            if key and val:
                wanted[key].add(val)
    return wanted


def _fits(machine: dict[str, Any], wanted: dict[str, set[str]]) -> bool:
    metadata = machine.get("metadata") or {}
    return all(metadata.get(key) in values for key, values in wanted.items())


def _quote_env(key: str, value: str) -> str:
    """One ``Environment=`` word: quoted, with systemd's ``%`` specifiers escaped."""
    text = f"{key}={value}".replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{text}"'


# ---------------------------------------------------------------- config


class FleetConfig(TypeConfig):
    shape_fields = ("unit", "global_")
    endpoint: str = "unix:///var/run/fleet.sock"
    "fleet's API: unix:///path/to/fleet.sock or http(s)://host:port"
    timeout: Duration = Field(10.0, gt=0)
    "how long one request to fleet may take"
    launch_timeout: Duration = Field(120.0, gt=0)
    "how long a start waits for the unit to be launched and active"
    poll: Duration = Field(0.5, gt=0)
    "how often a start or stop asks fleet how the unit is doing"
    state_memory: Duration = Field(60.0, ge=0)
    "how long a unit whose state fleet lost (its etcd restarted) keeps the last state seen"
    unit: str
    "systemd unit text; {port} {instance} {service} {slot} {version} {cluster} {image} {command}"
    global_: bool = Field(False, alias="global")
    "one unit that fleet runs on every (matching) machine; the count is informational"
    tls: TLSConfig = TLSConfig()
    "for an https:// endpoint: ca, cert, key (absolute paths), verify"

    @field_validator("tls")
    @classmethod
    def _absolute(cls, tls: TLSConfig) -> TLSConfig:
        for name in ("ca", "cert", "key"):
            path = getattr(tls, name)
            if path is not None and not path.is_absolute():
                raise ValueError(f"tls.{name} must be an absolute path")
        return tls

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        url = urllib.parse.urlsplit(value)
        if url.scheme == "unix":
            if not (url.netloc + url.path):
                raise ValueError("a unix endpoint needs a socket path: unix:///var/run/fleet.sock")
        elif url.scheme in ("http", "https"):
            if not url.hostname:
                raise ValueError(f"{url.scheme} endpoint needs a host: {url.scheme}://host:port")
        else:
            raise ValueError("endpoint must start with unix://, http:// or https://")
        return value

    @field_validator("unit")
    @classmethod
    def _unit(cls, text: str) -> str:
        options = parse_unit(text)
        if not any(s == "Service" and n == "ExecStart" for s, n, _ in options):
            raise ValueError("the unit has no ExecStart= in a [Service] section: "
                             "fleet would have nothing to run")
        if any(s == SECTION for s, _, _ in options):
            raise ValueError(f"[{SECTION}] is written by the agent; remove it from the unit")
        for section, name, _ in options:
            if section == "X-Fleet" and name not in FLEET_KEYS:
                raise ValueError(f"[X-Fleet] has no option {name!r}; fleet knows "
                                 + ", ".join(FLEET_KEYS[:6]))
        return text

    @model_validator(mode="after")
    def _global(self) -> FleetConfig:
        options = parse_unit(self.unit)
        said = _fleet_values(options, "Global")
        if said and _is_global(options) != self.global_:
            raise ValueError(f"the unit says [X-Fleet] Global={said[-1]} but global is "
                             f"{str(self.global_).lower()}: make them agree")
        if self.global_:
            for key in ("Conflicts", "X-Conflicts", "MachineOf", "X-ConditionMachineOf",
                        "MachineID", "X-ConditionMachineID", "Replaces"):
                if _fleet_values(options, key):
                    raise ValueError(f"a global unit cannot use [X-Fleet] {key}= (fleet "
                                     "rejects it): it runs on every matching machine")
        if _fleet_values(options, "Replaces"):  # fleetd's ValidateOptions answers 400 to these
            for key, name in (("Conflicts", "Conflicts"), ("X-Conflicts", "Conflicts"),
                              ("MachineID", "MachineID"), ("X-ConditionMachineID", "MachineID")):
                if _fleet_values(options, key):
                    raise ValueError(f"[X-Fleet] {key}= cannot be used with Replaces= (fleet "
                                     f"answers 400 \"{name} cannot be used with Replaces\")")
        return self


# ---------------------------------------------------------------- HTTP


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class FleetAPI:
    """fleet's HTTP API v1: one connection per request (thread-safe), errors in words."""

    def __init__(self, endpoint: str, timeout: float, tls: TLSConfig | None = None) -> None:
        self.url = urllib.parse.urlsplit(endpoint)
        self.timeout = timeout
        self.tls = tls or TLSConfig()
        self._context: ssl.SSLContext | None = None
        if self.url.scheme == "unix":
            self.where = f"unix://{self.url.netloc}{self.url.path}"
        else:  # never show credentials from the URL in messages
            port = f":{self.url.port}" if self.url.port else ""
            self.where = f"{self.url.scheme}://{self.url.hostname}{port}{self.url.path}"
        self.base = (self.url.path.rstrip("/") if self.url.scheme != "unix" else "") + API

    def _connection(self) -> http.client.HTTPConnection:
        if self.url.scheme == "unix":
            return _UnixConnection(self.url.netloc + self.url.path, self.timeout)
        if self.url.scheme == "https":
            return http.client.HTTPSConnection(self.url.hostname or "", self.url.port,
                                               timeout=self.timeout, context=self._ssl())
        return http.client.HTTPConnection(self.url.hostname or "", self.url.port,
                                          timeout=self.timeout)

    def _ssl(self) -> ssl.SSLContext:
        if self._context is None:
            try:
                self._context = self.tls.context()
            except (OSError, ssl.SSLError) as exc:
                raise FleetError(f"fleet at {self.where}: tls: cannot load the certificates: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
        return self._context

    def request(self, method: str, path: str, body: Any = None,
                what: str | None = None) -> tuple[int, Any]:
        """``(status, decoded JSON or None)`` for a 2xx answer; FleetError for anything else.

        :param what: what the request is about, for messages ("unit web.service").
        """
        what = what or path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, self.base + path, body=data, headers=headers)
            response = conn.getresponse()
            status, raw = response.status, response.read()
        except http.client.RemoteDisconnected as exc:
            raise FleetError(f"fleet at {self.where} closed the connection without answering "
                             f"{method} {what}", transient=True) from exc
        except TimeoutError as exc:
            raise FleetError(f"fleet at {self.where} did not answer {method} {what} within "
                             f"{self.timeout:g}s", transient=True) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise FleetError(f"cannot reach fleet at {self.where} ({method} {what}): "
                             f"{exc}", transient=True) from exc
        finally:
            conn.close()
        if 200 <= status < 300:
            try:
                return status, json.loads(raw) if raw.strip() else None
            except ValueError as exc:
                raise FleetError(f"fleet at {self.where} answered {method} {what} with "
                                 f"something that is not JSON: {raw[:120]!r}") from exc
        raise self._error(method, what, status, raw)

    def _error(self, method: str, what: str, status: int, raw: bytes) -> FleetError:
        message = ""
        try:
            message = str(json.loads(raw)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace").strip()[:200]
        said = f": {message}" if message else ""
        if status == 503:
            text = (f"fleet at {self.where} is unavailable (503{said}) on {method} {what}; "
                    "nothing changes until it answers again")
        elif status >= 500 and not message:
            text = (f"fleet at {self.where} failed {method} {what} with {status} and no message "
                    "(an internal error: its etcd may be unreachable, or the unit holds a "
                    "state fleet cannot read)")
        elif status == 404:
            text = f"fleet has no {what} (404{said})"
        elif status == 409:
            text = f"fleet refused {method} {what} (409 Conflict{said})"
        elif status == 415:
            text = f"fleet refused {method} {what} (415 Unsupported Media Type{said})"
        elif status == 400:
            text = f"fleet rejected {method} {what} (400 Bad Request{said})"
        else:
            text = f"fleet answered {status} to {method} {what}{said}"
        return FleetError(text, status, transient=status >= 500)

    def pages(self, path: str, key: str, query: dict[str, str] | None = None) -> list[Any]:
        """Every item of a paged list, following ``nextPageToken`` to the end."""
        items: list[Any] = []
        seen: set[str] = set()
        token = None
        for _ in range(PAGES_MAX):
            params = dict(query or {})
            if token:
                params["nextPageToken"] = token
            target = path + ("?" + urllib.parse.urlencode(params) if params else "")
            _, page = self.request("GET", target, what=path)
            page = page or {}  # an empty page is {} (every field is omitempty)
            items += page.get(key) or []
            token = page.get("nextPageToken")
            if not token:
                return items
            if token in seen:
                raise FleetError(f"fleet at {self.where} repeated page token {token!r} on {path}")
            seen.add(token)
        raise FleetError(f"fleet at {self.where} gave more than {PAGES_MAX} pages of {path}")


# ---------------------------------------------------------------- the actuator


@dataclass(frozen=True)
class FleetRef:
    """What the actuator keeps of a listed instance (``Instance.ref``)."""

    unit: str
    machine: str | None
    desired: str
    current: str | None
    systemd: str  # load/active/sub, or "" with no state yet
    active: bool
    is_global: bool
    remembered: bool = False  # fleet lost the state: ``systemd`` is the last one seen


@dataclass
class _Seen:
    """What the actuator last saw of a unit on one machine."""

    state: dict[str, Any]
    at: float  # when fleet last showed a state
    was_active: bool = False  # systemd reported it active at some point
    inactive_since: float | None = None  # systemd has reported it inactive since
    missing: str = ""  # "remembered" or "unknown" while fleet shows no state (said once each)


def _condition(desired: str, current: str | None, state: dict[str, Any] | None,
               exited: bool = False) -> tuple[bool, bool]:
    """``(running, active)`` of a unit on one machine (see the module docstring).

    ``exited``: a launched unit that systemd reports inactive has ended, rather
    than not being started yet.
    """
    systemd = (state or {}).get("systemdActiveState")
    if desired != "launched" or systemd == "failed":
        return False, False
    if current in ("launched", None) and systemd == "active":
        return True, True
    if current == "launched" and systemd == "inactive" and exited:
        return False, False  # its process ended
    return True, False  # on its way


def _systemd(state: dict[str, Any] | None) -> str:
    if not state:
        return ""
    return "/".join(str(state.get(k, "?")) for k in
                    ("systemdLoadState", "systemdActiveState", "systemdSubState"))


class FleetActuator(Actuator):
    """Runs instances as fleet units through fleet's HTTP API v1."""

    type_name = "fleet"
    Config = FleetConfig

    def __init__(self, config: FleetConfig, context) -> None:
        super().__init__(config, context)
        self.api = FleetAPI(config.endpoint, config.timeout, config.tls)
        self.template = parse_unit(config.unit)
        self.is_global = config.global_ or _is_global(self.template)
        self.parallelism = 8
        self._seen: dict[tuple[str, str], _Seen] = {}  # (unit, machine): its last state
        self._seen_lock = threading.Lock()

    # ---------------------------------------------------------------- names
    def unit_name(self, spec: InstanceSpec) -> str:
        """The fleet unit of ``spec``: ``<instance>.service`` (one per machine if global)."""
        if self.is_global:
            return f"{spec.cluster}-{spec.service}-global-{spec.version}.service"
        return f"{spec.name}.service"

    def options(self, spec: InstanceSpec) -> list[dict[str, str]]:
        """fleet's options for ``spec``: the unit text filled in, env, and ``[X-Shipmate]``."""
        port = spec.port
        if self.is_global and port is not None:
            port -= spec.slot  # one per machine: every machine uses the service's port
        stem = self.unit_name(spec).removesuffix(".service")
        if spec.image and not is_image_reference(spec.image):
            raise FleetError(f"image {spec.image[:80]!r} is not an image reference: it is "
                             "not pasted into the unit")
        values = {"port": "" if port is None else port, "instance": stem,
                  "service": spec.service, "slot": "global" if self.is_global else spec.slot,
                  "version": spec.version, "cluster": spec.cluster, "image": spec.image or "",
                  "command": shlex.join(spec.command) if spec.command else ""}
        out = [{"section": s, "name": n, "value": fill(v, **values)} for s, n, v in self.template]
        if self.is_global and not _fleet_values(self.template, "Global"):
            out.append({"section": "X-Fleet", "name": "Global", "value": "true"})
        for key, value in sorted(spec.env.items()):
            out.append({"section": "Service", "name": "Environment",
                        "value": _quote_env(key, value)})
        facts = {"Cluster": spec.cluster, "Service": spec.service, "Version": spec.version}
        if not self.is_global:
            facts["Slot"] = str(spec.slot)
        if port is not None:
            facts["Port"] = str(port)
        out += [{"section": SECTION, "name": k, "value": v} for k, v in facts.items()]
        return out

    @staticmethod
    def _facts(unit: dict[str, Any]) -> dict[str, str]:
        return {o.get("name", ""): o.get("value", "") for o in unit.get("options") or []
                if o.get("section") == SECTION}

    # ---------------------------------------------------------------- list
    def list(self) -> list[Instance]:
        machines = {m["id"]: m for m in self.api.pages("/machines", "machines")}
        units = self.api.pages("/units", "units")
        states: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for state in self.api.pages("/state", "states"):
            states[state.get("name", "")].append(state)
        now = time.monotonic()
        out: list[Instance] = []
        for unit in units:
            facts = self._facts(unit)
            if facts.get("Cluster") != self.context.cluster:
                continue  # not ours: never touched
            try:
                out += self._instances(unit, facts, machines, states[unit["name"]], now)
            except (KeyError, ValueError) as exc:
                log.warning("fleet unit %s has unreadable [%s] facts (%s): left alone",
                            unit.get("name"), SECTION, exc)
        listed = {unit.get("name") for unit in units}
        with self._seen_lock:  # forget the units that are gone
            for key in [k for k in self._seen if k[0] not in listed]:
                del self._seen[key]
        return out

    def _observe(self, unit: str, mid: str, state: dict[str, Any] | None,
                 now: float) -> tuple[dict[str, Any] | None, bool, bool]:
        """``(state, remembered, exited)`` of ``unit`` on machine ``mid``.

        With no state from fleet, the last one seen stands in for up to
        ``state_memory`` seconds (``remembered``). ``exited``: an inactive
        reading means the unit ended, not that systemd has yet to start it.
        """
        with self._seen_lock:
            seen = self._seen.get((unit, mid))
            remembered = not state
            if state:
                if seen is None:
                    seen = self._seen[(unit, mid)] = _Seen(state, now)
                if seen.missing:
                    log.info("fleet shows the state of unit %s on machine %s again", unit,
                             mid[:8])
                seen.state, seen.at, seen.missing = state, now, ""
                systemd = state.get("systemdActiveState")
                if systemd == "active":
                    seen.was_active, seen.inactive_since = True, None
                elif systemd == "inactive":
                    seen.inactive_since = seen.inactive_since or now
                else:
                    seen.inactive_since = None
            elif seen is None:
                return None, False, False
            elif now - seen.at > self.config.state_memory:
                if seen.missing != "unknown":
                    seen.missing = "unknown"
                    log.warning("fleet has shown no state for unit %s on machine %s for %gs: "
                                "its state is unknown, so it is not healthy (it is not "
                                "replaced for that)", unit, mid[:8], now - seen.at)
                return None, False, False
            elif not seen.missing:
                seen.missing = "remembered"
                log.warning("fleet shows no state for unit %s on machine %s (its etcd "
                            "restarted?): keeping the last one seen, %s, for up to %gs",
                            unit, mid[:8], _systemd(seen.state), self.config.state_memory)
            exited = seen.was_active or (seen.inactive_since is not None and now
                                         - seen.inactive_since >= self.config.launch_timeout)
            return seen.state, remembered, exited

    def _remembered_machines(self, unit: str, now: float) -> list[str]:
        """Machines ``unit`` had a state on within ``state_memory`` (for global units)."""
        with self._seen_lock:
            return [mid for (name, mid), seen in self._seen.items()
                    if name == unit and now - seen.at <= self.config.state_memory]

    def _instances(self, unit: dict[str, Any], facts: dict[str, str],
                   machines: dict[str, dict[str, Any]],
                   states: list[dict[str, Any]], now: float) -> list[Instance]:
        name = unit["name"]
        stem = name.removesuffix(".service")
        port = int(facts["Port"]) if facts.get("Port") else None
        desired, current = unit.get("desiredState", ""), unit.get("currentState")
        common = {"service": facts["Service"], "version": facts["Version"], "port": port,
                  "cluster": self.context.cluster}
        if _is_global([(o.get("section", ""), o.get("name", ""), o.get("value", ""))
                       for o in unit.get("options") or []]):
            by_machine: dict[str, dict[str, Any] | None] = {
                s.get("machineID", ""): s for s in states}
            if desired == "launched":  # machines whose state fleet lost
                for mid in self._remembered_machines(name, now):
                    if mid in machines:
                        by_machine.setdefault(mid, None)
            out = []
            for slot, mid in enumerate(sorted(by_machine)):
                state, remembered, _ = self._observe(name, mid, by_machine[mid], now)
                running, active = _condition(desired, None, state)
                if desired == "launched":
                    running = True  # never replaced per machine (see the module docstring)
                ref = FleetRef(name, mid, desired, None, _systemd(state), active, True,
                               remembered)
                out.append(Instance(name=f"{self.context.cluster}-{facts['Service']}-{slot}-"
                                         f"{facts['Version']}", slot=slot,
                                    host=(machines.get(mid) or {}).get("primaryIP", ""),
                                    running=running, ref=ref, **common))
            return out
        mid = unit.get("machineID")
        state = next((s for s in states if s.get("machineID") == mid), None) if mid else None
        remembered = exited = False
        if mid:
            state, remembered, exited = self._observe(name, mid, state, now)
        running, active = _condition(desired, current, state, exited)
        ref = FleetRef(name, mid, desired, current, _systemd(state), active, False, remembered)
        host = (machines.get(mid) or {}).get("primaryIP", "") if mid else ""
        return [Instance(name=stem, slot=int(facts["Slot"]), host=host, running=running,
                         ref=ref, **common)]

    # ---------------------------------------------------------------- start
    def _set(self, name: str, state: str, options: list[dict[str, str]] | None = None) -> None:
        """PUT ``name`` with ``desiredState`` (and options): the only way states are sent."""
        if state not in STATES:  # fleetd would take it and answer 500 for the unit forever
            raise ValueError(f"refusing to send desiredState {state!r} for unit {name}: "
                             f"only {', '.join(STATES)} are valid")
        body: dict[str, Any] = {"name": name, "desiredState": state}
        if options is not None:
            body["options"] = options
        # the PUT is idempotent, so a transient failure (two starts of one global unit
        # racing to create it, a blip of fleet) is retried a few times
        retrying = Retrying(stop=stop_after_attempt(3), wait=wait_fixed(self.config.poll),
                            retry=retry_if_exception(lambda e: getattr(e, "transient", False)),
                            reraise=True)
        retrying(self.api.request, "PUT", f"/units/{urllib.parse.quote(name)}", body,
                 what=f"unit {name}")

    def _forget(self, unit: str) -> None:
        """Drop what was seen of ``unit``: a unit started again begins afresh."""
        with self._seen_lock:
            for key in [k for k in self._seen if k[0] == unit]:
                del self._seen[key]

    def start(self, spec: InstanceSpec) -> Instance:
        name = self.unit_name(spec)
        if not self.is_global:  # a global unit's other machines keep theirs
            self._forget(name)
        self._set(name, "launched", self.options(spec))
        if self.is_global:
            return self._await_global(name, spec)
        return self._await(name, spec)

    def _wait(self, name: str, check: Any) -> Any:
        """Poll ``check()`` until it returns something, for ``launch_timeout`` seconds.

        ``check(last)`` returns None to keep waiting (setting ``last[0]`` to say
        why) or raises FleetError to give up; a 5xx from fleet is waited out.
        """
        last = ["nothing heard from fleet yet"]

        def attempt() -> Any:
            try:
                return check(last)
            except FleetError as exc:
                if not exc.transient:
                    raise
                last[0] = str(exc)
                return None

        retrying = Retrying(stop=stop_after_delay(self.config.launch_timeout),
                            wait=wait_fixed(self.config.poll),
                            retry=retry_if_result(lambda r: r is None), reraise=True)
        try:
            return retrying(attempt)
        except RetryError:
            raise FleetError(f"unit {name} was not launched and active within "
                             f"{self.config.launch_timeout:g}s: {last[0]}; it stays in fleet "
                             "and the next pass replaces it if it failed") from None

    def _states(self, name: str) -> list[dict[str, Any]]:
        return self.api.pages("/state", "states", {"unitName": name})

    def _await(self, name: str, spec: InstanceSpec) -> Instance:
        def check(last: list[str]) -> Instance | None:
            _, unit = self.api.request("GET", f"/units/{urllib.parse.quote(name)}",
                                       what=f"unit {name}")
            unit = unit or {}
            mid = unit.get("machineID")
            if unit.get("desiredState") != "launched":
                raise FleetError(f"unit {name} was set to {unit.get('desiredState')} while "
                                 "starting (by someone else?)")
            if not mid:
                last[0] = ("not scheduled on any machine yet (does a machine fit its "
                           "[X-Fleet] MachineMetadata, Conflicts, MachineOf?)")
                return None
            state = next((s for s in self._states(name) if s.get("machineID") == mid), None)
            machines = {m["id"]: m for m in self.api.pages("/machines", "machines")}
            host = (machines.get(mid) or {}).get("primaryIP", "")
            where = f"machine {mid[:8]} ({host or 'address unknown'})"
            if (state or {}).get("systemdActiveState") == "failed":
                raise FleetError(f"unit {name} failed on {where}: systemd says "
                                 f"{_systemd(state)}; it stays in fleet and the next pass "
                                 "replaces it")
            running, active = _condition("launched", unit.get("currentState"), state)
            if not active:
                last[0] = (f"on {where}, currentState {unit.get('currentState')}, systemd "
                           f"{_systemd(state) or 'has no state yet'}")
                return None
            ref = FleetRef(name, mid, "launched", "launched", _systemd(state), True, False)
            return Instance(name=spec.name, service=spec.service, slot=spec.slot,
                            version=spec.version, host=host, port=spec.port, running=running,
                            cluster=spec.cluster, ref=ref)

        return self._wait(name, check)

    def _await_global(self, name: str, spec: InstanceSpec) -> Instance:
        wanted = _metadata(self.template)

        def check(last: list[str]) -> Instance | None:
            machines = [m for m in self.api.pages("/machines", "machines") if _fits(m, wanted)]
            if spec.slot >= len(machines):
                raise FleetError(
                    f"global unit {name} runs once per machine and {len(machines)} machine(s) "
                    f"match it, so slot {spec.slot} has no machine: for a global unit the "
                    f"desired count is informational; slot {spec.slot} comes when machine "
                    f"number {spec.slot + 1} joins fleet")
            states = {s.get("machineID"): s for s in self._states(name)}
            waiting = [m for m in machines
                       if (states.get(m["id"]) or {}).get("systemdActiveState") != "active"]
            if waiting:
                last[0] = "not active yet on " + ", ".join(
                    f"{m['id'][:8]} ({m.get('primaryIP', '?')}: "
                    f"{_systemd(states.get(m['id'])) or 'no state'})" for m in waiting)
                return None
            instances = self._instances(
                {"name": name, "desiredState": "launched", "options": self.options(spec)},
                {k: v for k, v in ((o["name"], o["value"]) for o in self.options(spec)
                                   if o["section"] == SECTION)},
                {m["id"]: m for m in machines}, list(states.values()), time.monotonic())
            return next((i for i in instances if i.slot == spec.slot), None)

        return self._wait(name, check)

    # ---------------------------------------------------------------- stop
    def stop(self, instance: Instance, grace: float) -> None:
        ref = instance.ref if isinstance(instance.ref, FleetRef) else None
        name = ref.unit if ref else f"{instance.name}.service"
        if ref is not None and ref.is_global and instance.slot != 0:
            raise FleetError(
                f"fleet cannot stop global unit {name} on one machine ({instance.host}): it "
                "runs on every matching machine; set the count to 0 to remove it everywhere, "
                "or keep the count equal to the number of machines")
        self._forget(name)
        try:
            self._set(name, "inactive")
        except FleetError as exc:
            # fleet answers a state change for a unit it does not have with 409
            # "unit does not exist and options field empty"
            if exc.status in (404, 409) and not self._exists(name):
                return  # already gone
            raise
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                if not self._states(name):
                    break
            except FleetError:
                break  # DELETE below says what is wrong
            time.sleep(min(self.config.poll, max(0.0, deadline - time.monotonic())))
        try:
            self.api.request("DELETE", f"/units/{urllib.parse.quote(name)}", what=f"unit {name}")
        except FleetError as exc:
            if exc.status != 404:
                raise

    def _exists(self, name: str) -> bool:
        try:
            self.api.request("GET", f"/units/{urllib.parse.quote(name)}", what=f"unit {name}")
        except FleetError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # ---------------------------------------------------------------- health
    def healthy(self, instance: Instance, check: Any) -> bool:
        """Launched and active in fleet, then the service's HTTP/TCP check on primaryIP:port."""
        ref = instance.ref
        if not isinstance(ref, FleetRef) or not ref.active or not instance.host:
            return False
        return probe(instance, check)


@hookimpl
def shipmate_actuator_types() -> list[type[Actuator]]:
    return [FleetActuator]
