"""Config loading: every mistake reported at once with file, line and key."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, merge

GOOD = """
agent:
  cluster: demo
  interval: 1m30s
defaults:
  actuator: {type: process}
  announce: {type: etcd, ttl: 45s}
services:
  web:
    command: [python3, -m, http.server, "{port}"]
    port: 8080
    source: {type: static, count: 2}
    announce: {type: etcd, key: "/svc/{service}/{instance}"}
"""


def test_valid_config_merges_defaults_and_parses_durations(load_test_config):
    config = load_test_config(GOOD)
    assert config.agent.interval == 90
    web = config.services["web"]
    assert web.actuator.type == "process"
    assert web.announce.ttl == 45  # from defaults
    assert web.announce.key == "/svc/{service}/{instance}"  # from the service
    assert web.source.count == 2
    assert config.key_prefix == "/shipmate/demo"


def test_three_mistakes_give_three_errors_with_lines(load_test_config):
    with pytest.raises(ConfigError) as caught:
        load_test_config("""
            agent:
              cluster: demo
            services:
              web:
                command: [sleep, "100"]
                prot: 8080
                source: {type: static, count: -1}
                actuator: {type: process}
                health: {http: /, timeout: soon}
            """)
    errors = caught.value.errors
    assert len(errors) == 3, errors
    assert errors[0].endswith(":6: services.web.prot: unknown key 'prot' (did you mean 'port'?)")
    assert ":7: services.web.source.count: " in errors[1]
    assert ":9: services.web.health.timeout: expected a duration" in errors[2]
    assert all(e.startswith(str(caught.value.errors[0]).split(":")[0]) for e in errors)


def test_unknown_plugin_type_names_the_installed_ones(load_test_config):
    with pytest.raises(ConfigError) as caught:
        load_test_config("""
            agent: {cluster: demo}
            services:
              web:
                source: {type: magic}
                actuator: {type: process}
            """)
    (error,) = caught.value.errors
    assert ":4: services.web.source: unknown type 'magic'" in error
    assert "'static'" in error


def test_error_in_a_merged_default_is_reported_once_at_the_defaults_line(load_test_config):
    with pytest.raises(ConfigError) as caught:
        load_test_config("""
            agent: {cluster: Demo_1}
            defaults:
              actuator: {type: process, colour: red}
            services:
              web:
                source: {type: static, count: 1}
              api:
                source: {type: static, count: 1}
            """)
    cluster, colour = caught.value.errors
    assert cluster.endswith(":1: agent.cluster: use lowercase letters, digits and '-', "
                            "starting and ending with a letter or digit (like web-api)")
    assert ":3: defaults.actuator.colour: unknown key 'colour'" in colour


def test_environment_variables_fill_in_and_missing_ones_are_errors(load_test_config,
                                                                   monkeypatch):
    monkeypatch.setenv("SHIPMATE_TEST_TOKEN", "s3cret")
    config = load_test_config("""
        agent: {cluster: demo}
        services:
          web:
            env: {TOKEN: "${SHIPMATE_TEST_TOKEN}", MODE: "${SHIPMATE_TEST_MODE:-fast}"}
            source: {type: static, count: 1}
            actuator: {type: process}
        """)
    assert config.services["web"].env == {"TOKEN": "s3cret", "MODE": "fast"}
    with pytest.raises(ConfigError) as caught:
        load_test_config("""
            agent: {cluster: "${SHIPMATE_TEST_UNSET}"}
            services: {}
            """)
    assert any(":1: agent.cluster: environment variable SHIPMATE_TEST_UNSET is not set" in e
               for e in caught.value.errors)


def test_secrets_never_appear_in_errors(load_test_config, monkeypatch):
    monkeypatch.setenv("SHIPMATE_TEST_SECRET", "hunter2")
    with pytest.raises(ConfigError) as caught:
        load_test_config("""
            agent: {cluster: demo, interval: "${SHIPMATE_TEST_SECRET}"}
            services: {}
            """)
    assert "hunter2" not in str(caught.value)


def test_yaml_syntax_error_has_a_line(load_test_config):
    with pytest.raises(ConfigError) as caught:
        load_test_config("agent:\n  cluster: demo\nservices:\n  web: [unclosed\n")
    assert ":5: invalid YAML" in caught.value.errors[0] or ":4: invalid YAML" in (
        caught.value.errors[0])


def test_duplicate_keys_and_bad_service_names_are_errors(load_test_config):
    with pytest.raises(ConfigError) as caught:
        load_test_config("""
            agent: {cluster: demo}
            agent: {cluster: other}
            services:
              Bad_Name:
                source: {type: static, count: 1}
                actuator: {type: process}
            """)
    text = "\n".join(caught.value.errors)
    assert ":2: agent: duplicate key" in text
    assert "services.Bad_Name" in text


def test_missing_file_is_one_clear_error(shipmate_plugins, tmp_path):
    from agent.config import load_config

    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml", shipmate_plugins)
    assert "cannot read config" in caught.value.errors[0]


def test_merge_replaces_a_plugin_block_of_another_type():
    assert merge({"type": "process", "host": "a"}, {"type": "docker"}) == {"type": "docker"}
    assert merge({"type": "etcd", "ttl": 30}, {"key": "/k/{instance}"}) == {
        "type": "etcd", "ttl": 30, "key": "/k/{instance}"}
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_default_config_file_is_valid(shipmate_plugins):
    from pathlib import Path

    from agent.config import load_config

    config = load_config(Path(__file__).parents[2] / "etc" / "agent.yaml", shipmate_plugins)
    assert config.agent.store.backend == "embedded"
    assert config.services["web"].actuator.type == "process"


def test_a_type_whose_client_library_is_missing_is_a_config_error(write_config):
    import types

    from agent import Source, SourceConfig, hookimpl
    from agent.config import load_config
    from agent.plugins import load_plugins

    class Needy(Source):
        type_name = "needy"
        Config = SourceConfig
        requires = {"no_such_module_for_shipmate": "shipmate-needy"}

        def read(self) -> float:
            return 1

    plugin = types.SimpleNamespace(shipmate_source_types=hookimpl(lambda: [Needy]))
    path = write_config("""
        agent: {cluster: demo}
        services:
          web:
            source: {type: needy}
            actuator: {type: process}
        """)
    with pytest.raises(ConfigError) as caught:
        load_config(path, load_plugins(extra=[("needy", plugin)]))
    (error,) = caught.value.errors
    assert error.endswith(":4: services.web.source: the needy source needs the Python package "
                          "'no_such_module_for_shipmate': pip install 'shipmate-needy'")


def test_health_none_means_running_is_healthy(load_test_config):
    config = load_test_config("""
        agent: {cluster: c}
        services:
          web:
            command: [sleep, "60"]
            health: none
            source: {type: static, count: 1}
            actuator: {type: process}
    """)
    assert config.services["web"].health is None  # agent.health.probe: running is healthy


# ---------------------------------------------------------------- several sources


def test_sources_with_names_and_a_combine_expression(load_test_config):
    config = load_test_config("""
        agent: {cluster: demo}
        defaults:
          actuator: {type: process}
          source: {type: static, count: 1}
        services:
          web:
            sources:
              - {name: rps, type: datadog, query: "avg:web.rps{*}", target: 100}
              - {name: business_hours, type: schedule, default: 0,
                 windows: [{cron: "0 8 * * 1-5", duration: 12h, count: 1}]}
              - {type: static, count: 2}
            combine: "max(rps, static) if business_hours else 2"
            policy: {shadow: true}
          api: {}
        """)
    web, api = config.services["web"], config.services["api"]
    assert [s.name for s in web.sources] == ["rps", "business_hours", None]
    assert web.source is None  # the service's sources replace the default source
    assert web.policy.shadow is True and web.combine.startswith("max(rps")
    assert api.source.count == 1 and api.sources is None and api.policy.shadow is False


def test_mistakes_in_sources_and_combine_name_their_line(load_test_config):
    with pytest.raises(ConfigError) as caught:
        load_test_config("""
            agent: {cluster: demo}
            defaults: {actuator: {type: process}}
            services:
              web:
                sources:
                  - {type: static, count: 2}
                  - {name: rps, type: datadog, query: q, target: 0}
                combine: "max(rps, statc)"
              api:
                source: {type: static, count: 1}
                sources: [{type: static, count: 2}]
              worker:
                sources:
                  - {type: static, count: 2}
                  - {type: static, count: 3}
              lone:
                source: {type: static, count: 1}
                combine: sum
              none:
                command: [sleep, "1"]
              bad:
                sources: [{name: 2bad, type: static, count: 1}]
            """)
    errors = caught.value.errors
    assert ":7: services.web.sources[1].target: Input should be greater than 0" in errors[0]
    assert any(":11: services.api.sources: give either source: (one) or sources: (several)"
               in e for e in errors), errors
    assert any(":13: services.worker.sources: sources [0] and [1] are both named 'static'"
               in e for e in errors), errors
    assert any(":18: services.lone.combine: only with sources:" in e for e in errors), errors
    assert any(":19: services.none: a service needs a source: (or several in sources:)"
               in e for e in errors), errors
    assert any(":22: services.bad.sources[0].name: String should match pattern" in e
               for e in errors), errors


def test_a_bad_combine_expression_is_reported_at_its_line(load_test_config):
    with pytest.raises(ConfigError) as caught:
        load_test_config("""
            agent: {cluster: demo}
            services:
              web:
                actuator: {type: process}
                sources:
                  - {name: a, type: static, count: 2}
                  - {name: b, type: static, count: 3}
                combine: "max(a, b"
            """)
    assert caught.value.errors == [
        f"{caught.value.errors[0].split(':')[0]}:8: services.web.combine: invalid expression "
        "'max(a, b': '(' was never closed at column 4"]


STORE = """
agent:
  cluster: demo
  store:
    backend: etcd
    endpoints: [{endpoint}]
{extra}
services: {{}}
"""


def test_a_password_over_http_is_refused_unless_allowed(load_test_config, monkeypatch):
    monkeypatch.setenv("ETCD_PASSWORD", "hunter2-etcd")
    creds = "    username: root\n    password: ${ETCD_PASSWORD}"
    with pytest.raises(ConfigError) as caught:
        load_test_config(STORE.format(endpoint="http://10.0.0.1:2379", extra=creds))
    message = str(caught.value)
    assert "agent.store: " in message and "password over http:// is sent in the clear" in message
    assert "hunter2-etcd" not in message
    with pytest.raises(ConfigError, match="password over http://"):  # also one in the URL
        load_test_config(STORE.format(endpoint="http://root:pw@10.0.0.1:2379", extra=""))
    allowed = load_test_config(STORE.format(endpoint="http://10.0.0.1:2379",
                                            extra=creds + "\n    allow_insecure: true"))
    assert allowed.agent.store.password.get_secret_value() == "hunter2-etcd"
    assert "hunter2-etcd" not in repr(allowed.agent.store)
    tls = load_test_config(STORE.format(endpoint="https://10.0.0.1:2379", extra=creds + (
        "\n    tls: {ca: certs/ca.pem, cert: certs/client.pem, key: certs/client.key}")))
    assert tls.agent.store.tls.resolved(tls.base_dir).ca == tls.base_dir / "certs/ca.pem"


def test_store_credentials_and_tls_keys_are_checked(load_test_config):
    with pytest.raises(ConfigError) as caught:
        load_test_config(STORE.format(endpoint="https://10.0.0.1:2379", extra=(
            "    username: root\n    tls: {key: client.key, verfy: false}")))
    message = str(caught.value)
    assert "verfy" in message


BAD_FILES = {  # what the audit fed the loader: each a config error with its line
    "a mapping as a key": ("{}: 1\n", 1, "a key must be a plain value"),
    "a recursive alias": ("a: &a [*a]\n", 1, "recursive alias"),
    "deep nesting": ("[" * 1000 + "\n", 1, "nested deeper"),
    "a control character": ("agent:\n  cluster: demo\x07\n", 2, "U+0007"),
    "a Latin-1 byte": (b"agent:\n  cluster: d\xe9mo\n", 2, "not UTF-8"),
    "!!float x": ("agent:\n  cluster: demo\n  interval: !!float x\n", 3, "cannot read 'x'"),
    "!!timestamp x": ("agent:\n  cluster: demo\n  interval: !!timestamp x\n", 3,
                      "as timestamp"),
    "a 4301-digit integer": ("agent:\n  cluster: demo\n  parallelism: " + "1" * 4301 + "\n", 3,
                             "far too long"),
    "interval 0": ("agent:\n  cluster: demo\n  interval: 0\n", 3, "at least 100ms"),
    "interval .inf": ("agent:\n  cluster: demo\n  interval: .inf\n", 3, "finite"),
    "interval .nan": ("agent:\n  cluster: demo\n  interval: .nan\n", 3, "finite"),
    "a source polled every 1ms": (
        "agent: {cluster: demo}\nservices:\n  web:\n    command: [x]\n"
        "    actuator: {type: process}\n    source: {type: static, count: 1, interval: 1ms}\n",
        6, "at least 100ms"),
    "a timeout of 0": (
        "agent: {cluster: demo}\nservices:\n  web:\n    command: [x]\n"
        "    actuator: {type: process}\n    source: {type: static, count: 1}\n"
        "    health: {tcp: true, timeout: 0}\n", 7, "longer than 0s"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_every_yaml_or_decoding_problem_is_a_config_error_with_its_line(
        case, shipmate_plugins, tmp_path):
    from agent.config import load_config

    text, line, expected = BAD_FILES[case]
    path = tmp_path / "agent.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as caught:
        load_config(path, shipmate_plugins)
    assert any(e.startswith(f"{path}:{line}: ") and expected in e for e in caught.value.errors), \
        caught.value.errors


DEPLOYS = """
agent: {cluster: demo}
defaults:
  actuator: {type: process}
  source: {type: static, count: 1}
