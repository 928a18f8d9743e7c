"""The logging filter that keeps configured secrets out of every log line."""

from __future__ import annotations

import io
import logging

import pytest

from agent import masking
from agent.masking import SecretFilter, environment_secrets, secret_values


@pytest.fixture
def logger():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    secrets = SecretFilter()
    handler.addFilter(secrets)
    log = logging.getLogger("test.masking.lib")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield log, secrets, stream
    log.removeHandler(handler)


def test_values_are_masked_in_messages_arguments_and_tracebacks(logger):
    log, secrets, stream = logger
    secrets.add(["hunter2-value", "abc"])  # "abc" is too short to mask
    log.info("token %s and %r", "hunter2-value", {"k": "hunter2-value"})
    try:
        raise ValueError("bad hunter2-value")
    except ValueError:
        log.exception("failed with abc")
    text = stream.getvalue()
    assert "hunter2-value" not in text
    assert text.count("***") == 4 and "abc" in text and "ValueError: bad ***" in text


def test_which_values_are_secrets(load_test_config, monkeypatch):
    env = {"AWS_SECRET_ACCESS_KEY": "s1", "DD_API_KEY": "s2", "ETCD_PASSWORD": "s3",
           "AWS_SESSION_TOKEN": "s4", "HOME": "/root", "LANG": "C"}
    assert sorted(environment_secrets(env)) == ["s1", "s2", "s3", "s4"]
    monkeypatch.setenv("ETCD_PW", "pw-from-env-1234")
    config = load_test_config("""
        agent:
          cluster: demo
          store: {backend: etcd, endpoints: ["https://e:2379"], username: u,
                  password: "${ETCD_PW}"}
        services: {}
        """)
    assert "pw-from-env-1234" in secret_values(config.agent)
    assert masking.FILTER.mask("x pw-from-env-1234") == "x ***"  # loading remembered it


@pytest.mark.parametrize(("verbosity", "level"), [(0, logging.WARNING), (1, logging.WARNING),
                                                  (2, logging.NOTSET)])
def test_third_party_loggers_stay_at_warning_unless_vv(verbosity, level):
    try:
        masking.install(verbosity)
        for name in ("botocore", "urllib3", "docker", "datadog"):
            assert logging.getLogger(name).level == level
    finally:
        masking.install(0)
