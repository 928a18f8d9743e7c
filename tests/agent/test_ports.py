"""Port ranges: ``shipmate check`` refuses services whose slots would share a port."""

from __future__ import annotations

import pytest

from agent.config import ConfigError

SERVICES = """
agent: {{cluster: ports, http: "127.0.0.1:{http}"}}
services:
  web:
    command: [sleep, "1"]
    port: 8000
    source: {{type: static, count: 2}}
    policy: {{max: {max}}}
    actuator: {{type: process}}
  api:
    command: [sleep, "1"]
    port: 8010
    source: {{type: static, count: 2}}
    actuator: {{type: process}}
"""


def test_ranges_that_overlap_up_to_policy_max_are_refused_with_the_line(load_test_config):
    load_test_config(SERVICES.format(http=9464, max=10))  # 8000-8009 and 8010-8011: fine
    with pytest.raises(ConfigError) as caught:
        load_test_config(SERVICES.format(http=9464, max=11))
    (error,) = caught.value.errors
    assert (":11: services.api.port: ports 8010-8011 overlap service web's ports 8000-8010"
            in error)


def test_a_range_past_65535_or_over_agent_http_is_refused(load_test_config):
    with pytest.raises(ConfigError, match="cover agent.http.s port 8003"):
        load_test_config(SERVICES.format(http=8003, max=5))
    with pytest.raises(ConfigError, match="ports 65530-65539 pass 65535"):
        load_test_config(SERVICES.format(http=9464, max=10).replace("port: 8000",
                                                                    "port: 65530"))


def test_blue_green_colors_count_as_ranges_too(load_test_config):
    text = SERVICES.format(http=9464, max=2).replace("port: 8010", "port: 8020") + (
        "    deploy: {type: blue-green, ports: [%d, 9010]}\n")
    load_test_config(text % 8030)
    with pytest.raises(ConfigError, match="ports 8001-8002 overlap service web's ports 8000-8001"):
        load_test_config(text % 8001)
