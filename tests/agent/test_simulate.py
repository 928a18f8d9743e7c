"""``shipmate simulate``: replays of a policy, checked against hand computations.

The readings below are Datadog values against a target of 100, one every five
minutes, each holding until the next; the policy decides once a minute (the
source's interval), from 08:00 to 08:21 (the last reading holds one step):

    08:00 250 -> 3    08:05 450 -> 5    08:10 120 -> 2    08:15 390 -> 4    08:20 100 -> 1
"""

from __future__ import annotations

import json
import struct
import time

import pytest
from click.testing import CliRunner

from agent.cli import main
from tests.helpers import eventually
from tests.plugins.sources.datadog_server import API_KEY, APP_KEY, DatadogStandIn

READINGS = """time,value
2026-12-01T08:00:00Z,250
2026-12-01T08:05:00Z,450
2026-12-01T08:10:00Z,120
2026-12-01T08:15:00Z,390
2026-12-01T08:20:00Z,100
"""
SERVICE = """
agent: {{cluster: sim}}
services:
  web:
    command: [sleep, "300"]
    source: {{type: datadog, query: "avg:web.rps{{*}}", target: 100, interval: 1m}}
    policy: {policy}
    actuator: {{type: process}}
"""


@pytest.fixture
def simulate(write_config, tmp_path):
    """``simulate(*args, policy="{}")`` -> (exit code, output) of ``shipmate simulate web``."""
    readings = tmp_path / "readings.csv"
    readings.write_text(READINGS)

    def run(*args: str, policy: str = "{min: 1, max: 20}", service: str = "web",
            config: str | None = None) -> tuple[int, str]:
        path = write_config(config or SERVICE.format(policy=policy))
        got = CliRunner().invoke(main, ["simulate", "-c", str(path), service, *args])
        return got.exit_code, got.output

    run.readings = str(readings)
    return run


def summary(simulate, *args: str, **kw) -> dict:
    code, output = simulate("--readings", simulate.readings, "--json", *args, **kw)
    assert code == 0, output
    return json.loads(output)


def test_no_cooldown_no_stabilization_matches_the_hand_computation(simulate):
    got = summary(simulate)
    # 3 for 5 minutes, 5 for 5, 2 for 5, 4 for 5, then 1 for the last minute
    assert (got["actions_up"], got["actions_down"]) == (2, 2)  # 3->5, 2->4 / 5->2, 4->1
    assert got["instance_hours"] == pytest.approx((15 + 25 + 10 + 20 + 1) / 60)
    assert (got["min"], got["max"], got["largest_step"]) == (1, 5, 3)
    assert got["mean"] == pytest.approx(71 / 21)
    assert got["under_provisioned_minutes"] == 0
    assert got["decisions"] == 21


def test_max_step_is_under_provisioned_while_it_climbs(simulate):
    got = summary(simulate, "--set", "policy.max_step=1")
    # 3 | 4 5 5 5 5 | 4 3 2 2 2 | 3 4 4 4 4 | 3: one step a minute
    assert (got["actions_up"], got["actions_down"]) == (4, 4)
    assert got["instance_hours"] == pytest.approx((15 + 4 + 20 + 4 + 3 + 6 + 3 + 16 + 3) / 60)
    assert got["under_provisioned_minutes"] == 2  # 08:05 (4 < 5) and 08:15 (3 < 4)
    assert got["largest_step"] == 1
    assert got["compared"]["agent.yaml"]["actions_up"] == 2  # the unchanged policy beside it


def test_a_stabilization_window_means_fewer_actions(simulate):
    plain = summary(simulate)
    stable = summary(simulate, policy="{min: 1, max: 20, stabilization: 10m}")
    # up to 5 at 08:05; 5 stays the window's highest until 08:19, then down to 4 (08:15-08:18)
    assert (stable["actions_up"], stable["actions_down"]) == (1, 1)
    assert stable["actions_up"] + stable["actions_down"] < plain["actions_up"] + plain[
        "actions_down"]
    assert stable["instance_hours"] == pytest.approx((15 + 14 * 5 + 2 * 4) / 60)


