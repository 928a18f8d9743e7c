"""The ``etcd`` announcer: the CoreOS sidekick pattern, done by the agent.

Each healthy instance gets a key (default ``/services/{service}/{instance}``)
in the agent's store, on one lease per announcer that a background thread
keeps alive (every ``ttl / 3``: one keep-alive on v3, a TTL refresh of each
key on v2), so the keys of a dead agent vanish after ``ttl``.

Every pass resynchronises with one prefix read for all services, so that the
announced set equals the healthy set: missing keys are written again, keys of
instances that no longer run or are unhealthy are removed. Only keys that name
an instance of this cluster and of a service this announcer serves
(``<cluster>-<service>-<slot>-<version>``) are ever removed: another cluster
announcing under the same prefix, or a key an operator wrote by hand, is left
alone.

What a consumer (confd, consul-template, a sidekick rendering a load
balancer's backends) can rely on:

- a new instance is announced as soon as the code that waited for its health
  check saw it pass (:meth:`announce`), before anything it replaces is
  withdrawn, and a pass that looked before that never removes it again;
  within a pass, new keys are written before stale ones are deleted;
- a key is deleted ``drain`` seconds (default 2 s) before its instance's stop
  begins (:meth:`withdraw`), and stays deleted until the instance is gone,
  however long the stop takes: no pass puts it back meanwhile;
- an instance that dies on its own is de-announced by the next pass (the
  docker actuator wakes the agent on the engine's events);
- if the agent dies, its keys live out their ``ttl`` and then vanish.

If the store is away longer than ``ttl`` the lease is given up; as soon as the
store answers again a new one is granted and every key written again (by the
keep-alive thread, without waiting for a pass), so announcements come back
within ``ttl / 3`` of the store's return. Nothing here ever stops an instance.

The announced address is ``host`` from the config, else the instance's own
address when it is routable (a container's address on an overlay network, an
actuator's configured ``host_address``), else ``$COREOS_PRIVATE_IPV4``, else
the instance's address as the actuator gives it (127.0.0.1 on one machine).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator

from agent import (
    Announcer,
    AnnouncerConfig,
    Duration,
    Instance,
    Lease,
    NotLeading,
    StoreError,
    fill,
    hookimpl,
)


class EtcdAnnounceConfig(AnnouncerConfig):
    key: str = "/services/{service}/{instance}"
    "key template; {service} and {instance} are filled in"
    ttl: Duration = Field(30.0, ge=2)
    "announcements vanish this long after the agent stops refreshing them"
    format: Literal["json", "hostport", "skydns"] = "json"
    "json: {host, port, service, instance, version}; hostport: host:port; skydns: {host, port}"
    host: str | None = None
    "the announced address (default: the instance's if routable, else $COREOS_PRIVATE_IPV4)"

    @field_validator("key")
    @classmethod
    def _has_instance(cls, key: str) -> str:
        if "{instance}" not in key or not key.startswith("/"):
            raise ValueError("key must start with / and contain {instance}")
        return key


class EtcdAnnouncer(Announcer):
    """Writes healthy instances under their key on a kept-alive lease."""

    type_name = "etcd"
    Config = EtcdAnnounceConfig

    def __init__(self, config: EtcdAnnounceConfig, context: Any) -> None:
        super().__init__(config, context)
        self.store = context.store
        self._lock = threading.RLock()
        self._lease: Lease | None = None
        self._refreshed = 0.0  # monotonic time the lease was last known alive
        self._wanted: dict[str, str] = {}  # key -> value as last synced
        self._owned: set[str] = set()  # keys written on the current lease
        # instance name -> (service, its stop still under way): never announced meanwhile
        self._withdrawn: dict[str, tuple[str, bool]] = {}
        # instance name -> (service, when, key, value): announced by announce(), kept even by a
        # sync that does not list it (its pass looked earlier) until a sync lists it or a ttl
        self._held: dict[str, tuple[str, float, str, str]] = {}
        self._pattern = _key_pattern(config.key)
        self._instance = re.compile(
            rf"{re.escape(context.cluster)}-(?P<service>.+)-[0-9]+-[0-9a-z]+")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keepalive, name="announce-keepalive",
                                        daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- keys
    def service_prefix(self, service: str) -> str:
        """The part of the key template before the instance name, for ``service``."""
        return fill(self.config.key.split("{instance}")[0], service=service)

    def key(self, instance: Instance) -> str:
        """The key ``instance`` is announced under."""
        return fill(self.config.key, service=instance.service, instance=instance.name)

    def value(self, instance: Instance) -> str:
        """What is announced for ``instance``, in the configured ``format``."""
        host = self.config.host or _announced_host(instance.host)
        port = instance.port
        if self.config.format == "hostport":
            return f"{host}:{port}" if port is not None else host
        if self.config.format == "skydns":
            return json.dumps({"host": host, "port": port} if port is not None else {"host": host})
        return json.dumps({"host": host, "port": port, "service": instance.service,
                           "instance": instance.name, "version": instance.version})

    def _ours(self, key: str, services: dict[str, Any]) -> bool:
        """True if ``key`` announces an instance of this cluster and of one of ``services``."""
        match = self._pattern.fullmatch(key)
        if match is None:
            return False
        instance = self._instance.fullmatch(match["instance"])
        if instance is None or instance["service"] not in services:
            return False
        return match.groupdict().get("service") in (None, instance["service"])

    # -------------------------------------------------------------- lease
    def _current_lease(self) -> Lease:
        if self._lease is None:
            self._lease = self.store.lease(self.config.ttl)
            self._refreshed = time.monotonic()
            self._owned.clear()
        return self._lease

    def _keepalive(self) -> None:
        while not self._stop.wait(self.config.ttl / 3):
            with self._lock:
                try:
                    if self._lease is not None:
                        self._lease.refresh()
                        self._refreshed = time.monotonic()
                    if self._wanted.keys() - self._owned:
                        self._write_missing(None)  # the store is back: announce again now
                except NotLeading:
                    # deposed (or paused past its lease): keep nothing alive, re-put nothing;
                    # the next leader's first sync decides what is announced
                    self._lease = None
                    self._wanted.clear()
                    self._owned.clear()
                    self._held.clear()
                except StoreError as exc:
                    self.context.log.warning("announcements: %s", exc)
                    self._check_lease(exc)

    def _check_lease(self, exc: StoreError) -> None:
        """Give the lease up if it has certainly expired: a new one comes next time."""
        if self._lease is None:
            return
        text = str(exc)
        if ("expired" in text or "not found" in text
                or time.monotonic() - self._refreshed >= self.config.ttl):
            self._lease = None
            self._owned.clear()

    def _write_missing(self, existing: dict[str, str] | None) -> None:
        """Write each wanted key not on our lease or not as it should read.

        With ``existing`` None (no fresh read), only keys not yet on our lease.
        """
        lease = self._current_lease()
        for key, value in self._wanted.items():
            if key not in self._owned or (existing is not None and existing.get(key) != value):
                self.store.put(key, value, lease=lease)
                self._owned.add(key)

    # -------------------------------------------------------------- role
    def sync(self, healthy: dict[str, list[Instance]]) -> None:
        """Make the announced set of each service in ``healthy`` equal its healthy instances."""
        prefixes = {service: self.service_prefix(service) for service in healthy}
        with self._lock:
            # A pass works from what it saw when it looked, perhaps before a deploy withdrew or
            # announced an instance: a withdrawal holds until the stop ended and a pass no
            # longer sees the instance; an announcement until a pass sees it (or a ttl passed).
            seen = {i.name for items in healthy.values() for i in items}
            now = time.monotonic()
            self._withdrawn = {name: (service, stopping)
                               for name, (service, stopping) in self._withdrawn.items()
                               if stopping or name in seen or service not in healthy}
            self._held = {name: held for name, held in self._held.items()
                          if name not in seen and now - held[1] < self.config.ttl}
            wanted = {self.key(i): self.value(i) for items in healthy.values() for i in items
                      if i.name not in self._withdrawn}
            wanted.update({key: value for _, _, key, value in self._held.values()})
            common = os.path.commonprefix(list(prefixes.values()))
            if len(common.rstrip("/")) > 0:
                existing = {k: e.value for k, e in self.store.get_prefix(common).items()}
            else:  # templates share no prefix: read each service's own
                existing = {}
                for prefix in prefixes.values():
                    existing.update({k: e.value for k, e in self.store.get_prefix(prefix).items()})
            self._wanted = wanted
            # the new first, then the stale: the announced set never dips on the way
            self._retrying(lambda: self._write_missing(existing))
            for key in existing:
                if key not in wanted and self._ours(key, healthy):
                    self.store.delete(key)
                    self._owned.discard(key)

    def _retrying(self, write: Callable[[], None]) -> None:
        """``write()``, once more on a new lease if the lease had expired."""
        try:
            write()
        except StoreError as exc:
            self._check_lease(exc)
            if self._lease is not None:
                raise
            write()

    def announce(self, instance: Instance) -> None:
        """Write ``instance``'s key now (it just passed its health check); it ends a
        withdrawal of that name, and no sync of a pass that looked earlier removes it."""
        key, value = self.key(instance), self.value(instance)
        with self._lock:
            self._withdrawn.pop(instance.name, None)
            self._held[instance.name] = (instance.service, time.monotonic(), key, value)
            self._wanted[key] = value

            def write() -> None:
                self.store.put(key, value, lease=self._current_lease())
                self._owned.add(key)

            self._retrying(write)

    def withdraw(self, instance: Instance) -> None:
        """Remove ``instance``'s key (before it is stopped); StoreError if the store is away."""
        key = self.key(instance)
        with self._lock:
            self._withdrawn[instance.name] = (instance.service, True)
            self._held.pop(instance.name, None)
            self._wanted.pop(key, None)
            self._owned.discard(key)
            self.store.delete(key)

    def stopped(self, instance: Instance, gone: bool) -> None:
        """The stop after :meth:`withdraw` ended: the withdrawal lasts until a pass no longer
        sees the instance; after a failed stop (``gone`` False) it ends now."""
        with self._lock:
            if not gone:
                self._withdrawn.pop(instance.name, None)
            elif instance.name in self._withdrawn:
                self._withdrawn[instance.name] = (instance.service, False)

    def close(self) -> None:
        """Stop the keep-alive; the keys live out their ttl (a restarted agent takes them over)."""
        self._stop.set()


def _key_pattern(template: str) -> re.Pattern[str]:
    """A regex matching the keys ``template`` makes, with ``instance`` (and ``service``) groups."""
    pattern = re.escape(template)
    pattern = pattern.replace(re.escape("{service}"), "(?P<service>[^/]+)", 1)
    pattern = pattern.replace(re.escape("{service}"), "[^/]+")
    return re.compile(pattern.replace(re.escape("{instance}"), "(?P<instance>[^/]+)", 1))


def _announced_host(host: str) -> str:
    """``host`` if others can reach it, else $COREOS_PRIVATE_IPV4 if set, else ``host``."""
    try:
        local = ipaddress.ip_address(host)
        local_only = local.is_loopback or local.is_unspecified
    except ValueError:
        local_only = host == "localhost"
    return (os.environ.get("COREOS_PRIVATE_IPV4") or host) if local_only else host


@hookimpl
def shipmate_announcer_types() -> list[type[Announcer]]:
    return [EtcdAnnouncer]
