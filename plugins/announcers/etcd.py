"""The ``etcd`` announcer: the CoreOS sidekick pattern, done by the agent.

Each healthy instance gets a key (default ``/services/{service}/{instance}``)
in the agent's store, on one lease per announcer that a background thread
keeps alive (every ``ttl / 3``: one keep-alive on v3, a TTL refresh of each
key on v2), so the keys of a dead agent vanish after ``ttl``.

Each sync (a pass, for the services it looked at; the full resync, for all of
them) resynchronises with one prefix read of those services, so that the
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

STRIPES = 64  # locks that order the writes of one key (a key maps to one of them)


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
    """Writes healthy instances under their key on a kept-alive lease.

    Its state (what is wanted, on which lease) sits behind a lock that is never
    held across store I/O. Each key's writes are ordered by a lock of that key
    (one of :data:`STRIPES`), taken only around that key's one put or delete: a
    withdrawal waits at most for one put of its key, never for a whole sync, and
    the keep-alive takes no lock at all, so a sync of 10,000 keys cannot starve it.
    """

    type_name = "etcd"
    Config = EtcdAnnounceConfig

    def __init__(self, config: EtcdAnnounceConfig, context: Any) -> None:
        super().__init__(config, context)
        self.store = context.store
        self._lock = threading.Lock()  # the state below; never held across store I/O
        self._lease_lock = threading.Lock()  # held while a lease is granted (one at a time)
        self._keys = [threading.Lock() for _ in range(STRIPES)]  # one key's put/delete order
        self._lease: Lease | None = None
        self._refreshed = 0.0  # monotonic time the lease was last known alive
        self._wanted: dict[str, str] = {}  # key -> value as last synced (or announced)
        self._by_service: dict[str, set[str]] = {}  # service -> its wanted keys
        self._owned: set[str] = set()  # keys written on the current lease
        # instance name -> (service, its stop still under way): never announced meanwhile
        self._withdrawn: dict[str, tuple[str, bool]] = {}
        # instance name -> (service, when, key, value): announced by announce(), kept even by a
        # sync that does not list it (its pass looked earlier) until a sync lists it or a ttl
        self._held: dict[str, tuple[str, float, str, str]] = {}
        # instance name -> (what its value depends on, key, value): built once per version
        self._values: dict[str, tuple[tuple[Any, ...], str, str]] = {}
        self._repairing = False
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

    def _entry(self, instance: Instance, private: str | None) -> tuple[str, str]:
        """``instance``'s key and value, from the cache while nothing they depend on changed
        (an unchanged service costs no address parse and no JSON encoding)."""
        basis = (instance.service, instance.host, instance.port, instance.version, private)
        cached = self._values.get(instance.name)
        if cached is not None and cached[0] == basis:
            return cached[1], cached[2]
        key, value = self.key(instance), self.value(instance)
        self._values[instance.name] = (basis, key, value)
        return key, value

    def _ours(self, key: str, services: dict[str, Any]) -> bool:
        """True if ``key`` announces an instance of this cluster and of one of ``services``."""
        match = self._pattern.fullmatch(key)
        if match is None:
            return False
        instance = self._instance.fullmatch(match["instance"])
        if instance is None or instance["service"] not in services:
            return False
        return match.groupdict().get("service") in (None, instance["service"])

    def _stripe(self, key: str) -> threading.Lock:
        return self._keys[hash(key) % STRIPES]

    # -------------------------------------------------------------- lease
    def _current_lease(self) -> Lease:
        lease = self._lease
        if lease is not None:
            return lease
        with self._lease_lock:
            if self._lease is None:
                granted = self.store.lease(self.config.ttl)
                with self._lock:
                    self._lease, self._refreshed = granted, time.monotonic()
                    self._owned.clear()
            return self._lease

    def _keepalive(self) -> None:
        """Refresh the lease every ttl / 3, taking no lock: nothing a sync does delays it.
        Keys missing from the lease (the store was away) are written again on a thread of
        their own."""
        while not self._stop.wait(self.config.ttl / 3):
            lease = self._lease
            try:
                if lease is not None:
                    lease.refresh()
                    self._refreshed = time.monotonic()
            except NotLeading:
                self._deposed()
                continue
            except StoreError as exc:
                self.context.log.warning("announcements: %s", exc)
                self._check_lease(exc, lease)
            with self._lock:
                missing = bool(self._wanted.keys() - self._owned) and not self._repairing
                self._repairing = self._repairing or missing
            if missing:
                threading.Thread(target=self._repair, name="announce-repair",
                                 daemon=True).start()

    def _repair(self) -> None:
        """Write each wanted key not on the current lease (the store is back: announce
        again now, without waiting for a pass)."""
        try:
            with self._lock:
                missing = [k for k in self._wanted if k not in self._owned]
            self._write(missing)
        except NotLeading:
            self._deposed()
        except StoreError as exc:
            self.context.log.warning("announcements: %s", exc)
        finally:
            with self._lock:
                self._repairing = False

    def _deposed(self) -> None:
        """Deposed (or paused past its lease): keep nothing alive, re-put nothing; the next
        leader's first sync decides what is announced."""
        with self._lock:
            self._lease = None
            self._wanted.clear()
            self._by_service.clear()
            self._owned.clear()
            self._held.clear()

    def _check_lease(self, exc: StoreError, lease: Lease | None) -> None:
        """Give ``lease`` up if it has certainly expired: a new one comes next time."""
        text = str(exc)
        with self._lock:
            if lease is None or self._lease is not lease:
                return
            if ("expired" in text or "not found" in text
                    or time.monotonic() - self._refreshed >= self.config.ttl):
                self._lease = None
                self._owned.clear()

    # -------------------------------------------------------------- writes
    def _put(self, key: str, existing: dict[str, str] | None = None) -> None:
        """Write ``key`` as it is wanted now, unless it already reads so on our lease (one
        put, in order with the other writes of that key; a key no longer wanted is left)."""
        with self._stripe(key):
            with self._lock:
                value = self._wanted.get(key)
                if value is None or (key in self._owned and (existing is None
                                                             or existing.get(key) == value)):
                    return
            for attempt in (1, 2):  # once more on a new lease if the lease had expired
                lease = self._current_lease()
                try:
                    self.store.put(key, value, lease=lease)
                    break
                except NotLeading:
                    raise
                except StoreError as exc:
                    self._check_lease(exc, lease)
                    if attempt == 2 or self._lease is not None:
                        raise
            with self._lock:
                if self._lease is lease:
                    self._owned.add(key)

    def _write(self, keys: list[str], existing: dict[str, str] | None = None) -> None:
        for key in keys:
            self._put(key, existing)

    def _delete(self, key: str, *, unless_wanted: bool) -> None:
        """Delete ``key`` (a stale one only if it is still not wanted when its turn comes)."""
        with self._stripe(key):
            with self._lock:
                if unless_wanted and key in self._wanted:
                    return
                self._owned.discard(key)
            self.store.delete(key)

    # -------------------------------------------------------------- role
    def sync(self, healthy: dict[str, list[Instance]]) -> None:
        """Make the announced set of each service in ``healthy`` equal its healthy instances
        (only those services: a single one's, after its health changed, leaves the others)."""
        prefixes = {service: self.service_prefix(service) for service in healthy}
        private = os.environ.get("COREOS_PRIVATE_IPV4")
        with self._lock:
            # A pass works from what it saw when it looked, perhaps before a deploy withdrew or
            # announced an instance: a withdrawal holds until the stop ended and a sync no
            # longer lists the instance; an announcement until a sync lists it (or a ttl).
            seen = {i.name for items in healthy.values() for i in items}
            now = time.monotonic()
            self._withdrawn = {name: (service, stopping)
                               for name, (service, stopping) in self._withdrawn.items()
                               if stopping or name in seen or service not in healthy}
            self._held = {name: held for name, held in self._held.items()
                          if held[0] not in healthy
                          or (name not in seen and now - held[1] < self.config.ttl)}
            held: dict[str, dict[str, str]] = {}
            for service, _, key, value in self._held.values():
                held.setdefault(service, {})[key] = value
            wanted: dict[str, str] = {}
            for service, items in healthy.items():
                mine = dict(self._entry(i, private) for i in items
                            if i.name not in self._withdrawn)
                mine.update(held.get(service, {}))
                for gone in self._by_service.get(service, set()) - mine.keys():
                    self._wanted.pop(gone, None)
                self._wanted.update(mine)
                self._by_service[service] = set(mine)
                wanted.update(mine)
            names = seen | {name for name, (service, _) in self._withdrawn.items()
                            if service in healthy}
            for name in [n for n, (basis, _, _) in self._values.items()
                         if basis[0] in healthy and n not in names]:
                del self._values[name]
        common = os.path.commonprefix(list(prefixes.values()))
        if len(common.rstrip("/")) > 0:
            existing = {k: e.value for k, e in self.store.get_prefix(common).items()}
        else:  # templates share no prefix: read each service's own
            existing = {}
            for prefix in prefixes.values():
                existing.update({k: e.value for k, e in self.store.get_prefix(prefix).items()})
        # the new first, then the stale: the announced set never dips on the way
        with self._lock:
            owned = set(self._owned)
        self._write([k for k, v in wanted.items() if k not in owned or existing.get(k) != v],
                    existing)
        with self._lock:
            stale = [k for k in existing if k not in self._wanted and self._ours(k, healthy)]
        for key in stale:
            self._delete(key, unless_wanted=True)

    def announce(self, instance: Instance) -> None:
        """Write ``instance``'s key now (it just passed its health check); it ends a
        withdrawal of that name, and no sync of a pass that looked earlier removes it."""
        with self._lock:
            key, value = self._entry(instance, os.environ.get("COREOS_PRIVATE_IPV4"))
            self._withdrawn.pop(instance.name, None)
            self._held[instance.name] = (instance.service, time.monotonic(), key, value)
            self._wanted[key] = value
            self._by_service.setdefault(instance.service, set()).add(key)
            self._owned.discard(key)  # written again whatever it reads now
        self._put(key)

    def withdraw(self, instance: Instance) -> None:
        """Remove ``instance``'s key (before it is stopped); StoreError if the store is away."""
        key = self.key(instance)
        with self._lock:
            self._withdrawn[instance.name] = (instance.service, True)
            self._held.pop(instance.name, None)
            self._wanted.pop(key, None)
            self._by_service.get(instance.service, set()).discard(key)
        self._delete(key, unless_wanted=False)

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