def test_a_cooldown_holds_a_scale_up(simulate):
    got = summary(simulate, policy="{min: 1, cooldown_up: 20m}")
    # set to 3 at 08:00; 450 at 08:05 waits until 08:20, when 100 asks for 1 (down is free)
    assert got["actions_up"] == 0 and got["actions_down"] == 2  # 3->2 at 08:10, 2->1 at 08:20
    assert got["under_provisioned_minutes"] == 10  # 08:05-08:10 wanted 5, 08:15-08:20 wanted 4


def test_the_table_and_the_terminal_drawing(simulate):
    code, output = simulate("--readings", simulate.readings)
    assert code == 0, output
    assert "scale-ups" in output and "instance-hours" in output and "1.18" in output
    assert "█" in output and "2026-12-01 08:00:00" in output


def test_a_plot_is_written_as_a_png_that_opens(simulate, tmp_path):
    import matplotlib.image

    png = tmp_path / "replay.png"
    code, output = simulate("--readings", simulate.readings, "--plot", str(png),
                            "--set", "policy.stabilization=10m")
    assert code == 0, output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 200
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (height, width)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[2])[::97]}) > 5  # not blank


def test_several_sources_from_one_csv_and_a_static_floor(simulate, tmp_path):
    config = """
agent: {cluster: sim}
services:
  web:
    command: [sleep, "300"]
    sources:
      - {name: floor, type: static, count: 2, interval: 1m}
      - {name: rps, type: datadog, query: "avg:web.rps{*}", target: 100, interval: 1m}
      - {name: queue, type: datadog, query: "avg:jobs{*}", target: 10, interval: 1m}
    combine: max
    actuator: {type: process}
"""
    readings = tmp_path / "multi.csv"
    readings.write_text("time,name,value\n"
                        "0,rps,450\n0,queue,10\n"       # max(2, 4.5, 1) -> 5
                        "300,rps,50\n"                  # max(2, 0.5, 1) -> 2
                        "600,queue,70\n")               # max(2, 0.5, 7) -> 7
    code, output = simulate("--readings", str(readings), "--json", config=config)
    assert code == 0, output
    got = json.loads(output)
    assert (got["actions_up"], got["actions_down"], got["min"], got["max"]) == (1, 1, 2, 7)
    assert got["instance_hours"] == pytest.approx((5 * 5 + 5 * 2 + 1 * 7) / 60)


def test_compare_puts_two_policies_side_by_side(simulate, write_config):
    other = write_config(SERVICE.format(policy="{min: 1, stabilization: 10m}"), name="b.yaml")
    got = summary(simulate, "--compare", str(other))
    assert got["actions_up"] == 2 and got["compared"]["b.yaml"]["actions_up"] == 1
    code, output = simulate("--readings", simulate.readings, "--compare", str(other))
    assert code == 0 and "agent.yaml" in output and "b.yaml" in output


@pytest.mark.parametrize("csv_text, args, message", [
    ("time,value\n2026-12-01T08:00:00Z,250\nyesterday,3\n", (),
     "readings.csv:3: 'yesterday' is not a time"),
    ("0,250\n60,lots\n", (), "readings.csv:2: 'lots' is not a number"),
    ("0,rps,1\n", (), "readings.csv:1: unknown source"),
    ("0,250\n", ("--set", "policy.max_stp=2"), "--set policy.max_stp=2: policy.max_stp: "
                                                "Extra inputs are not permitted"),
    ("0,250\n", ("--set", "policy.min=-1"), "policy.min: Input should be greater than"),
    ("0,250\n", ("--set", "nonsense"), "expected KEY=VALUE"),
])
def test_bad_input_is_named(simulate, tmp_path, csv_text, args, message):
    (tmp_path / "readings.csv").write_text(csv_text)
    code, output = simulate("--readings", simulate.readings, *args)
    assert code == 1 and message in output and "Traceback" not in output, output


