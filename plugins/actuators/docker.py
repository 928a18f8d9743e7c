"""The ``docker`` actuator: instances are Docker containers on one engine.

Each instance is a container named after its slot (``<cluster>-<service>-<slot>-<version>``)
and labelled ``shipmate.cluster``, ``shipmate.service``, ``shipmate.version``,
``shipmate.slot`` (and ``shipmate.port``), so a restarted agent adopts what
runs. Listing costs one API call per pass: every container of the cluster, by
label, exited ones included (the loop removes those and starts their slots
again). Containers of the cluster that no configured service owns are left
alone (the loop reports them).

Health is the container's own HEALTHCHECK status when its image has one
(read from that same listing, no extra call), else the service's ``health``
probe on the instance's address and port.

The engine is ``host`` (else ``$DOCKER_HOST`` with ``$DOCKER_TLS_VERIFY`` and
``$DOCKER_CERT_PATH``, as the docker CLI reads them, else the local socket).
Every engine failure becomes a :class:`DockerError` naming the engine and the
call; after a connection failure the client is made again on the next call,
so a restarted engine is picked up without restarting the agent. A thread
follows the engine's event stream (reconnecting when it breaks) to wake the
agent when a container dies or changes health, instead of waiting for the
next timed pass.

Blue/green's ``keep_old`` *parks* the old color: its containers are stopped
but not removed (``docker ps -a`` shows them exited), and a rollback starts the
very same containers again, without a create or a pull. With ``restart:
always`` an engine restart would start parked containers too (the agent then
removes them as instances of another release): prefer ``unless-stopped``.

Where instances are reached (and announced):

- ``network: host`` (default): on the engine host's address, the instance port;
- ``network: bridge`` or a named network, ``publish: true`` (default): the
  instance port is published on the same port of the engine host;
- a named network with ``publish: false``: on the container's own address in
  that network (an overlay or flannel network that peers route to).

The engine host's address is ``host_address``, else ``$COREOS_PRIVATE_IPV4``,
else the host of a ``tcp://`` or ``ssh://`` engine, else 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from agent import (
    LABEL_CLUSTER,
    LABEL_SERVICE,
    LABEL_SLOT,
    LABEL_VERSION,
    Actuator,
    Duration,
    Instance,
    InstanceSpec,
    TypeConfig,
    hookimpl,
    probe,
)

T = TypeVar("T")

LABEL_PORT = "shipmate.port"
DEFAULT_ENGINE = "unix:///var/run/docker.sock"
EVENT_BACKOFF = (0.2, 5.0)  # seconds between event-stream reconnects: first, at most
WAKE_ACTIONS = {"die", "oom", "destroy", "stop"}  # plus every "health_status: ..."
EVENT_RECHECK = 0.5  # seconds after an event the agent is woken once more
_HEALTH = re.compile(r"\((healthy|unhealthy|health: starting)\)")


class DockerError(Exception):
    """A call to the Docker engine failed; the message names the engine, the call and why."""


class TlsConfig(TypeConfig):
    verify: bool = True
    "check the engine's certificate (against ``ca`` if given, else the system's CAs)"
    ca: Path | None = None
    "CA certificate file (PEM) that signed the engine's certificate"
    cert: Path | None = None
    "client certificate file (PEM); needs ``key``"
    key: Path | None = None
    "client private key file (PEM); needs ``cert``"

    @model_validator(mode="after")
    def _files(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: give both or neither")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file: {path}")
        return self


class DockerConfig(TypeConfig):
    shape_fields = ("network", "publish", "volumes", "restart", "cpus", "memory", "init")
    host: str | None = None
    "the engine: unix:///path, tcp://host:port or ssh://user@host (default: $DOCKER_HOST)"
    tls: TlsConfig | None = None
    "TLS to a tcp:// engine (default: $DOCKER_TLS_VERIFY and $DOCKER_CERT_PATH when host is unset)"
    timeout: Duration = Field(60.0, gt=0)
    "how long one engine call may take"
    network: str = Field("host", min_length=1)
    "host, bridge, or the name of a Docker network"
    publish: bool = True
    "off host networking, publish the instance port on the same port of the engine host"
    host_address: str | None = None
    "the address instances are reached and announced at (default: see the module doc)"
    pull: Literal["always", "missing", "never"] = "missing"
    "pull the image before every start, only when the engine lacks it, or never"
    volumes: list[str] = []
    "bind mounts, HOST_PATH:CONTAINER_PATH[:ro|rw], or named volumes NAME:CONTAINER_PATH"
    restart: str = "no"
    "the engine's restart policy: no, always, unless-stopped, on-failure[:N]"
    cpus: float | None = Field(None, gt=0)
    "CPU limit in cores (1.5 = one and a half)"
    memory: str | None = Field(None, pattern=r"^[0-9]+[bkmgBKMG]?$")
    "memory limit: bytes, or with a unit: 512m, 2g"
    init: bool = False
    "run an init process as PID 1, so SIGTERM reaches commands that ignore it as PID 1"
    parallelism: int = Field(4, ge=1, le=64)
    "how many containers start or stop at once (agent.parallelism caps it too)"

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, volumes: list[str]) -> list[str]:
        for volume in volumes:
            parts = volume.split(":")
            if (len(parts) not in (2, 3) or not all(parts[:2]) or not parts[1].startswith("/")
                    or (len(parts) == 3 and parts[2] not in ("ro", "rw"))):
                raise ValueError(f"volume {volume!r} is not SOURCE:/CONTAINER/PATH[:ro|rw]")
        return volumes

    @field_validator("restart")
    @classmethod
    def _restart(cls, restart: str) -> str:
        if not re.fullmatch(r"no|always|unless-stopped|on-failure(:[0-9]+)?", restart):
            raise ValueError(f"restart {restart!r} is not one of no, always, unless-stopped, "
                             "on-failure[:N]")
        return restart


_EXITED = re.compile(r"^Exited \((-?\d+)\)")


def _exit_code(status: str) -> int | None:
    """The exit code in a listing's status text ("Exited (127) 3 seconds ago"), or None."""
    match = _EXITED.match(status or "")
    return int(match.group(1)) if match else None


