"""The ``prometheus`` source against a real Prometheus scraping a real endpoint."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest

from agent import SourceError
from agent.config import ConfigError
from tests.helpers import eventually
from tests.services import free_port


@pytest.fixture
def exporter():
    """A real /metrics endpoint (prometheus_client) with gauges the test sets."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    depth = Gauge("queue_depth", "jobs waiting", registry=registry)
    workers = Gauge("busy_workers", "busy workers per pool", ["pool"], registry=registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)

    class Exporter:
        target = f"127.0.0.1:{port}"

    Exporter.depth, Exporter.workers = depth, workers
    yield Exporter
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def source(load_test_config, shipmate_plugins, tmp_path, embedded_store):
    """``source(url, query, **keys)`` -> a PrometheusSource built from YAML like a user writes."""
    from agent.kinds import Context

    def make(url: str, query: str, **keys) -> object:
        extra = "".join(f", {k}: {v}" for k, v in keys.items())
        config = load_test_config(f"""
            agent: {{cluster: t}}
            services:
              web:
                source: {{type: prometheus, url: "{url}", query: '{query}', target: 100{extra}}}
                actuator: {{type: process}}
            """)
        cls = shipmate_plugins.types["source"]["prometheus"].cls
        return cls(config.services["web"].source,
                   Context(cluster="t", store=embedded_store, state_dir=tmp_path))

    return make


def _reads(src: object, expected: float) -> bool:
    try:
        return src.read() == pytest.approx(expected)
    except SourceError:
        return False


def test_a_real_prometheus(prometheus_server, exporter, source):
    exporter.depth.set(450)
    exporter.workers.labels("a").set(1)
    exporter.workers.labels("b").set(2)
    prom = prometheus_server([exporter.target])
    prom.wait_for_up()

    depth = source(prom.url, "queue_depth")
    eventually(lambda: _reads(depth, 4.5), timeout=10, what="queue_depth 450 -> 4.5")
    exporter.depth.set(120)
    eventually(lambda: _reads(depth, 1.2), timeout=10, what="queue_depth 120 -> 1.2")

    # a scalar works as well as a one-series vector
    assert source(prom.url, "scalar(sum(busy_workers)) * 100").read() == pytest.approx(3)
    assert source(prom.url, "sum(busy_workers) * 100").read() == pytest.approx(3)

    with pytest.raises(SourceError, match=r"prometheus returned 2 series for 'busy_workers'; "
                                          r"a count needs one \(wrap the query in sum"):
        source(prom.url, "busy_workers").read()
    with pytest.raises(SourceError, match="prometheus returned no series for 'no_such_metric'"):
        source(prom.url, "no_such_metric").read()
    with pytest.raises(SourceError, match="prometheus returned NaN for 'queue_depth / 0 - "):
        source(prom.url, "queue_depth / 0 - queue_depth / 0").read()
    with pytest.raises(SourceError, match=r"prometheus answered 400 \(bad_data\): .*parse error"):
        source(prom.url, "sum(").read()
    with pytest.raises(SourceError, match="returned a matrix .* needs an instant vector"):
        source(prom.url, "queue_depth[1m]").read()


def test_nobody_listening(source):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SourceError, match=f"prometheus cannot be reached at {url}: "):
        source(url, "up").read()


def test_a_hang_past_the_timeout(source):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    accepted = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(SourceError, match=f"prometheus did not answer within 500ms "
                                              f"\\({url}\\)"):
            source(url, "up", timeout="500ms").read()
        assert time.monotonic() - started < 2
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        listener.close()


def test_config_errors_name_the_key(load_test_config):
    with pytest.raises(ConfigError) as err:
        load_test_config("""
            agent: {cluster: t}
            services:
              web:
                source: {type: prometheus, url: "http://user:pw@prom:9090", query: up}
                actuator: {type: process}
            """)
    text = str(err.value)
    assert "services.web.source.url: String should match pattern" in text
    assert "services.web.source.target: required key is missing" in text


class _Odd(http.server.BaseHTTPRequestHandler):
    """A stand-in Prometheus that answers what the test puts in ``server.answer``."""

    def do_GET(self) -> None:  # noqa: N802
        answer = self.server.answer  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        try:
            if callable(answer):
                answer(self.wfile)
            else:
                self.wfile.write(answer)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the source gave up on us, as it should

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def odd():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Odd)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _vector(value: object) -> bytes:
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {}, "value": [1700000000.0, value]}]}}).encode()


@pytest.mark.parametrize(("value", "expected"), [
    (True, "a sample without a value"), (15, "a sample without a value"),
    (None, "a sample without a value"), ("1" * 100, "a sample without a value"),
    ("+Inf", r"prometheus returned \+Inf"), ("1e308", None),
])
def test_odd_answers_are_errors_never_counts(odd, source, value, expected):
    server, url = odd
    server.answer = _vector(value)
    if expected is None:  # a finite but absurd value: the policy refuses it as a reading
        from agent.scaling import read_source

        got, error = read_source(source(url, "up"))
        assert got is None and "beyond any count" in error
        return
    with pytest.raises(SourceError, match=expected):
        source(url, "up").read()


def test_a_slow_loris_cannot_hold_a_poll_past_its_timeout(odd, source):
    server, url = odd

    def trickle(out) -> None:
        out.write(b'{"status": "success", ')
        for _ in range(200):
            out.write(b" ")
            out.flush()
            time.sleep(0.1)

    server.answer = trickle
    started = time.monotonic()
    with pytest.raises(SourceError, match="did not answer within 1s"):
        source(url, "up", timeout="1s").read()
    assert time.monotonic() - started < 5


def test_a_huge_answer_is_not_read_whole(odd, source):
    server, url = odd
    server.answer = b'{"status": "success", "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    with pytest.raises(SourceError, match="more than 1024 KiB"):
        source(url, "up").read()
