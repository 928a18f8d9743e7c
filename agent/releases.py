"""Releases: what version of a service should run, as recorded in the store.

The ``release`` key holds the running release as JSON::

    {"image": "registry/web:1.5", "port": 8080, "version": "3f2a9c01de",
     "spec": "<version of the YAML spec it was made from>",
     "when": 1764280000.0, "by": "ops@host", "deploy": {"id": ..., "result": ...},
     "previous": {...the release before...}}

Without a ``release`` key the YAML is the release. ``image`` and ``port`` may
differ from the YAML: a deploy of ``--image`` changes the image, a blue/green
deploy moves the port to the other color. ``spec`` remembers which YAML the
release was made from, so a changed YAML (on reload) is noticed and deployed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from agent.instances import release_version


@dataclass(frozen=True)
class Release:
    """An image and base port, with the version hash of the whole spec."""

    image: str | None
    port: int | None
    version: str
    spec: str

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {**asdict(self), "when": time.time(), **extra}

    @property
    def label(self) -> str:
        """How a person names it: the image, else the version."""
        return f"{self.image or 'command'}@{self.port}" if self.port else (
            self.image or self.version)


def make_release(config: Any, image: str | None = None, port: int | None = None) -> Release:
    """The release of a service's YAML ``config``, optionally with another image or port."""
    image = image if image is not None else config.image
    port = port if port is not None else config.port
    spec = release_version(config.image, config.command, config.env, config.port)
    return Release(image, port, release_version(image, config.command, config.env, port), spec)


def parse_release(data: dict[str, Any] | None) -> Release | None:
    """The release recorded in the store, or None if absent or malformed."""
    if not isinstance(data, dict):
        return None
    image, port, version = data.get("image"), data.get("port"), data.get("version")
    if (not isinstance(version, str) or not (image is None or isinstance(image, str))
            or not (port is None or isinstance(port, int))):
        return None
    return Release(image, port, version, str(data.get("spec", "")))