services:
  web:
    command: [sleep, "100"]
    deploy: {strategy: rolling, batch: 2}
  api:
    command: [sleep, "100"]
    deploy: {type: rolling, order: start-first}
"""


def test_deploy_blocks_are_typed_by_type_and_strategy_is_read_with_a_warning(
        load_test_config, caplog):
    with caplog.at_level("WARNING", logger="shipmate.config"):
        config = load_test_config(DEPLOYS)
    web, api = config.services["web"].deploy, config.services["api"].deploy
    assert (web.type, web.batch) == ("rolling", 2)
    assert (api.type, api.order) == ("rolling", "start-first")
    (warning,) = config.warnings
    assert warning.endswith(":8: services.web.deploy.strategy: deprecated: write type: "
                            "rolling (strategy: is the old name of the key)")
    assert warning in caplog.text


def test_a_deploy_block_with_both_type_and_strategy_is_an_error(load_test_config):
    with pytest.raises(ConfigError) as caught:
        load_test_config(DEPLOYS.replace("{strategy: rolling,",
                                         "{strategy: rolling, type: rolling,"))
    (error,) = caught.value.errors
    assert ":8: services.web.deploy.strategy: give the deploy's type once, as type:" in error


def test_a_blocked_default_strategy_fails_the_services_without_a_deploy_block(
        write_config):
    from agent.config import load_config
    from agent.plugins import load_plugins

    path = write_config(GOOD)
    with pytest.raises(ConfigError) as caught:
        load_config(path, load_plugins(block=["rolling"]))
    (error,) = caught.value.errors
    assert ":8: services.web: no deploy: block, and the default deploy strategy 'rolling' " \
           "(agent.default_strategy) is not installed (blocked?); installed: blue-green" in error
    # with a deploy: block of an installed strategy it loads
    config = load_config(write_config(GOOD.replace(
        "port: 8080", "port: 8080\n    deploy: {type: blue-green, ports: [8080, 9080]}")),
        load_plugins(block=["rolling"]))
    assert config.services["web"].deploy.type == "blue-green"


def test_a_default_strategy_that_needs_settings_is_an_error(load_test_config):
    with pytest.raises(ConfigError) as caught:
        load_test_config(GOOD.replace("interval: 1m30s", "default_strategy: blue-green"))
    errors = caught.value.errors
    assert any(":3: agent.default_strategy: the default deploy strategy 'blue-green' "
               "(agent.default_strategy) needs settings (ports)" in e for e in errors), errors
    assert any(":8: services.web: no deploy: block" in e for e in errors), errors


def test_keep_old_on_an_actuator_that_cannot_park_is_an_error_naming_the_service(
        load_test_config):
    text = DEPLOYS.replace("{strategy: rolling, batch: 2}",
                           "{type: blue-green, ports: [8000, 9000], keep_old: true}")
    with pytest.raises(ConfigError) as caught:
        load_test_config(text)
    (error,) = caught.value.errors
    assert ":8: services.web.deploy: keep_old: the process actuator cannot keep stopped " \
           "instances" in error
    config = load_test_config(text.replace("keep_old: true", "keep_old: false"))
    assert config.services["web"].deploy.keep_old is False
