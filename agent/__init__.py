"""Shipmate: keeps containerized services at the right size, deploys and announces them.

The public API for plugin authors is what this module exports; ``plugins``
(the built-ins) import nothing else from ``agent``.

Writing a plugin
----------------
A plugin is a module with ``@hookimpl`` functions named after the specs in
:mod:`agent.hookspecs` (the whole contract). Offer a type of a kind::

    from pydantic import Field
    from agent import SourceConfig, Source, hookimpl

    class QueueConfig(SourceConfig):
        queue: str
        per_instance: int = Field(100, ge=1)

    class QueueSource(Source):
        type_name = "queue"
        Config = QueueConfig

        def read(self) -> float:
            return queue_length(self.config.queue) / self.config.per_instance

    @hookimpl
    def shipmate_source_types():
        return [QueueSource]

and ship it with an entry point in its ``pyproject.toml``::

    [project.entry-points.shipmate]
    queue = "shipmate_queue"

Then ``source: {type: queue, queue: jobs}`` works in ``etc/agent.yaml``, and
``shipmate plugins`` lists it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports
    from agent.deploys import (
        DeployError,
        DeployJournal,
        Deployment,
        Interrupted,
        LockLost,
        Phase,
    )
    from agent.durations import Duration, Timeout, format_duration, parse_duration
    from agent.health import probe
    from agent.hookspecs import PROJECT, hookimpl
    from agent.instances import (
        LABEL_CLUSTER,
        LABEL_SERVICE,
        LABEL_SLOT,
        LABEL_VERSION,
        Instance,
        InstanceSpec,
        fill,
    )
    from agent.kinds import (
        Actuator,
        Announcer,
        AnnouncerConfig,
        Context,
        Parking,
        PluginType,
        Source,
        SourceConfig,
        SourceError,
        Strategy,
        StrategyConfig,
        TypeConfig,
        can_park,
    )
    from agent.releases import Release, is_image_reference
    from agent.store import Entry, Lease, NotLeading, Store, StoreError, Watch, WatchEvent
    from agent.tls import TLSConfig

# Each export -> the module that defines it, imported on first use (PEP 562), so that
# ``import agent.cli`` or ``agent.store`` costs no pydantic, pluggy or plugin kinds. To
# export a name: add it here, to the TYPE_CHECKING imports above and to __all__.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("DeployError", "DeployJournal", "Deployment", "Interrupted", "LockLost",
                     "Phase"), "agent.deploys"),
    **dict.fromkeys(("Duration", "Timeout", "format_duration", "parse_duration"),
                    "agent.durations"),
    "probe": "agent.health",
    **dict.fromkeys(("PROJECT", "hookimpl"), "agent.hookspecs"),
    **dict.fromkeys(("LABEL_CLUSTER", "LABEL_SERVICE", "LABEL_SLOT", "LABEL_VERSION",
                     "Instance", "InstanceSpec", "fill"), "agent.instances"),
    **dict.fromkeys(("Actuator", "Announcer", "AnnouncerConfig", "Context", "PluginType",
                     "Source", "SourceConfig", "SourceError", "Strategy", "StrategyConfig",
                     "TypeConfig", "Parking", "can_park"), "agent.kinds"),
    **dict.fromkeys(("Release", "is_image_reference"), "agent.releases"),
    **dict.fromkeys(("Entry", "Lease", "NotLeading", "Store", "StoreError", "Watch",
                     "WatchEvent"), "agent.store"),
    "TLSConfig": "agent.tls",
}

__all__ = [
    "LABEL_CLUSTER", "LABEL_SERVICE", "LABEL_SLOT", "LABEL_VERSION", "PROJECT",
    "Actuator", "Announcer", "AnnouncerConfig", "Context", "DeployError", "DeployJournal",
    "Deployment", "Duration", "Entry", "Instance", "InstanceSpec", "Interrupted", "Lease",
    "LockLost", "NotLeading", "Parking", "Phase", "PluginType", "Release", "Source",
    "SourceConfig", "SourceError", "Store", "StoreError", "Strategy", "StrategyConfig",
    "TLSConfig", "Timeout", "TypeConfig", "Watch", "WatchEvent", "can_park", "fill",
    "format_duration", "hookimpl", "is_image_reference", "parse_duration", "probe",
]


def __getattr__(name: str) -> Any:
    """Import an export's module on first use and keep the name here (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agent' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
