"""The fuzz suite: garbage into every input the agent reads, bounded in time.

- the config loader: random YAML text and a good config with one value replaced by
  something odd; each must load or raise ConfigError, never anything else;
- every store value the agent reads (each key of the store contract, plus the leader
  key): JSON of every type, huge and nested values, invalid UTF-8, near-valid objects,
  in a real etcd; ``status`` and ``plan`` must end cleanly, showing it as that service's
  problem, and the other service must be planned exactly as before;
- source answers (a stand-in Prometheus answering garbage): a clean error or a bounded
  reading.

Each test runs a fixed number of examples with no per-example deadline (the machine is
shared); ``FUZZ_EXAMPLES`` raises the count for a longer local run.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import textwrap
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.config import ConfigError, load_config
from agent.deploys import check_journal
from agent.keys import FIELDS, Keys, parse_object
from agent.policy import MAX_READING, PolicyState
from agent.releases import parse_release
from agent.scaling import read_source

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
ODD_TEXT = st.sampled_from([
    "", " ", "null", "true", "-1", "1e400", "1e308", "NaN", "Infinity", "[]", "{}", "3.5",
    "9" * 4301, "[" * 5000, '{"a":' * 3000, "\x00", "\udce9\udcff", "٣", "1_000",
    "x/../../../tmp/escape", "--privileged -v /:/host busybox", "a" * 300_000,
])
GARBAGE = st.one_of(JSON.map(json.dumps), ODD_TEXT, st.text(max_size=50),
                    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")))
RELEASE = st.fixed_dictionaries({}, optional={
    "image": JSON | st.sampled_from(["web:1", "evil/web:1", "--net=host"]),
    "port": JSON | st.sampled_from([-1, 0, 65536, 8080, 1e400]),
    "version": JSON | st.sampled_from(["0123456789", "x/../../etc", "v1"]),
    "spec": JSON, "previous": JSON, "kept": JSON})
DEPLOY = st.fixed_dictionaries({"phase": st.sampled_from(
    ["requested", "running", "rolling-back", "finished", "rolled-back", "paused", "failed",
     "refused", "nope"])}, optional={
    "id": JSON | st.just("abc"), "image": JSON, "port": JSON, "desired": JSON,
    "from": RELEASE, "to": RELEASE, "announce": JSON, "strategy": JSON, "kept": JSON,
    "command": JSON})
POLICY = st.fixed_dictionaries({}, optional={
    name: JSON for name in ("last_up", "last_down", "recommendations", "failures", "reading",
                            "reading_at", "error", "error_at", "decision", "decided_at")})
VALUES = {
    "desired": GARBAGE, "override": GARBAGE,
    "release": GARBAGE | RELEASE.map(json.dumps),
    "deploy": GARBAGE | DEPLOY.map(json.dumps),
    "policy": GARBAGE | POLICY.map(json.dumps),
    "problems": GARBAGE | st.fixed_dictionaries({}, optional={
        "problems": JSON, "at": JSON, "by": JSON}).map(json.dumps),
    "history": GARBAGE | st.lists(RELEASE, max_size=3).map(json.dumps)
    | st.fixed_dictionaries({}, optional={"releases": st.lists(RELEASE, max_size=3)}).map(
        json.dumps),
    "leader": GARBAGE | st.fixed_dictionaries({}, optional={
        "host": JSON, "pid": JSON | st.just(1e20), "boot": JSON, "token": JSON}).map(json.dumps),
}
assert set(FIELDS) <= set(VALUES)


# -- the config loader -----------------------------------------------------------------

GOOD = textwrap.dedent("""\
    agent:
      cluster: fuzz
      interval: 10s
      store: {backend: embedded, path: state.db}
    services:
      web:
        command: [sleep, "300"]
        port: 8080
        env: {A: b}
        source: {type: static, count: 2}
        policy: {min: 1, max: 5, cooldown: 30s}
        actuator: {type: process}
        health: {tcp: true, timeout: 2s}
    """)
ODD_SCALARS = st.sampled_from([
    ".inf", "-.inf", ".nan", "!!float x", "!!timestamp x", "!!int x", "!!binary @", "1" * 5000,
    "&a [*a]", "*nope", "[", "{", "}", "~", "-1", "1e400", "true", "0", "0ms", "1ms", "'\\x07'",
    "\"\\x00\"", "!!python/object:os.system x", "{a: 1, a: 2}", "[1, [2, [3]]]", "? [1]\n  : 2",
    "${NOT_SET}", "${HOME}", "'%s'" % ("x" * 10_000), "!!set {a, b}", "<<: 5",
])
YAML_TEXT = st.lists(st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`,? \n\t0.~") + [
    "agent", "services", "cluster", "interval", "\x07", "\xe9", "\ufeff", "  ", "\n  ",
    "!!float", "!!timestamp", "<<", "${X}"]), max_size=80).map("".join)


def _loads_or_config_error(path: Path, plugins) -> None:
    try:
        load_config(path, plugins)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)


@FUZZ
@given(text=YAML_TEXT)
def test_random_yaml_is_a_config_or_a_config_error(text, shipmate_plugins, tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    _loads_or_config_error(path, shipmate_plugins)


@FUZZ
@given(data=st.data())
def test_a_good_config_with_one_odd_value(data, shipmate_plugins, tmp_path):
    lines = GOOD.splitlines()
    index = data.draw(st.integers(0, len(lines) - 1))
    line = lines[index]
    odd = data.draw(ODD_SCALARS | st.text(max_size=30).map(json.dumps))
    if ":" in line:
        key, _ = line.split(":", 1)
        lines[index] = f"{key}: {odd}"
    else:
        lines[index] = f"{line} {odd}"
    path = tmp_path / "agent.yaml"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
    _loads_or_config_error(path, shipmate_plugins)


# -- store values ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_config(etcd, tmp_path_factory) -> tuple[Path, Keys]:
    folder = tmp_path_factory.mktemp("fuzz-store")
    path = folder / "agent.yaml"
    path.write_text(textwrap.dedent(f"""\
        agent:
          cluster: fuzz
          state_dir: state
          store: {{backend: etcd, endpoints: ["{etcd.endpoint}"], prefix: /fuzz}}
        defaults:
          actuator: {{type: process}}
        services:
          web:
            image: web:1
            command: [sleep, "300"]
            source: {{type: static, count: 2}}
            policy: {{max: 4}}
          worker:
            command: [sleep, "300"]
            source: {{type: static, count: 1}}
        """))
    return path, Keys("/fuzz/fuzz")


def _run(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{args}: {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    return result


@pytest.mark.parametrize("field", sorted(VALUES))
def test_every_store_value_ends_cleanly_and_stays_with_its_service(field, cli_config, etcd):
    path, keys = cli_config
    from agent.store.etcd3 import Etcd3Store

    store = Etcd3Store([etcd.endpoint])
    key = keys.leader if field == "leader" else keys.service("web", field)
    baseline = _run("plan", "-c", str(path)).output
    worker_plan = [line for line in baseline.splitlines() if "worker" in line]

    @FUZZ
    @given(value=VALUES[field])
    def check(value: str) -> None:
        store.put(key, value)
        try:
            plan = _run("plan", "-c", str(path))
            assert plan.exit_code == 0, plan.output
            assert [line for line in plan.output.splitlines() if "worker" in line] \
                == worker_plan  # the other service is planned as before
            status = _run("status", "--json", "-c", str(path))
            assert status.exit_code == 0, status.output
            json.loads(status.output)
        finally:
            store.delete(key)
        # the parsers behind them, directly
        if field == "deploy":
            runtime = type("R", (), {"config": type("C", (), {
                "image": "web:1", "deploy": None, "actuator": None,
                "policy": type("P", (), {"max": 4})()})()})()
            check_journal(value, runtime, 100)
        if field == "policy":
            with contextlib.suppress(ValueError):
                PolicyState.from_json(value)
        if field == "release":
            parse_release(parse_object(value))

    try:
        check()
    finally:
        store.close()


# -- source answers ----------------------------------------------------------------------


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        status, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def answering():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


SAMPLE = JSON | st.sampled_from(["15", "1e308", "-3", "NaN", "+Inf", "0x10", "1_0"])
ANSWERS = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=60),
    st.tuples(SAMPLE, st.sampled_from(["vector", "scalar", "matrix", None])).map(
        lambda t: json.dumps({"status": "success", "data": {
            "resultType": t[1], "result": [{"metric": {}, "value": [1.0, t[0]]}]
            if t[1] == "vector" else [1.0, t[0]]}}).encode()),
    st.just(b'{"status": "success", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
)


@FUZZ
@given(status=st.sampled_from([200, 200, 400, 500, 503]), body=ANSWERS)
def test_source_answers_are_a_clean_error_or_a_bounded_reading(
        status, body, answering, load_test_config, shipmate_plugins, tmp_path, embedded_store):
    from agent.kinds import Context

    answering.answer = (status, body)
    url = f"http://127.0.0.1:{answering.server_address[1]}"
    config = load_test_config(f"""
        agent: {{cluster: t}}
        services:
          web:
            source: {{type: prometheus, url: "{url}", query: up, target: 1, timeout: 5s}}
            actuator: {{type: process}}
        """)
    cls = shipmate_plugins.types["source"]["prometheus"].cls
    source = cls(config.services["web"].source, Context("t", embedded_store, tmp_path))
    value, error = read_source(source)
    if value is None:
        assert isinstance(error, str) and error and "Traceback" not in error
    else:
        assert error is None and math.isfinite(value) and 0 <= value <= MAX_READING
