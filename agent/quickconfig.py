"""The few settings a local write needs, read without pydantic or plugins.

Loading the whole config (:func:`agent.config.load_config`) imports pydantic and
every plugin to validate every block: some 300 ms, ten times what ``shipmate
scale`` on the embedded store needs. :func:`read_quick` reads only what such a
command uses (``agent.cluster``, ``agent.store``, ``agent.max_instances``, the
service names and each service's ``policy.min`` and ``policy.max``, defaults
merged) and checks those values as the full model does.

It vouches for nothing else, so it answers None, and the caller loads the whole
config (which names every problem with its line), whenever the file holds
something it does not read plainly: a store other than the embedded one, a key
it does not know in ``agent``, ``agent.store`` or a ``policy`` (a typo there
would send the write elsewhere), ``${VAR}`` in a value it reads, duplicate keys,
a value of another shape, or a file it cannot parse. The other values (a source
block, ``interval``...) are not validated here: ``shipmate check`` does that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.store.embedded import EmbeddedStore

# The field names of agent.config's models: a test keeps these lists equal to them.
AGENT_KEYS = frozenset({"cluster", "store", "interval", "resync", "http", "state_dir", "plugins",
                        "grace", "parallelism", "max_instances", "leader_ttl", "orphans",
                        "default_strategy"})
STORE_KEYS = frozenset({"backend", "path", "endpoints", "prefix", "timeout", "tls", "username",
                        "password", "allow_insecure"})
POLICY_KEYS = frozenset({"min", "max", "max_step", "cooldown", "cooldown_up", "cooldown_down",
                         "stabilization", "on_error", "fallback", "fallback_after", "shadow"})
EMBEDDED_KEYS = frozenset({"backend", "path", "prefix"})
"""The store keys read here; an embedded store block with any other key is left to the model."""
NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
MAX_FILE = 4 * 1024 * 1024
MAX_INSTANCES = 100_000
MISSING = object()


@dataclass(frozen=True)
class QuickConfig:
    """What :func:`read_quick` vouches for, named like the full :class:`agent.config.Config`'s."""

    cluster: str
    prefix: str
    store_path: Path
    "the embedded store's file, resolved against the config file's folder"
    max_instances: int
    services: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    "service name -> (policy.min, policy.max)"

    @property
    def key_prefix(self) -> str:
        """``<prefix>/<cluster>``: where this cluster's keys live."""
        return f"{self.prefix.rstrip('/')}/{self.cluster}"

    def open_store(self) -> EmbeddedStore:
        return EmbeddedStore(self.store_path)


class _Unsure(Exception):
    """Something :func:`read_quick` does not vouch for: the whole config decides."""


def _loader_class() -> type[yaml.SafeLoader]:
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser when libyaml is there

    class Loader(base):  # type: ignore[misc, valid-type]
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
            self.flatten_mapping(node)
            keys = [self.construct_object(k, deep=True) for k, _ in node.value]
            if len(keys) != len({repr(k) for k in keys}):
                raise _Unsure("duplicate keys")
            return super().construct_mapping(node, deep=deep)

    return Loader


def read_quick(path: str | Path) -> QuickConfig | None:
    """The settings of an embedded-store config, or None where the whole config must decide."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_FILE:
            return None
        data = yaml.load(raw.decode("utf-8"), Loader=_loader_class())  # a SafeLoader
        return _settings(data, path)
    except Exception:  # noqa: BLE001 - _Unsure, unreadable, not UTF-8, bad YAML: the full load says
        return None


def _settings(data: Any, path: Path) -> QuickConfig:
    top = _mapping(data, {"agent", "defaults", "services"})
    agent = _mapping(top.get("agent"), AGENT_KEYS)
    store = _mapping(agent.get("store", {}), STORE_KEYS)
    if store.get("backend", "embedded") != "embedded" or set(store) - EMBEDDED_KEYS:
        raise _Unsure("another store, or settings of the store not read here")
    cluster = _text(agent.get("cluster"))
    prefix = _text(store.get("prefix", "/shipmate"))
    if not NAME.fullmatch(cluster) or not prefix.startswith("/"):
        raise _Unsure("a cluster or prefix the model rejects")
    store_path = Path(_text(store.get("path", ".shipmate/state.db")))
    if not store_path.is_absolute():
        store_path = path.resolve().parent / store_path
    ceiling = _count(agent.get("max_instances", 100))
    if not 1 <= ceiling <= MAX_INSTANCES:
        raise _Unsure("max_instances out of range")
    defaults, services = top.get("defaults", {}), top.get("services", {})
    if not isinstance(defaults, dict) or not isinstance(services, dict):
        raise _Unsure("defaults or services is not a mapping")
    policies = {}
    for name, service in services.items():
        if not (isinstance(name, str) and NAME.fullmatch(name) and isinstance(service, dict)):
            raise _Unsure("a service name or body the model rejects")
        policies[name] = _policy(_merged(defaults.get("policy", MISSING),
                                         service.get("policy", MISSING)))
    return QuickConfig(cluster=cluster, prefix=prefix, store_path=store_path,
                       max_instances=ceiling, services=policies)


def _merged(default: Any, own: Any) -> Any:
    """agent.config.merge for a policy block (its values are plain, one level suffices)."""
    if own is MISSING:
        return default
    if isinstance(default, dict) and isinstance(own, dict):
        return {**default, **own}
    return own


def _policy(block: Any) -> tuple[int, int | None]:
    policy = _mapping({} if block is MISSING else block, POLICY_KEYS)
    low = _count(policy.get("min", 0))
    high = policy.get("max")
    high = None if high is None else _count(high)
    if low < 0 or (high is not None and (high < 0 or high < low)):
        raise _Unsure("policy min/max the model rejects")
    return low, high


def _mapping(value: Any, allowed: frozenset[str] | set[str]) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) - set(allowed):
        raise _Unsure("not a mapping of known keys")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or "${" in value:
        raise _Unsure("not plain text")
    return value


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Unsure("not a whole number")
    return value
