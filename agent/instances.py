"""What an instance is, to the loop and to every actuator."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

LABEL_CLUSTER = "shipmate.cluster"
LABEL_SERVICE = "shipmate.service"
LABEL_VERSION = "shipmate.version"
LABEL_SLOT = "shipmate.slot"


def release_version(image: str | None, command: list[str] | None, env: dict[str, str],
                    port: int | None, shape: dict[str, Any] | None = None) -> str:
    """The short hash of a release spec: a changed image, command, env, port or shape (the
    actuator settings that shape an instance, like fleet's unit text) is a new version."""
    fields: dict[str, Any] = {"image": image, "command": command, "env": env, "port": port}
    if shape:  # absent when empty: versions from before shapes counted stay the same
        fields["shape"] = shape
    spec = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:10]


def instance_name(cluster: str, service: str, slot: int, version: str) -> str:
    """The stable name of a slot's instance of one version (container, unit or process)."""
    return f"{cluster}-{service}-{slot}-{version}"


@dataclass(frozen=True)
class InstanceSpec:
    """Everything an actuator needs to start one instance.

    ``command`` and ``env`` already have ``{port}``, ``{instance}`` and
    ``{service}`` filled in. ``labels`` carry the ``shipmate.*`` facts that let a
    restarted agent adopt what runs.
    """

    cluster: str
    service: str
    slot: int
    version: str
    name: str
    port: int | None
    image: str | None = None
    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # the service's extra keys


@dataclass(frozen=True)
class Instance:
    """An instance as the actuator reports it: what runs is the authority.

    ``running`` is False for an instance that exited but still exists (a stopped
    container, a dead process record): the loop removes and replaces it.
    ``host`` is the address other services reach it at.
    """

    name: str
    service: str
    slot: int
    version: str
    host: str
    port: int | None
    running: bool = True
    cluster: str = ""
    ref: Any = field(default=None, compare=False, repr=False)  # the actuator's own handle
    exit_code: int | None = field(default=None, compare=False)
    "how an exited instance ended, where the actuator knows it"


def fill(template: str, **values: object) -> str:
    """Fill ``{port}``-style fields, leaving unknown braces alone (shell scripts use them)."""
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", str(value))
    return out
