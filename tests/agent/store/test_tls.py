"""TLS and authentication to etcd, on both backends, against real etcd servers.

The servers are started here with their own CA (tests/services.py ``Pki``): one that
requires client certificates, one with password authentication, and short-lived ones
for an expired server certificate and a server whose certificate changes under a
running store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from agent.store import Store, StoreError, StoreRefused
from agent.store.etcd2 import Etcd2Store
from agent.store.etcd3 import Etcd3Store
from tests.services import Etcd, MissingDependency, Pki

BACKENDS = {"etcd": Etcd3Store, "etcd2": Etcd2Store}
ROOT = Path(__file__).resolve().parents[3]


def started(make: Callable[[], Etcd]) -> Etcd:
    try:
        service = make()
    except MissingDependency as err:
        if os.environ.get("CI"):
            pytest.fail(f"{err} (CI is set, so every service is required)", pytrace=False)
        pytest.skip(str(err))
    try:
        service.start()
    except BaseException:
        service.close()
        raise
    return service


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_etcd(pki: Pki) -> Iterator[Etcd]:
    """etcd over https that requires a client certificate signed by the test CA."""
    service = started(lambda: Etcd(pki, client_cert_auth=True))
    yield service
    service.close()


def tls(pki: Pki, ca: str | None = "ca", cert: str | None = "client",
        verify: bool = True) -> SimpleNamespace:
    return SimpleNamespace(ca=pki.path(ca) if ca else None,
                           cert=pki.path(cert) if cert else None,
                           key=pki.path(cert, "key") if cert else None, verify=verify)


def refused(store: Store) -> str:
    with pytest.raises(StoreRefused) as caught:
        store.get("/shipmate/probe")
    return str(caught.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_certificate_auth_works(backend: str, mtls_etcd: Etcd, pki: Pki) -> None:
    store = BACKENDS[backend]([mtls_etcd.endpoint], timeout=5, tls=tls(pki))
    try:
        key = f"/shipmate/tls-{backend}/a"
        assert store.create(key, "one")
        entry = store.get(key)
        assert entry is not None and entry.value == "one"
        assert store.replace(key, "two", entry.revision)
        api = "2" if backend == "etcd2" else "3"
        assert "two" in mtls_etcd.etcdctl("get", key, api=api)  # it really is in that etcd
        seen: list[object] = []
        watch = store.watch(f"/shipmate/tls-{backend}/", seen.extend)
        try:
            store.put(f"/shipmate/tls-{backend}/b", "three")
            deadline = time.monotonic() + 20
            while not any(getattr(e, "value", None) == "three" for e in seen):
                assert time.monotonic() < deadline, f"the watch saw {seen}"
                time.sleep(0.05)
        finally:
            watch.cancel()
    finally:
        store.close()


CASES = {  # name: (tls settings, what the error must say)
    "no client certificate": (dict(cert=None), "client certificate"),
    "expired client certificate": (dict(cert="expired_client"), "client certificate"),
    "client certificate of another CA": (dict(cert="other_client"), "client certificate"),
    "wrong CA": (dict(ca="other_ca"), "certificate verify failed (unable to get local issuer"),
    "system CAs only": (dict(ca=None), "certificate verify failed"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tls_problems_are_refusals_that_name_the_problem(
        backend: str, case: str, mtls_etcd: Etcd, pki: Pki) -> None:
    settings, expected = CASES[case]
    store = BACKENDS[backend]([mtls_etcd.endpoint], timeout=5, tls=tls(pki, **settings))
    try:
        message = refused(store)
    finally:
        store.close()
    assert expected in message
    assert f"TLS handshake with {mtls_etcd.endpoint}" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_plaintext_and_tls_mixups_are_named(backend: str, mtls_etcd: Etcd, etcd: Etcd,
                                            pki: Pki) -> None:
    to_plain = BACKENDS[backend]([etcd.endpoint.replace("http://", "https://")], timeout=5,
                                 tls=tls(pki))
    to_tls = BACKENDS[backend]([mtls_etcd.endpoint.replace("https://", "http://")], timeout=5)
    try:
        assert "https:// endpoint answered in plaintext" in refused(to_plain)
        assert "this endpoint speaks TLS: use https://" in refused(to_tls)
    finally:
        to_plain.close()
        to_tls.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_certificate_file_is_named(backend: str, tmp_path: Path, pki: Pki) -> None:
    settings = tls(pki)
    settings.ca = tmp_path / "nope.pem"
    with pytest.raises(StoreRefused, match=r"tls.ca .*nope.pem: cannot read"):
        BACKENDS[backend](["https://127.0.0.1:1"], tls=settings)


def test_an_expired_server_certificate_is_refused(pki: Pki) -> None:
    service = started(lambda: Etcd(pki, server_cert="expired_server"))
    try:
        for backend, make in BACKENDS.items():
            store = make([service.endpoint], timeout=5, tls=tls(pki))
            try:
                assert "certificate verify failed (certificate has expired)" in refused(store), \
                    backend
            finally:
                store.close()
        # verify: false is an explicit choice, never a fallback (v2: etcd's own v3 gateway
        # cannot dial a server whose certificate expired)
        store = Etcd2Store([service.endpoint], timeout=5, tls=tls(pki, verify=False))
        try:
            store.put("/shipmate/unverified", "x")
        finally:
            store.close()
    finally:
        service.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_running_store_that_meets_a_foreign_certificate_raises_store_error(
        backend: str, pki: Pki) -> None:
    """What the leader's keep-alive meets when etcd is restarted with a certificate we do
    not trust: a StoreError (it steps down), not an AttributeError that kills its thread."""
    service = started(lambda: Etcd(pki))
    store = BACKENDS[backend]([service.endpoint], timeout=5, tls=tls(pki))
    try:
        lease = store.lease(10)
        store.put("/shipmate/leader", "me", lease=lease)
        lease.refresh()
        service.stop()
        service.server_cert = "other_server"  # signed by a CA the store does not trust
        service.start()
        with pytest.raises(StoreError, match="certificate verify failed"):
            lease.refresh()
        with pytest.raises(StoreError, match="certificate verify failed"):
            store.get("/shipmate/leader")
    finally:
        store.close()
        service.close()


# -- passwords -------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[Etcd]:
    """etcd with authentication on (v3 and v2: user root, password s3cret-pw); v3 tokens
    live 2 s, so tests see them renewed."""
    service = started(lambda: Etcd(extra=("--auth-token-ttl=2",)))
    for api in ("3", "2"):
        service.etcdctl("user", "add", "root:s3cret-pw", api=api)
        service.etcdctl("auth", "enable", api=api)
    # v2 lets the guest role do anything unless told otherwise
    service.etcdctl("--username=root:s3cret-pw", "role", "revoke", "guest", "--path=/*",
                    "--readwrite", api="2")
    yield service
    service.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_password_authentication(backend: str, auth_etcd: Etcd) -> None:
    store = BACKENDS[backend]([auth_etcd.endpoint], timeout=5, username="root",
                              password="s3cret-pw")
    try:
        store.put(f"/shipmate/auth-{backend}", "yes")
        entry = store.get(f"/shipmate/auth-{backend}")
        assert entry is not None and entry.value == "yes"
        if backend == "etcd":  # the token expires unused (2 s here): renewed, nothing fails
            first = store._auth.token  # type: ignore[attr-defined]
            url = f"{auth_etcd.endpoint}/v3/kv/range"
            deadline = time.monotonic() + 45
            while requests.post(url, json={"key": "eA=="}, headers={"Authorization": first},
                                timeout=5).status_code == 200:
                assert time.monotonic() < deadline, "etcd never expired the token"
                time.sleep(3)  # each use extends the token: probe less often than its ttl
            assert store.get(f"/shipmate/auth-{backend}") is not None
            assert store._auth.token != first  # type: ignore[attr-defined]
    finally:
        store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_or_missing_password_is_refused(backend: str, auth_etcd: Etcd) -> None:
    wrong = BACKENDS[backend]([auth_etcd.endpoint], timeout=5, username="root",
                              password="guess")
    missing = BACKENDS[backend]([auth_etcd.endpoint], timeout=5)
    try:
        message = refused(wrong)
        assert "guess" not in message
        assert ("authentication as 'root' failed" in message
                or "refused the credentials" in message)
        if backend == "etcd":
            assert "requires authentication" in refused(missing)
        else:
            with pytest.raises(StoreError):
                missing.put("/shipmate/x", "y")
    finally:
        wrong.close()
        missing.close()


def test_credentials_in_the_url_are_used_on_v3(auth_etcd: Etcd) -> None:
    url = auth_etcd.endpoint.replace("http://", "http://root:s3cret-pw@")
    store = Etcd3Store([url], timeout=5)
    try:
        store.put("/shipmate/in-url", "yes")
        assert store.get("/shipmate/in-url") is not None
    finally:
        store.close()


# -- the agent ---------------------------------------------------------------------


def agent_config(tmp_path: Path, backend: str, endpoint: str, tls_block: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(textwrap.dedent(f"""\
        agent:
          cluster: tls
          state_dir: state
          store:
            backend: {backend}
            endpoints: [{endpoint}]
            prefix: /shipmate-tls-{backend}
            timeout: 5s
        {textwrap.indent(tls_block, '    ')}
        services:
          web:
            command: [sleep, "600"]
            actuator: {{type: process}}
            source: {{type: static, count: 0}}
        """))
    return path


def shipmate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shipmate_run_with_client_certificates(backend: str, mtls_etcd: Etcd, pki: Pki,
                                               tmp_path: Path) -> None:
    good = f"tls: {{ca: {pki.path('ca')}, cert: {pki.path('client')}, " \
           f"key: {pki.path('client', 'key')}}}"
    result = shipmate("run", "--once", "-c", str(agent_config(tmp_path, backend,
                                                              mtls_etcd.endpoint, good)))
    assert result.returncode == 0, result.stderr
    for bad, expected in (
            (good.replace(str(pki.path("ca")), str(pki.path("other_ca"))),
             "certificate verify failed"),
            (good.replace(str(pki.path("client")), str(pki.path("expired_client")))
             .replace(str(pki.path("client", "key")), str(pki.path("expired_client", "key"))),
             "client certificate"),
            (good.replace(str(pki.path("client", "key")), str(pki.path("other_client", "key"))),
             "tls.cert and tls.key do not match")):
        result = shipmate("run", "-c", str(agent_config(tmp_path, backend, mtls_etcd.endpoint,
                                                        bad)))
        assert result.returncode == 1, result.stderr
        assert "the store refused us" in result.stderr and expected in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_running_agent_that_meets_a_tls_failure_keeps_its_instances_and_steps_down(
        backend: str, pki: Pki, tmp_path: Path) -> None:
    import threading

    from agent.runtime import Agent
    from tests.helpers import alive, eventually, kill_recorded, process_records

    service = started(lambda: Etcd(pki, client_cert_auth=True))
    tls_block = (f"tls: {{ca: {pki.path('ca')}, cert: {pki.path('client')}, "
                 f"key: {pki.path('client', 'key')}}}")
    path = agent_config(tmp_path, backend, service.endpoint, tls_block)
    path.write_text(path.read_text().replace("count: 0", "count: 2")
                    .replace("  cluster: tls\n", "  cluster: tls\n  leader_ttl: 3s\n"))
    agent = Agent(path)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: len([r for r in process_records(tmp_path) if alive(r["pid"])]) == 2,
                   timeout=30, what="two instances")
        assert agent.leadership.is_leader
        pids = sorted(r["pid"] for r in process_records(tmp_path))
        service.stop()
        service.server_cert = "other_server"  # now a certificate the agent does not trust
        service.start()
        eventually(lambda: not agent.leadership.is_leader, timeout=30, what="stepping down")
        assert thread.is_alive()
        assert sorted(r["pid"] for r in process_records(tmp_path) if alive(r["pid"])) == pids
    finally:
        agent.stop()
        thread.join(30)
        kill_recorded(tmp_path)
        service.close()
