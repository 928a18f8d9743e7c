"""The store: where desired counts, overrides, releases, deploy journals and
announcements live. See :mod:`agent.store.base` for the contract."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.store.base import (
    Entry,
    Fence,
    Lease,
    NotLeading,
    Store,
    StoreError,
    StoreRefused,
    Watch,
    WatchEvent,
)

if TYPE_CHECKING:
    from agent.config import StoreConfig

__all__ = ["Entry", "Fence", "Lease", "NotLeading", "Store", "StoreError", "StoreRefused",
           "Watch", "WatchEvent", "open_store"]


def open_store(config: StoreConfig) -> Store:
    """Open the backend that ``config.backend`` names (etcd clients are imported lazily)."""
    if config.backend == "embedded":
        from agent.store.embedded import EmbeddedStore

        return EmbeddedStore(config.path)
    password = config.password.get_secret_value() if config.password is not None else None
    options = {"timeout": config.timeout, "tls": config.tls, "username": config.username,
               "password": password}
    if config.backend == "etcd":
        from agent.store.etcd3 import Etcd3Store

        return Etcd3Store(config.endpoints, **options)
    from agent.store.etcd2 import Etcd2Store

    return Etcd2Store(config.endpoints, **options)
