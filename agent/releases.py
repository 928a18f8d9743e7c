"""Releases: what version of a service should run, as recorded in the store.

The ``release`` key holds the running release as JSON::

    {"image": "registry/web:1.5", "port": 8080, "version": "3f2a9c01de",
     "spec": "<version of the YAML spec it was made from>",
     "command": [...], "env": {...}, "secret_env": ["TOKEN"], "shape": {...},
     "when": 1764280000.0, "by": "ops@host", "deploy": {"id": ..., "result": ...},
     "previous": {...the release before...}, "held": "<spec of a YAML not to deploy>"}

A release records the whole spec it was started from: image, command, env,
port and the actuator settings that shape an instance (``shape``: docker's
network and volumes, fleet's unit text, as each actuator's config names them in
``shape_fields``). The version hash covers all of it, so any change is a new
version, and a rollback restores exactly what ran. Env values the YAML took from
the environment (``${VAR}``) are never stored: ``secret_env`` names their keys
and they are taken from the YAML again when the release is started.

Without a ``release`` key the YAML is the release. ``spec`` remembers which
YAML the release was made from, so a changed YAML (on reload) is noticed and
deployed; ``held`` names a YAML spec whose deploy was rolled back (by a failure,
``shipmate abort`` or ``shipmate rollback``): it is not requested again until
the YAML changes again.
"""

from __future__ import annotations

import fnmatch
import re
import time
from dataclasses import dataclass, field
from typing import Any

from agent.instances import release_version

VERSION = re.compile(r"^[0-9a-f]{10}$")
"""A release version: the short hash :func:`agent.instances.release_version` makes."""

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*(?::[0-9]{1,5})?/)?"
IMAGE = re.compile(rf"^{_DOMAIN}{_COMPONENT}(?:/{_COMPONENT})*"
                   r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")
"""An image reference as Docker reads one: [registry[:port]/]name[:tag][@sha256:digest]
(never anything that could read as an option or hold a space or a path trick)."""


def is_image_reference(text: object) -> bool:
    """True if ``text`` is an image reference (:data:`IMAGE`): safe to paste as one word."""
    return isinstance(text, str) and IMAGE.match(text) is not None


def repository(image: str) -> str:
    """``registry:5000/team/web`` of ``registry:5000/team/web:1.4`` (or of a digest)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def allowed_images(config: Any) -> list[str]:
    """The patterns a deploy's image must match: the service's ``deploy.images``, else any
    tag or digest of the YAML image's repository (the process actuator: the YAML's image
    only, as its command uses it as a name; none for a service without an image)."""
    deploy = getattr(config, "deploy", None)
    patterns = list(getattr(deploy, "images", None) or [])
    if patterns:
        return patterns
    if not config.image:
        return []
    if getattr(getattr(config, "actuator", None), "type", None) == "process":
        return [config.image]  # its "image" is a name its command uses: the YAML's only
    repo = repository(config.image)
    return [f"{repo}:*", f"{repo}@sha256:*"]


def image_problem(config: Any, image: str | None) -> str | None:
    """Why ``image`` may not run as the service of ``config``, or None if it may (the YAML's
    own image always may; any other must be an image reference matching
    :func:`allowed_images`)."""
    if image is None or image == config.image:
        return None
    if not isinstance(image, str) or not IMAGE.match(image):
        return f"image {str(image)[:80]!r} is not an image reference"
    patterns = allowed_images(config)
    if not any(fnmatch.fnmatchcase(image, pattern) for pattern in patterns):
        shown = ", ".join(patterns) or "none: the YAML has no image"
        return f"image {image!r} is not among the service's deploy.images ({shown})"
    return None


@dataclass(frozen=True)
class Release:
    """An image, base port, command, env and shape, with the version hash of all of them.

    ``command``, ``env`` and ``shape`` are None in a release recorded before they
    were: such a release runs the YAML's.
    """

    image: str | None
    port: int | None
    version: str
    spec: str
    command: list[str] | None = None
    env: dict[str, str] | None = None
    shape: dict[str, Any] | None = None
    secret_env: tuple[str, ...] = field(default=())

    def to_json(self, **extra: Any) -> dict[str, Any]:
        data: dict[str, Any] = {"image": self.image, "port": self.port, "version": self.version,
                                "spec": self.spec}
        if self.command is not None:
            data["command"] = self.command
        if self.env is not None:
            data["env"] = {k: v for k, v in self.env.items() if k not in self.secret_env}
            if self.secret_env:
                data["secret_env"] = sorted(self.secret_env)
        if self.shape:
            data["shape"] = self.shape
        return {**data, "when": time.time(), **extra}

    @property
    def label(self) -> str:
        """How a person names it: the image, else the version."""
        return f"{self.image or 'command'}@{self.port}" if self.port else (
            self.image or self.version)

    def command_for(self, config: Any) -> list[str] | None:
        """The command to run: the release's, else (an old record) the YAML's."""
        return self.command if self.command is not None else config.command

    def env_for(self, config: Any) -> dict[str, str]:
        """The env to run: the release's, with secrets taken from the YAML again."""
        if self.env is None:
            return dict(config.env)
        secrets = {k: config.env[k] for k in self.secret_env if k in config.env}
        return {**self.env, **secrets}


