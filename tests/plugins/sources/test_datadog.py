"""The ``datadog`` source against a local stand-in answering like Datadog's query API."""

from __future__ import annotations

import logging
import time

import pytest

from agent import SourceError
from agent.config import ConfigError
from tests.plugins.sources.datadog_server import API_KEY, APP_KEY, DatadogStandIn
from tests.services import free_port

QUERY = "sum:queue.depth{service:web}"


@pytest.fixture
def dd(monkeypatch):
    monkeypatch.setenv("DD_API_KEY", API_KEY)
    monkeypatch.setenv("DD_APP_KEY", APP_KEY)
    server = DatadogStandIn()
    yield server
    server.close()


@pytest.fixture
def source(load_test_config, shipmate_plugins, tmp_path, embedded_store):
    """``source(api_host, **keys)`` -> a DatadogSource built from YAML like a user writes."""
    from agent.kinds import Context

    def make(api_host: str, **keys) -> object:
        extra = "".join(f", {k}: {v}" for k, v in keys.items())
        config = load_test_config(f"""
            agent: {{cluster: t}}
            services:
              web:
                source: {{type: datadog, query: "{QUERY}", target: 100,
                          api_host: "{api_host}"{extra}}}
                actuator: {{type: process}}
            """)
        cfg = config.services["web"].source
        cls = shipmate_plugins.types["source"]["datadog"].cls
        return cls(cfg, Context(cluster="t", store=embedded_store, state_dir=tmp_path))

    return make


def test_value_over_target_and_the_request_datadog_gets(dd, source):
    dd.answer("value", value=450)
    before = time.time()
    assert source(dd.url, window="2m").read() == pytest.approx(4.5)
    request = dd.requests[-1]
    assert request["path"] == "/api/v1/query"
    assert request["params"]["query"] == QUERY
    assert before - 121 <= int(request["params"]["from"]) <= before - 119
    assert abs(int(request["params"]["to"]) - before) <= 2
    assert request["headers"]["dd-api-key"] == API_KEY
    assert request["headers"]["dd-application-key"] == APP_KEY


@pytest.mark.parametrize(("aggregation", "expected"), [
    ("avg", 200), ("max", 300), ("min", 100), ("sum", 600), ("last", 200),
])
def test_aggregations_skip_null_points(dd, source, aggregation, expected):
    # oldest first as Datadog sends them; the newest point is a null (still being ingested)
    dd.answer("points", points=[(40, 100), (30, 300), (20, None), (10, 200), (0, None)])
    assert source(dd.url, aggregation=aggregation).read() == pytest.approx(expected / 100)


def test_an_empty_series_is_an_error_not_zero(dd, source):
    dd.answer("empty")
    with pytest.raises(SourceError, match=r"datadog returned no series for 'sum:queue.depth"):
        source(dd.url).read()


def test_only_null_points_is_an_error(dd, source):
    dd.answer("points", points=[(20, None), (10, None)])
    with pytest.raises(SourceError, match="only null points"):
        source(dd.url).read()


def test_a_newest_point_older_than_expiry_is_an_error(dd, source):
    dd.answer("value", value=450, age=120)
    with pytest.raises(SourceError, match=r"newest point .* is 2m old \(expiry 1m\)"):
        source(dd.url, expiry="1m").read()
    # the default expiry is three intervals
    with pytest.raises(SourceError, match=r"is 2m old \(expiry 1m30s\)"):
        source(dd.url, interval="30s").read()
    dd.answer("value", value=450, age=20)
    assert source(dd.url, interval="30s").read() == pytest.approx(4.5)


def test_several_series_are_an_error(dd, source):
    dd.answer("multi", values=[100, 200])
    with pytest.raises(SourceError, match="returned 2 series .* needs one"):
        source(dd.url).read()


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors(dd, source, status):
    dd.answer("error", status=status)
    with pytest.raises(SourceError, match=f"^datadog answered {status}$"):
        source(dd.url).read()


def test_a_rejected_key_is_named_and_never_shown(dd, source, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DD_API_KEY", "wrong-key-123456")
    with pytest.raises(SourceError, match="datadog refused the query: Forbidden") as err:
        source(dd.url).read()
    assert dd.served[-1][1] == "forbidden"
    assert "wrong-key-123456" not in str(err.value) + caplog.text
    assert APP_KEY not in str(err.value) + caplog.text


def test_missing_keys_are_named(dd, source, monkeypatch):
    monkeypatch.delenv("DD_API_KEY")
    monkeypatch.delenv("DD_APP_KEY")
    with pytest.raises(SourceError, match="DD_API_KEY and DD_APP_KEY not set in the environment"):
        source(dd.url).read()
    assert dd.requests == []


def test_an_error_status_in_the_body(dd, source):
    dd.answer("status_error", error="Error parsing query: unknown function foo")
    with pytest.raises(SourceError, match="query failed: Error parsing query"):
        source(dd.url).read()


def test_a_hang_past_the_timeout(dd, source):
    dd.answer("hang", seconds=5)
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"^datadog did not answer within 500ms$"):
        source(dd.url, timeout="500ms").read()
    assert time.monotonic() - started < 2.5
    dd.answer("value", value=100)  # and the next poll works again
    assert source(dd.url, timeout="500ms").read() == pytest.approx(1.0)


def test_nobody_listening(source, dd):
    with pytest.raises(SourceError, match="datadog cannot be reached at http://127.0.0.1:"):
        source(f"http://127.0.0.1:{free_port()}").read()


def test_config_errors_name_the_key(load_test_config):
    with pytest.raises(ConfigError) as err:
        load_test_config("""
            agent: {cluster: t}
            services:
              web:
                source: {type: datadog, query: "avg:x{*}", target: 0, aggregation: median}
                actuator: {type: process}
            """)
    text = str(err.value)
    assert "services.web.source.target: Input should be greater than 0" in text
    assert "services.web.source.aggregation: Input should be 'avg', 'max', 'min', 'sum' or" in text
    assert text.count("agent.yaml:4:") == 2


def test_keys_in_the_yaml_are_refused(load_test_config):
    with pytest.raises(ConfigError, match=r"unknown key 'api_key'"):
        load_test_config("""
            agent: {cluster: t}
            services:
              web:
                source: {type: datadog, query: "avg:x{*}", target: 1, api_key: abc}
                actuator: {type: process}
            """)
