"""The secret scan: an agent at full verbosity (``-vv``) with every kind of secret
configured and every source failing; its log, its instances' logs, the store, ``status``
and ``/metrics`` must hold none of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import eventually, kill_recorded
from tests.services import Etcd, MissingDependency, free_port, http_get

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIASCANSECRET000001",
    "AWS_SECRET_ACCESS_KEY": "scan-aws-secret-access-key-9f8e7d6c",
    "AWS_SESSION_TOKEN": "scan-aws-session-token-1a2b3c4d5e",
    "DD_API_KEY": "scan-dd-api-key-0a1b2c3d",
    "DD_APP_KEY": "scan-dd-app-key-4e5f6a7b",
    "ETCD_PASSWORD": "scan-etcd-password-8c9d0e1f",
    "SCAN_API_TOKEN": "scan-yaml-api-token-2a3b4c5d",
}


@pytest.fixture
def auth_etcd():
    try:
        service = Etcd()
    except MissingDependency as err:
        if os.environ.get("CI"):
            pytest.fail(str(err), pytrace=False)
        pytest.skip(str(err))
    service.start()
    service.etcdctl("user", "add", f"root:{SECRETS['ETCD_PASSWORD']}")
    service.etcdctl("auth", "enable")
    yield service
    service.close()


def test_no_secret_leaves_the_agent(auth_etcd, moto, tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    http = f"127.0.0.1:{free_port()}"
    config = tmp_path / "agent.yaml"
    config.write_text(textwrap.dedent(f"""\
        agent:
          cluster: scan
          http: {http}
          interval: 1s
          state_dir: state
          store:
            backend: etcd
            endpoints: [{auth_etcd.endpoint}]
            username: root
            password: ${{ETCD_PASSWORD}}
            allow_insecure: true
        defaults:
          actuator: {{type: process}}
        services:
          web:
            command: [sh, -c, "echo web up; exec sleep 300"]
            env: {{API_TOKEN: "${{SCAN_API_TOKEN}}"}}
            source: {{type: asg, group: no-such-group, region: us-east-1,
                      endpoint_url: "{moto.endpoint_url}", interval: 1s}}
          dd:
            command: [sh, -c, "exec sleep 300"]
            source: {{type: datadog, query: "avg:x{{*}}", target: 1, interval: 1s,
                      api_host: "http://127.0.0.1:{free_port()}"}}
          printer:
            command: [sh, -c, "env; exec sleep 300"]
            source: {{type: static, count: 1}}
        """))
    stderr = tmp_path / "agent.log"
    with open(stderr, "wb") as out:
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-vv", "-c", str(config)],
                                 stdout=out, stderr=subprocess.STDOUT)
    logs = tmp_path / "state" / "logs"
    try:
        def ready() -> bool:
            text = stderr.read_text(errors="replace")
            printed = "".join(p.read_text(errors="replace") for p in logs.glob("*.log")) \
                if logs.exists() else ""
            return ("botocore" in text and "datadog" in text and "PATH=" in printed
                    and http_get(f"http://{http}/metrics", timeout=5)[0] == 200)

        eventually(ready, timeout=90, what="the agent polling its failing sources, -vv")
        metrics = http_get(f"http://{http}/metrics", timeout=5)[1].decode()
        status = subprocess.run([sys.executable, "-m", "agent", "status", "--json", "-c",
                                 str(config)], capture_output=True, text=True, timeout=60)
        store = auth_etcd.etcdctl(f"--user=root:{SECRETS['ETCD_PASSWORD']}", "get", "",
                                  "--prefix")
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        finally:
            agent.kill()
            kill_recorded(tmp_path)
    text = stderr.read_text(errors="replace")
    assert "DEBUG botocore" in text  # -vv did show the libraries' debug output
    assert status.returncode == 0, status.stderr
    assert "/shipmate/scan/leader" in store
    places = {"agent log": text, "status": status.stdout + status.stderr, "store": store,
              "metrics": metrics,
              **{f"instance log {p.name}": p.read_text(errors="replace")
                 for p in logs.glob("*.log")}}
    leaks = [(where, name) for where, content in places.items()
             for name, value in SECRETS.items() if value in content]
    assert leaks == []
    assert json.loads(status.stdout)["services"]
