"""The static source."""

from __future__ import annotations

import pytest

from agent.config import ConfigError


def test_static_count_and_validation(load_test_config):
    config = load_test_config("""
        agent: {cluster: t}
        services:
          web: {source: {type: static, count: 4}, actuator: {type: process}}
        """)
    from plugins.sources.static import StaticSource

    source = StaticSource(config.services["web"].source, None)
    assert source.read() == 4
    with pytest.raises(ConfigError, match="count: Input should be greater than or equal to 0"):
        load_test_config("""
            agent: {cluster: t}
            services:
              web: {source: {type: static, count: -4}, actuator: {type: process}}
            """)
