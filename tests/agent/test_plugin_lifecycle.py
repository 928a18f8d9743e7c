"""A plugin's life in a running agent: its ``plugins:`` block, configure at start,
unconfigure and configure again on a reload, unconfigure at the stop, its metrics on
/metrics; a configure that fails stops the start, naming the plugin."""

from __future__ import annotations

import threading
import urllib.request

import pytest
from prometheus_client import Counter
from pydantic import BaseModel, Field

from agent import hookimpl
from agent.config import ConfigError
from agent.plugins import PluginError, load_plugins
from agent.runtime import Agent
from tests.helpers import eventually
from tests.services import free_port


class NotifierConfig(BaseModel):
    channel: str
    retries: int = Field(3, ge=0)


class Notifier:
    """Opens a "client" in configure, closes it in unconfigure, counts in a metric."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.lock = threading.Lock()

    @hookimpl
    def shipmate_config_model(self):
        return NotifierConfig

    @hookimpl
    def shipmate_configure(self, config, context):
        with self.lock:
            self.log.append(("configure", config and config.channel, context.cluster))

    @hookimpl
    def shipmate_unconfigure(self):
        with self.lock:
            self.log.append(("unconfigure",))

    @hookimpl
    def shipmate_register_metrics(self, registry):
        self.sent = Counter("notifier_sent", "notifications sent", registry=registry)
        self.sent.inc(7)

    def seen(self) -> list[tuple]:
        with self.lock:
            return list(self.log)


def _get(url: str) -> bytes | None:
    try:
        return urllib.request.urlopen(url, timeout=5).read()
    except OSError:
        return None  # not listening yet


CONFIG = """
agent: {{cluster: life, interval: 30s, http: "127.0.0.1:{http}"}}
plugins:
  notifier: {{channel: {channel}}}
services: {{}}
"""


def test_configure_reload_metrics_and_unconfigure(run_agent, write_config):
    notifier = Notifier()
    plugins = load_plugins(extra=[("notifier", notifier)])
    http = free_port()
    agent = run_agent(CONFIG.format(http=http, channel="ops"), plugins=plugins)
    eventually(lambda: notifier.seen() == [("configure", "ops", "life")], 20, "configure")
    assert b"notifier_sent_total 7.0" in eventually(lambda: _get(
        f"http://127.0.0.1:{http}/metrics"), 20, "/metrics")
    write_config(CONFIG.format(http=http, channel="deploys"))
    agent.request_reload()
    eventually(lambda: len(notifier.seen()) == 3, 20, "the reload")
    assert notifier.seen()[1:] == [("unconfigure",), ("configure", "deploys", "life")]
    agent.stop()
    eventually(lambda: len(notifier.seen()) == 4, 20, "the stop")
    assert notifier.seen()[-1] == ("unconfigure",)


def test_a_bad_block_is_a_config_error_with_its_line(write_config):
    plugins = load_plugins(extra=[("notifier", Notifier())])
    path = write_config("""
        agent: {cluster: life}
        plugins:
          notifier:
            channel: ops
            retires: 2
          notifer: {}
        """)
    with pytest.raises(ConfigError) as caught:
        Agent(path, plugins=plugins)
    assert caught.value.errors == [
        f"{path}:5: plugins.notifier.retires: unknown key 'retires' (did you mean 'retries'?)",
        f"{path}:6: plugins.notifer: unknown plugin 'notifer' (did you mean 'notifier'?)",
    ]


def test_a_block_of_a_blocked_plugin_waits_for_it(write_config):
    path = write_config("""
        agent: {cluster: life}
        plugins:
          notifier: {channel: ops}
        """)
    plugins = load_plugins(block=["notifier"], extra=[])
    from agent.config import load_config

    assert load_config(path, plugins).plugins == {}


def test_a_failing_configure_stops_the_start_naming_the_plugin(write_config):
    class Refuses(Notifier):
        @hookimpl
        def shipmate_configure(self, config, context):
            raise PermissionError("the API key was refused")

    refuses = Refuses()
    plugins = load_plugins(extra=[("notifier", refuses)])
    agent = Agent(write_config(CONFIG.format(http=free_port(), channel="ops")),
                  plugins=plugins)
    try:
        with pytest.raises(PluginError, match="plugin 'notifier': shipmate_configure failed: "
                           "PermissionError: the API key was refused"):
            agent.run()
    finally:
        agent.store.close()
    assert refuses.seen() == [("unconfigure",)]


def test_the_blocks_are_in_the_schema_and_a_misspelled_plugins_key_is_hinted(write_config):
    from agent.config import file_model, load_config

    plugins = load_plugins(extra=[("notifier", Notifier())])
    schema = file_model(plugins).model_json_schema()
    block = schema["$defs"]["PluginBlocks"]["properties"]["notifier"]["anyOf"][0]["$ref"]
    notifier = schema["$defs"][block.rsplit("/", 1)[-1]]
    assert notifier["required"] == ["channel"] and notifier["additionalProperties"] is False
    path = write_config("""
        agent: {cluster: life}
        plugin:
          notifier: {channel: ops}
        """)
    with pytest.raises(ConfigError, match=r":2: plugin: unknown key 'plugin' \(did you mean "
                       r"'plugins'\?\)"):
        load_config(path, plugins)