def _health(status: str) -> str | None:
    """The HEALTHCHECK state in a listing's status text ("Up 5 seconds (healthy)"), or None."""
    match = _HEALTH.search(status or "")
    return None if match is None else match.group(1).removeprefix("health: ")


class DockerActuator(Actuator):
    """Runs instances as containers on one Docker engine."""

    type_name = "docker"
    requires = {"docker": "shipmate[docker]"}
    Config = DockerConfig

    def __init__(self, config: DockerConfig, context: Any) -> None:
        super().__init__(config, context)
        self.parallelism = config.parallelism
        self.engine = config.host or os.environ.get("DOCKER_HOST") or DEFAULT_ENGINE
        self.address = self._address()
        self.api_calls = 0
        "requests sent to the engine (the event stream aside), for tests and benchmarks"
        self._api: Any = None
        self._lock = threading.Lock()
        self._pull_locks: dict[str, threading.Lock] = {}
        self._pulled: dict[str, float] = {}
        self._stop = threading.Event()
        self._events: threading.Thread | None = None
        self._stream: Any = None
        self._warned: set[str] = set()
        self._starting: set[str] = set()  # names of containers start() is working on

    # ------------------------------------------------------------ the engine
    def _address(self) -> str:
        if self.config.host_address:
            return self.config.host_address
        if os.environ.get("COREOS_PRIVATE_IPV4"):
            return os.environ["COREOS_PRIVATE_IPV4"]
        engine = urlsplit(self.engine)
        if engine.scheme in ("tcp", "http", "https", "ssh") and engine.hostname:
            return engine.hostname
        return "127.0.0.1"

    def _connect(self, count: bool = True) -> Any:
        """A new low-level client (asks the engine its API version: one request)."""
        import docker

        kwargs: dict[str, Any] = {}
        if self.config.host is None and self.config.tls is None:
            kwargs = docker.utils.kwargs_from_env()  # DOCKER_HOST, DOCKER_TLS_VERIFY, ...
        else:
            kwargs["base_url"] = self.engine
            tls = self.config.tls
            if tls is not None:
                kwargs["tls"] = docker.tls.TLSConfig(
                    client_cert=(str(tls.cert), str(tls.key)) if tls.cert else None,
                    ca_cert=str(tls.ca) if tls.ca else None, verify=tls.verify)
        if "tls" in kwargs and self.config.tls is not None:
            # requests lets $REQUESTS_CA_BUNDLE override the client's own CA: not ours
            kwargs["tls"].configure_client = _without_env(kwargs["tls"].configure_client)
        api = docker.APIClient(version="auto", timeout=self.config.timeout,
                               max_pool_size=max(10, self.parallelism + 2), **kwargs)
        if count:
            self.api_calls += 1  # the version request
            api.hooks["response"].append(self._count)
        return api

    def _count(self, response: Any, *args: Any, **kwargs: Any) -> None:
        self.api_calls += 1

    def _client(self) -> Any:
        with self._lock:
            if self._api is None:
                self._api = self._connect()
            return self._api

    def _drop(self, api: Any) -> None:
        """Forget a client after a connection failure: the next call makes a new one."""
        with self._lock:
            if self._api is api:
                self._api = None
        with contextlib.suppress(Exception):  # already broken
            api.close()

    def _call(self, what: str, fn: Callable[[Any], T], *, passthrough: tuple[type, ...] = ()
              ) -> T:
        """Run ``fn(api)``; any engine failure becomes a :class:`DockerError`.

        Exceptions in ``passthrough`` (say ``docker.errors.NotFound``) reach the caller.
        """
        import docker.errors
        import requests

        try:
            api = self._client()
        except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
            raise DockerError(f"docker {self.engine}: {what}: cannot reach the engine: "
                              f"{_reason(exc)}") from None
        try:
            return fn(api)
        except passthrough:
            raise
        except docker.errors.APIError as exc:
            raise DockerError(f"docker {self.engine}: {what}: {_explain(exc)}") from None
        except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
            self._drop(api)
            raise DockerError(f"docker {self.engine}: {what}: cannot reach the engine: "
                              f"{_reason(exc)}") from None

    # ------------------------------------------------------------ role: list
    def list(self) -> list[Instance]:
        """Every container of this cluster, running or not: one API call."""
        self._follow_events()
        label = f"{LABEL_CLUSTER}={self.context.cluster}"
        rows = self._call("list containers",
                          lambda api: api.containers(all=True, filters={"label": label}))
        out = []
        for row in rows:
            instance = self._instance(row)
            if instance is not None:
                out.append(instance)
        return out

    def _instance(self, row: dict[str, Any]) -> Instance | None:
        labels = row.get("Labels") or {}
        name = (row.get("Names") or ["/" + row.get("Id", "?")[:12]])[0].lstrip("/")
        try:
            slot = int(labels[LABEL_SLOT])
            service, version = labels[LABEL_SERVICE], labels[LABEL_VERSION]
            port = int(labels[LABEL_PORT]) if labels.get(LABEL_PORT) else None
        except (KeyError, ValueError):
            if name not in self._warned:
                self._warned.add(name)
                self.context.log.warning(
                    "container %s has label %s=%s but no valid %s, %s and %s labels: "
                    "left alone", name, LABEL_CLUSTER, self.context.cluster, LABEL_SERVICE,
                    LABEL_SLOT, LABEL_VERSION)
            return None
        state = row.get("State", "")
        host = self.address
        if self.config.network != "host" and not self.config.publish:
            network = (row.get("NetworkSettings") or {}).get("Networks", {}).get(
                self.config.network) or {}
            host = network.get("IPAddress") or host
        ref = {"id": row["Id"], "state": state, "health": _health(row.get("Status", ""))}
        # created by a start still under way (a deploy's, say): not a leftover to remove
        starting = state == "created" and name in self._starting
        return Instance(name=name, service=service, slot=slot, version=version, host=host,
                        port=port, running=starting or state in ("running", "restarting",
                                                                 "paused"),
                        cluster=labels.get(LABEL_CLUSTER, self.context.cluster), ref=ref,
                        exit_code=_exit_code(row.get("Status", "")))

    def output(self, instance: Instance, lines: int = 5) -> str | None:
        """The last lines the container wrote (stdout and stderr)."""
        ref = instance.ref or {}
        if "id" not in ref:
            return None
        logs = self._call("read logs", lambda api: api.logs(ref["id"], tail=lines))
        return logs.decode(errors="replace") if isinstance(logs, bytes) else str(logs)

    # ------------------------------------------------------------ role: health
    def healthy(self, instance: Instance, check: Any) -> bool:
        """The container's HEALTHCHECK status if its image has one, else the ``health`` probe."""
        ref = instance.ref or {}
        if not instance.running or ref.get("state", "running") != "running":
            return False
        if ref.get("health") is not None:
            return ref["health"] == "healthy"
        return probe(instance, check)

    # ------------------------------------------------------------ role: start
    def start(self, spec: InstanceSpec) -> Instance:
        """Create and start the slot's container; adopt it if it already runs."""
        if not spec.image:
            raise DockerError(f"service {spec.service!r} has no image to run")
        self._starting.add(spec.name)
        try:
            return self._start(spec)
        finally:
            self._starting.discard(spec.name)

    def _start(self, spec: InstanceSpec) -> Instance:
        import docker.errors

        asked = time.monotonic()
        if self.config.pull == "always":
            self._pull(spec.image, asked)
        for _ in range(3):
            try:
                created = self._call(
                    f"create {spec.name}",
                    lambda api: api.create_container(**self._params(spec, api)),
                    passthrough=(docker.errors.NotFound, docker.errors.APIError))
            except docker.errors.ImageNotFound:
                if self.config.pull == "never":
                    raise DockerError(f"docker {self.engine}: image {spec.image} is not on the "
                                      "engine and pull is never") from None
                self._pull(spec.image, asked)
                continue
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise DockerError(f"docker {self.engine}: create {spec.name}: "
                                      f"{_explain(exc)}") from None
                adopted = self._resolve_conflict(spec)
                if adopted is not None:
                    return adopted
                continue
            return self._run(spec, created["Id"])
        raise DockerError(f"docker {self.engine}: create {spec.name}: gave up after a "
                          "conflict and a retry")

    def _params(self, spec: InstanceSpec, api: Any) -> dict[str, Any]:
        """The create_container arguments for ``spec``."""
        cfg = self.config
        labels = {**spec.labels, LABEL_CLUSTER: spec.cluster, LABEL_SERVICE: spec.service,
                  LABEL_VERSION: spec.version, LABEL_SLOT: str(spec.slot)}
        if spec.port is not None:
            labels[LABEL_PORT] = str(spec.port)
        publish = cfg.network != "host" and cfg.publish and spec.port is not None
        restart = None
        if cfg.restart != "no":
            name, _, count = cfg.restart.partition(":")
            restart = {"Name": name, "MaximumRetryCount": int(count or 0)}

        host_config = api.create_host_config(
            network_mode=cfg.network, binds=cfg.volumes or None,
            port_bindings={spec.port: spec.port} if publish else None,
            restart_policy=restart, mem_limit=cfg.memory,
            nano_cpus=int(cfg.cpus * 1e9) if cfg.cpus else None, init=cfg.init or None)
        return {"image": spec.image, "command": spec.command, "name": spec.name,
                "environment": spec.env, "labels": labels, "detach": True,
                "ports": [spec.port] if publish else None,
                "host_config": host_config}

    def _run(self, spec: InstanceSpec, container: str) -> Instance:
        """Start a created container; remove it again if it cannot start."""
        try:
            self._call(f"start {spec.name}", lambda api: api.start(container))
        except DockerError:
            try:
                self._call(f"remove {spec.name}",
                           lambda api: api.remove_container(container, v=True, force=True))
            except DockerError as exc:
                self.context.log.warning("%s", exc)
            raise
        host = self.address
        if self.config.network != "host" and not self.config.publish:
            info = self._call(f"inspect {spec.name}", lambda api: api.inspect_container(container))
            network = info["NetworkSettings"]["Networks"].get(self.config.network) or {}
            host = network.get("IPAddress") or host
        return Instance(name=spec.name, service=spec.service, slot=spec.slot,
                        version=spec.version, host=host, port=spec.port, running=True,
                        cluster=spec.cluster,
                        ref={"id": container, "state": "running", "health": None})

    def _resolve_conflict(self, spec: InstanceSpec) -> Instance | None:
        """A container has the slot's name: adopt it if it is ours and runs, else clear it.

        Returns the adopted instance, or None to retry the create.
        """
        import docker.errors

        try:
            info = self._call(f"inspect {spec.name}",
                              lambda api: api.inspect_container(spec.name),
                              passthrough=(docker.errors.NotFound,))
        except docker.errors.NotFound:
            return None  # removed in between: create again
        labels = info["Config"].get("Labels") or {}
        mine = {LABEL_CLUSTER: spec.cluster, LABEL_SERVICE: spec.service,
                LABEL_VERSION: spec.version, LABEL_SLOT: str(spec.slot)}
        if any(labels.get(k) != v for k, v in mine.items()):
            raise DockerError(
                f"docker {self.engine}: a container named {spec.name} exists but is not "
                f"{spec.service} slot {spec.slot} of cluster {spec.cluster} (its labels "
                "differ): remove or rename it")
        if info["State"].get("Running"):
            self.context.log.info("adopted running container %s", spec.name)
            return self._instance({
                "Id": info["Id"], "Names": [info["Name"]], "Labels": labels,
                "State": info["State"].get("Status", "running"),
                "Status": f"({info['State']['Health']['Status']})"
                if info["State"].get("Health") else "",
                "NetworkSettings": info.get("NetworkSettings")})
        self._remove(info["Id"], spec.name)  # an exited container of this slot
        return None

    def _pull(self, image: str, asked: float) -> None:
        """Pull ``image``; starts asked for before a pull began share its result."""
        import docker.utils

        with self._lock:  # one lock per image, made once even when two threads ask
            pull_lock = self._pull_locks.setdefault(image, threading.Lock())
        with pull_lock:
            if self._pulled.get(image, -math.inf) >= asked:
                return
            began = time.monotonic()
            repository, tag = docker.utils.parse_repository_tag(image)

            def pull(api: Any) -> None:
                for line in api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                    if isinstance(line, dict) and line.get("error"):
                        raise DockerError(f"docker {self.engine}: pull {image}: "
                                          f"{str(line['error'])[:300]}")

            try:
                self._call(f"pull {image}", pull)
            except DockerError as exc:
                message = str(exc)
                if f"pull {image}" not in message:
                    message = f"docker {self.engine}: pull {image}: {message}"
                raise DockerError(message) from None
            self._pulled[image] = began

    # ------------------------------------------------------------ role: stop
    def stop(self, instance: Instance, grace: float) -> None:
        """Stop the container (SIGTERM, SIGKILL after ``grace``), then remove it."""
        import docker.errors

        container = (instance.ref or {}).get("id") or instance.name
        if instance.running:
            try:
                self._call(f"stop {instance.name}",
                           lambda api: api.stop(container, timeout=max(0, math.ceil(grace))),
                           passthrough=(docker.errors.NotFound,))
            except docker.errors.NotFound:
                return  # already gone
        self._remove(container, instance.name)

    # ------------------------------------------------------------ park (keep_old)

    def park(self, instance: Instance, grace: float) -> None:
        """Stop the container but keep it (exited, same name and labels) for :meth:`unpark`."""
        container = (instance.ref or {}).get("id") or instance.name
        if instance.running:
            self._call(f"stop {instance.name}",
                       lambda api: api.stop(container, timeout=max(0, math.ceil(grace))))

    def unpark(self, instance: Instance) -> Instance:
        """Start a kept container again (no create, no pull)."""
        container = (instance.ref or {}).get("id") or instance.name
        self._call(f"start {instance.name}", lambda api: api.start(container))
        ref = {**(instance.ref or {}), "state": "running", "health": None}
        return Instance(name=instance.name, service=instance.service, slot=instance.slot,
                        version=instance.version, host=instance.host, port=instance.port,
                        running=True, cluster=instance.cluster, ref=ref)

    def _remove(self, container: str, name: str) -> None:
        import docker.errors

        try:
            self._call(f"remove {name}",
                       lambda api: api.remove_container(container, v=True, force=True),
                       passthrough=(docker.errors.NotFound, docker.errors.APIError))
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code == 409 and "in progress" in _explain(exc):
                return  # someone else is removing it
            raise DockerError(f"docker {self.engine}: remove {name}: {_explain(exc)}") from None

    # ------------------------------------------------------------ events
    def _follow_events(self) -> None:
        """Start the event thread once, if the agent gave a way to wake it."""
        if self._events is None and getattr(self.context, "wake", None) is not None:
            self._events = threading.Thread(target=self._event_loop, daemon=True,
                                            name="docker-events")
            self._events.start()

    def _event_loop(self) -> None:
        """Follow the engine's events of this cluster; wake the agent when one matters."""
        filters = {"type": "container", "label": f"{LABEL_CLUSTER}={self.context.cluster}"}
        delay, failed = EVENT_BACKOFF[0], False
        while not self._stop.is_set():
            api = None
            try:
                api = self._connect(count=False)
                self._stream = api.events(decode=True, filters=filters)
                if failed:  # the engine is back (perhaps restarted): look at everything again
                    self.context.log.info("docker %s: event stream reconnected", self.engine)
                    self.context.wake()
                failed, delay = False, EVENT_BACKOFF[0]
                for event in self._stream:
                    action = str(event.get("Action") or event.get("status") or "")
                    if action in WAKE_ACTIONS or action.startswith("health_status"):
                        self.context.wake()
                        # the engine's container list can lag its event: look once more
                        again = threading.Timer(EVENT_RECHECK, self.context.wake)
                        again.daemon = True
                        again.start()
                if not self._stop.is_set():
                    raise ConnectionError("the event stream ended")
            except Exception as exc:  # noqa: BLE001 - the stream is a hint, never fatal
                if self._stop.is_set():
                    break
                if not failed:
                    self.context.log.warning("docker %s: event stream lost (%s); reconnecting",
                                             self.engine, _reason(exc))
                failed = True
                self._stop.wait(delay)
                delay = min(EVENT_BACKOFF[1], delay * 2)
            finally:
                self._stream = None
                if api is not None:
                    with contextlib.suppress(Exception):
                        api.close()

    def close(self) -> None:
        """Stop following events and close the client (containers keep running)."""
        self._stop.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):  # already closed
                stream.close()
        if self._events is not None and self._events is not threading.current_thread():
            self._events.join(timeout=2)
        with self._lock:
            api, self._api = self._api, None
        if api is not None:
            api.close()


def _without_env(configure: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap TLSConfig.configure_client so the client ignores CA bundles from the environment."""

    def wrapped(client: Any) -> None:
        configure(client)
        client.trust_env = False

    return wrapped


def _explain(exc: Any) -> str:
    """The engine's own words for an API error, with its status code."""
    text = str(getattr(exc, "explanation", "") or exc).strip()
    code = getattr(exc, "status_code", None)
    return f"{text} (HTTP {code})" if code else text


def _reason(exc: BaseException) -> str:
    """A short description of a connection failure."""
    text = str(exc).strip()
    for marker in ("Connection refused", "No such file or directory", "timed out",
                   "Connection aborted", "Name or service not known", "certificate verify failed",
                   "CERTIFICATE_VERIFY_FAILED", "SSL"):
        if marker in text:
            return f"{type(exc).__name__}: {marker}"
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


@hookimpl
def shipmate_actuator_types() -> list[type[Actuator]]:
    return [DockerActuator]
