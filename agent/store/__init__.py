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
    Watch,
    WatchEvent,
)

if TYPE_CHECKING:
    from agent.config import StoreConfig

__all__ = ["Entry", "Fence", "Lease", "NotLeading", "Store", "StoreError", "Watch",
           "WatchEvent", "open_store"]


def open_store(config: StoreConfig) -> Store:
    """Open the backend that ``config.backend`` names (etcd clients are imported lazily)."""
    if config.backend == "embedded":
        from agent.store.embedded import EmbeddedStore

        return EmbeddedStore(config.path)
    if config.backend == "etcd":
        from agent.store.etcd3 import Etcd3Store

        return Etcd3Store(config.endpoints, timeout=config.timeout)
    from agent.store.etcd2 import Etcd2Store

    return Etcd2Store(config.endpoints, timeout=config.timeout)
