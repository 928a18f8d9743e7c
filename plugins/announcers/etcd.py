"""The ``etcd`` announcer: the CoreOS sidekick pattern, done by the agent.

Each healthy instance gets a key (default ``/services/{service}/{instance}``)
in the agent's store, on one lease per announcer that a background thread
keeps alive, so the keys of a dead agent vanish after ``ttl``. Every pass
resynchronises: missing keys are written again, keys of instances that no
longer run or are unhealthy are removed, with one prefix read for all
services. If the lease is lost (the store was down longer than ``ttl``), a new
one is granted as soon as the store answers and every key is written again.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Literal

from pydantic import Field, field_validator

from agent import Announcer, Duration, Instance, Lease, StoreError, TypeConfig, fill, hookimpl


class EtcdAnnounceConfig(TypeConfig):
    key: str = "/services/{service}/{instance}"
    "key template; {service} and {instance} are filled in"
    ttl: Duration = Field(30.0, ge=2)
    "announcements vanish this long after the agent stops refreshing them"
    format: Literal["json", "hostport", "skydns"] = "json"
    "json: {host, port, service, instance, version}; hostport: host:port; skydns: {host, port}"
    host: str | None = None
    "the announced address (default: $COREOS_PRIVATE_IPV4, else the actuator's)"

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

    def __init__(self, config: EtcdAnnounceConfig, context) -> None:
        super().__init__(config, context)
        self.store = context.store
        self._lock = threading.RLock()
        self._lease: Lease | None = None
        self._wanted: dict[str, str] = {}  # key -> value as last synced
        self._owned: set[str] = set()  # keys written on the current lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keepalive, name="announce-keepalive",
                                        daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- keys
    def service_prefix(self, service: str) -> str:
        return fill(self.config.key.split("{instance}")[0], service=service)

    def key(self, instance: Instance) -> str:
        return fill(self.config.key, service=instance.service, instance=instance.name)

    def value(self, instance: Instance) -> str:
        host = self.config.host or os.environ.get("COREOS_PRIVATE_IPV4") or instance.host
        if self.config.format == "hostport":
            return f"{host}:{instance.port}"
        if self.config.format == "skydns":
            return json.dumps({"host": host, "port": instance.port})
        return json.dumps({"host": host, "port": instance.port, "service": instance.service,
                           "instance": instance.name, "version": instance.version})

    # -------------------------------------------------------------- lease
    def _current_lease(self) -> Lease:
        if self._lease is None:
            self._lease = self.store.lease(self.config.ttl)
            self._owned.clear()
        return self._lease

    def _keepalive(self) -> None:
        while not self._stop.wait(self.config.ttl / 3):
            with self._lock:
                try:
                    if self._lease is not None:
                        self._lease.refresh()
                    elif self._wanted:
                        self._write_missing({})  # the store is back: announce again at once
                except StoreError as exc:
                    self.context.log.warning("announcements: %s", exc)
                    if "expired" in str(exc) or "not found" in str(exc):
                        self._lease = None

    def _write_missing(self, existing: dict[str, str]) -> None:
        lease = self._current_lease()
        for key, value in self._wanted.items():
            if key not in self._owned or existing.get(key) != value:
                self.store.put(key, value, lease=lease)
                self._owned.add(key)

    # -------------------------------------------------------------- role
    def sync(self, healthy: dict[str, list[Instance]]) -> None:
        prefixes = {service: self.service_prefix(service) for service in healthy}
        wanted = {self.key(i): self.value(i) for items in healthy.values() for i in items}
        suffix = self.config.key.split("{instance}")[1]
        with self._lock:
            common = os.path.commonprefix(list(prefixes.values()))
            if len(common.rstrip("/")) > 0:
                existing = {k: e.value for k, e in self.store.get_prefix(common).items()}
            else:  # templates share no prefix: read each service's own
                existing = {}
                for prefix in prefixes.values():
                    existing.update({k: e.value for k, e in self.store.get_prefix(prefix).items()})
            owned = set(prefixes.values())
            lengths = {len(p) for p in owned}
            for key in existing:
                owner = key.endswith(suffix) and any(key[:n] in owned for n in lengths)
                if owner and key not in wanted:
                    self.store.delete(key)
                    self._owned.discard(key)
            self._wanted = wanted
            try:
                self._write_missing(existing)
            except StoreError:
                self._lease = None  # expired while the store was away: a new one next time
                raise

    def withdraw(self, instance: Instance) -> None:
        key = self.key(instance)
        with self._lock:
            self._wanted.pop(key, None)
            self._owned.discard(key)
            self.store.delete(key)

    def close(self) -> None:
        self._stop.set()


@hookimpl
def shipmate_announcer_types() -> list[type[Announcer]]:
    return [EtcdAnnouncer]