def shape_of(config: Any) -> dict[str, Any]:
    """The actuator settings of a service's YAML that shape its instances."""
    actuator = getattr(config, "actuator", None)
    fields = getattr(actuator, "shape_fields", ())
    if actuator is None or not fields:
        return {}
    # only what differs from the actuator's defaults: a release recorded before shapes were
    # part of the version keeps its version
    return actuator.model_dump(include=set(fields), mode="json", exclude_defaults=True)


def secret_keys(config: Any) -> tuple[str, ...]:
    """The env keys whose values the YAML took from the environment."""
    secrets = getattr(config, "_secrets", None) or frozenset()
    return tuple(sorted(k for k, v in config.env.items() if any(s and s in v for s in secrets)))


def make_release(config: Any, image: str | None = None, port: int | None = None) -> Release:
    """The release of a service's YAML ``config``, optionally with another image or port."""
    image = image if image is not None else config.image
    port = port if port is not None else config.port
    command, env, shape = config.command, dict(config.env), shape_of(config)
    spec = release_version(config.image, command, env, config.port, shape)
    return Release(image, port, release_version(image, command, env, port, shape), spec,
                   command=command, env=env, shape=shape, secret_env=secret_keys(config))


def restore_release(recorded: Release, config: Any, port: int | None) -> Release:
    """``recorded`` (an earlier release) as it runs again now, on ``port``.

    Its image, command, env and shape come back as they were; secrets come from
    the YAML. On its own port the version is the recorded one.
    """
    command, env = recorded.command_for(config), recorded.env_for(config)
    shape = recorded.shape if recorded.shape is not None else shape_of(config)
    version = (recorded.version if port == recorded.port
               else release_version(recorded.image, command, env, port, shape))
    return Release(recorded.image, port, version, recorded.spec, command=command, env=env,
                   shape=shape, secret_env=recorded.secret_env)


def parse_release(data: Any) -> Release | None:
    """The release recorded in the store, or None if absent or malformed: the version must
    be a version hash, the image an image reference, the port a port."""
    if not isinstance(data, dict):
        return None
    image, port, version = data.get("image"), data.get("port"), data.get("version")
    spec = data.get("spec", "")
    if not isinstance(version, str) or not VERSION.match(version):
        return None
    if not (image is None or (isinstance(image, str) and IMAGE.match(image))):
        return None
    if not (port is None or (type(port) is int and 1 <= port <= 65535)):
        return None
    if not isinstance(spec, str) or len(spec) > 64:
        return None
    command, env, shape = data.get("command"), data.get("env"), data.get("shape")
    if not (isinstance(command, list) and all(isinstance(p, str) for p in command)):
        command = None
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        env = None
    secret = data.get("secret_env")
    secret = tuple(k for k in secret if isinstance(k, str)) if isinstance(secret, list) else ()
    return Release(image, port, version, spec, command=command, env=env,
                   shape=shape if isinstance(shape, dict) else None, secret_env=secret)


def config_deploy(release: dict[str, Any] | None, wanted: Release,
                  versions: list[str]) -> str | None:
    """What the YAML asks of a service with no deploy running.

    :param release: the ``release`` key as read (None if absent).
    :param wanted: the YAML's release.
    :param versions: the versions of the running instances.
    :returns: ``"record"`` (nothing recorded and the YAML's version runs: record
        it), ``"deploy"`` (the YAML changed: deploy it), or None. A YAML whose
        deploy rolled back (``held``) is not deployed again until it changes.
    """
    recorded = parse_release(release)
    if recorded is None:
        return "record" if all(v == wanted.version for v in versions) else "deploy"
    if recorded.spec == wanted.spec or release.get("held") == wanted.spec:
        return None
    return "deploy"


def yaml_differs(release: dict[str, Any] | None, wanted: Release) -> str | None:
    """Why the YAML differs from what runs, for ``shipmate status`` (None if it does not)."""
    recorded = parse_release(release)
    if recorded is None or recorded.spec == wanted.spec or release is None:
        return None
    if release.get("held") == wanted.spec:
        outcome = release.get("deploy") or {}
        if outcome.get("result") == "rolled-back":
            why = f"its deploy rolled back ({outcome.get('reason') or 'failed'})"
        else:
            why = f"{release.get('by') or 'ops'} rolled back to this release"
        return (f"the YAML differs from what runs ({recorded.version}): {why}; the YAML is "
                "deployed again once it changes again")
    return "the YAML differs from what runs: a deploy of it is due"


def release_problem(config: Any, data: Any, what: str = "release") -> str | None:
    """Why a release from the store may not run as the service of ``config``, or None."""
    release = parse_release(data)
    if release is None:
        return (f"{what} is malformed (a version hash, an image reference and a port "
                "are expected)")
    return image_problem(config, release.image)
