"""Shipmate's deploys, scale changes and crash loops as Datadog events.

An event-and-command plugin written only against ``agent``'s public API: it
declares the model of its ``plugins: {datadog-events: {...}}`` block, opens its
client in ``shipmate_configure`` and closes it in ``shipmate_unconfigure``,
turns event hooks into Datadog events, and adds ``shipmate datadog-events send``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Literal

import click
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from agent import Context, Duration, hookimpl
from shipmate_datadog_events.client import DatadogError, EventsClient

log = logging.getLogger("shipmate.datadog-events")
Kind = Literal["deploy", "desired", "crash_loop", "leadership"]


class DatadogEventsConfig(BaseModel):
    """The ``plugins: {datadog-events: {...}}`` block."""

    model_config = ConfigDict(extra="forbid")
    api_key: SecretStr
    "write it as ${DD_API_KEY}: taken from the environment, never echoed"
    api_url: str = Field("https://api.datadoghq.com", pattern=r"^https?://")
    "your site's API (https://api.datadoghq.eu, ...)"
    tags: list[str] = []
    "added to every event (cluster:NAME and service:NAME are always there)"
    events: list[Kind] = ["deploy", "desired", "crash_loop", "leadership"]
    "which events to post"
    timeout: Duration = 5.0
    "how long one post may take"
    queue: int = Field(1000, ge=1)
    "events that may wait to be sent; beyond, new ones are dropped (and logged)"


class _State:
    """The client of the configuration in force (None: not configured)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: EventsClient | None = None
        self.config: DatadogEventsConfig | None = None
        self.cluster = ""


state = _State()


# ---------------------------------------------------------------- lifecycle


@hookimpl
def shipmate_config_model() -> type[BaseModel]:
    return DatadogEventsConfig


@hookimpl
def shipmate_configure(config: DatadogEventsConfig | None, context: Context) -> None:
    if config is None:
        context.log.info("datadog-events: no plugins.datadog-events block: posting nothing")
        return
    client = EventsClient(config.api_url, config.api_key.get_secret_value(),
                          tags=[f"cluster:{context.cluster}", *config.tags],
                          timeout=config.timeout, queue_size=config.queue)
    client.start()
    with state.lock:
        state.client, state.config, state.cluster = client, config, context.cluster


@hookimpl
def shipmate_unconfigure() -> None:
    with state.lock:
        client, state.client, state.config = state.client, None, None
    if client is not None:
        client.close()


def _post(kind: str, service: str | None, title: str, text: str, *,
          alert_type: str = "info", group: str | None = None) -> None:
    with state.lock:
        client, config = state.client, state.config
    if client is None or config is None or kind not in config.events:
        return
    tags = [f"service:{service}"] if service else []
    key = f"shipmate-{state.cluster}-{service}-{group}" if group else None
    client.submit(title, text, alert_type=alert_type, tags=tags, aggregation_key=key)


# ---------------------------------------------------------------- events


def _field(deploy: Any, name: str) -> Any:
    """A journal field, whether the journal is a mapping or a typed object."""
    if isinstance(deploy, Mapping):
        return deploy.get(name)
    return getattr(deploy, name, None)


def _release(release: Any) -> str:
    image = _field(release, "image") if release is not None else None
    version = _field(release, "version") if release is not None else None
    return str(image or version or "?")


def _deploy_text(deploy: Any) -> str:
    old = _field(deploy, "from") or _field(deploy, "from_")
    return (f"from {_release(old)} to {_release(_field(deploy, 'to'))}, "
            f"deploy {_field(deploy, 'id')}, phase {_field(deploy, 'phase')}")


@hookimpl
def shipmate_deploy_started(service: str, deploy: Any) -> None:
    _post("deploy", service, f"{service}: deploy started", _deploy_text(deploy),
          group=str(_field(deploy, "id")))


@hookimpl
def shipmate_deploy_finished(service: str, deploy: Any) -> None:
    _post("deploy", service, f"{service}: deploy finished", _deploy_text(deploy),
          alert_type="success", group=str(_field(deploy, "id")))


@hookimpl
def shipmate_deploy_rolled_back(service: str, deploy: Any, reason: str) -> None:
    _post("deploy", service, f"{service}: deploy rolled back",
          f"{reason}\n{_deploy_text(deploy)}", alert_type="error",
          group=str(_field(deploy, "id")))


@hookimpl
def shipmate_desired_changed(service: str, old: int | None, new: int, reason: str) -> None:
    before = "none" if old is None else old
    _post("desired", service, f"{service}: desired count {before} -> {new}", reason)


@hookimpl
def shipmate_crash_loop(service: str, slot: int, restarts: int, last_exit: str,
                        next_try_in: float) -> None:
    _post("crash_loop", service, f"{service}: slot {slot} is crash-looping",
          f"{last_exit}; restart {restarts} in {next_try_in:.0f}s", alert_type="warning")


@hookimpl
def shipmate_leadership_gained(term: int) -> None:
    _post("leadership", None, f"shipmate agent on {os.uname().nodename} now leads "
          f"{state.cluster}", f"term {term}")


# ---------------------------------------------------------------- the command


@click.group("datadog-events")
def commands() -> None:
    """Datadog events from Shipmate (the datadog-events plugin)."""


@commands.command()
@click.argument("title")
@click.option("--text", default="sent by `shipmate datadog-events send`", show_default=True)
@click.option("--api-url", default="https://api.datadoghq.com", show_default=True)
@click.option("--tag", "tags", multiple=True, help="a tag (repeat for more)")
def send(title: str, text: str, api_url: str, tags: tuple[str, ...]) -> None:
    """Post one event now with $DD_API_KEY (checks the key and the URL)."""
    key = os.environ.get("DD_API_KEY")
    if not key:
        raise click.ClickException("set DD_API_KEY to your Datadog API key")
    client = EventsClient(api_url, key, tags=list(tags), timeout=10.0)
    try:
        event = client.post(title, text).get("event") or {}
    except DatadogError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"posted event {event.get('id')}: {event.get('url', '')}")


@hookimpl(optionalhook=True)  # an agent without this hook loads the plugin all the same
def shipmate_register_commands(cli: click.Group) -> None:
    cli.add_command(commands)