def test_bad_arguments_are_named(simulate):
    code, output = simulate()
    assert code == 1 and "give either --readings FILE or --since DURATION" in output
    code, output = simulate("--readings", simulate.readings, service="nope")
    assert code == 1 and "unknown service 'nope'; known: web" in output
    code, output = simulate("--since", "a week")
    assert code == 2 and "expected a duration" in output
    code, output = simulate("--readings", "/nonexistent.csv")
    assert code == 1 and "/nonexistent.csv: cannot read" in output


def test_since_replays_datadogs_own_history(simulate, monkeypatch):
    monkeypatch.setenv("DD_API_KEY", API_KEY)
    monkeypatch.setenv("DD_APP_KEY", APP_KEY)
    dd = DatadogStandIn()
    try:
        # 250 an hour ago, 450 from 30 minutes ago (points every 10 minutes)
        dd.answer("points", points=[(3600 - 600 * i, 250 if i < 3 else 450) for i in range(6)])
        config = SERVICE.format(policy="{min: 1}").replace(
            "target: 100,", f'target: 100, api_host: "{dd.url}",')
        code, output = simulate("--since", "1h", "--step", "1m", "--json", config=config)
        assert code == 0, output
        got = json.loads(output)
        assert (got["actions_up"], got["min"], got["max"]) == (1, 3, 5)
        params = dd.requests[-1]["params"]
        assert 3600 <= int(params["to"]) - int(params["from"]) <= 3601
        assert abs(int(params["to"]) - time.time()) < 60
    finally:
        dd.close()


def test_since_replays_prometheus_query_range(simulate, prometheus_server):
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from tests.services import free_port

    registry = CollectorRegistry()
    rps = Gauge("web_rps", "requests per second", registry=registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        prometheus = prometheus_server([f"127.0.0.1:{port}"])
        config = f"""
agent: {{cluster: sim}}
services:
  web:
    command: [sleep, "300"]
    source: {{type: prometheus, url: "{prometheus.url}", query: "max(web_rps)",
              target: 100, interval: 1s}}
    actuator: {{type: process}}
"""
        rps.set(250)

        def replayed() -> dict | None:
            code, output = simulate("--since", "2m", "--step", "1s", "--json", config=config)
            assert code == 0 or "returned 0 series" in output, output
            return json.loads(output) if code == 0 else None

        eventually(lambda: (replayed() or {}).get("max") == 3, timeout=30,
                   what="Prometheus has scraped 250")
        rps.set(450)
        got = eventually(lambda: (lambda r: r if r and r["max"] == 5 else None)(replayed()),
                         timeout=30, what="Prometheus has scraped 450")
        assert got["min"] == 3 and got["actions_up"] == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_the_readmes_business_hours_example():
    """docs/examples/web.yaml over a day: at least 10 from 08:00 to 20:00 Berlin time, and
    the numbers the README shows."""
    from datetime import UTC, datetime
    from pathlib import Path

    from agent.simulate import run

    docs = Path(__file__).parents[2] / "docs" / "examples"
    results = run(docs / "web.yaml", "web", readings=docs / "rps.csv",
                  compare=docs / "web-eager.yaml")
    day = results["web.yaml"]
    # 08:00-20:00 in Berlin, in UTC; at 08:00 max_step 5 and cooldown_up 2m climb 2 -> 7 -> 10
    counts = dict(zip(day.times, day.counts, strict=True))
    first = datetime(2026, 12, 7, 7, 0, tzinfo=UTC).timestamp()
    assert [counts[first + 60 * i] for i in range(4)] == [7, 7, 10, 10]
    business = [c for t, c in counts.items() if first + 120 <= t < first + 12 * 3600]
    assert business and min(business) >= 10
    night = [c for t, c in counts.items() if first - 7 * 3600 <= t < first - 2 * 3600]
    assert min(night) == 2
    mine, eager = (r.summary() for r in results.values())
    assert (mine["actions_up"], mine["actions_down"], mine["max"]) == (20, 21, 17)
    assert (eager["actions_up"], eager["actions_down"]) == (30, 29)
    assert mine["instance_hours"] == pytest.approx(177.4, abs=0.01)
