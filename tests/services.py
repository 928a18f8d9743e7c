"""Real services for the test suite: etcd, dockerd, moto_server, prometheus, haproxy.

Each service runs from its own binary on free loopback ports, in its own
temporary directory, and is started only when a test asks for it.  ``start()``
waits until the service answers; ``stop()`` ends it by its own pid (SIGTERM,
then SIGKILL, then whatever is left in its process group) and keeps its
directory; ``close()`` stops it and removes the directory.  Every service still
alive when the interpreter exits is closed by an ``atexit`` hook, and each child
gets SIGTERM from the kernel if the test process dies without running it
(Linux ``PR_SET_PDEATHSIG``; start services from the main thread).

The output of a service goes to ``<dir>/service.log``; its last lines are in
the error raised when a service fails to start.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

POLL = 0.05  # seconds between readiness probes

# Loopback only: never let an http_proxy from the environment see these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

APT_PACKAGES = "etcd-server etcd-client docker.io busybox-static prometheus haproxy"


class MissingDependency(RuntimeError):
    """A binary or Python package that a service needs is not installed."""

    def __init__(self, what: str, hint: str) -> None:
        super().__init__(f"{what} not found; {hint}")
        self.what = what


class ServiceError(RuntimeError):
    """A service exited early or did not answer in time."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that are free right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url`` without any proxy; return (status, body), also for HTTP errors."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` every POLL seconds until it is true; raise TimeoutError at the deadline.

    Exceptions from ``check`` count as "not yet"; the last one is in the error.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if check():
                return
        except Exception as err:  # "not yet"
            last = err
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not true after {timeout}s (last error: {last!r})")
        time.sleep(POLL)


def _apt(package: str) -> str:
    return f"install the Debian package {package} (scripts/test installs {APT_PACKAGES})"


def _find_binary(name: str, hint: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        raise MissingDependency(f"binary {name!r}", hint)
    return path


def _die_with_parent() -> Callable[[], None] | None:
    """Return a preexec_fn that makes the child get SIGTERM when we die (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


_PREEXEC = _die_with_parent()
_LIVE: set[Service] = set()
_DIR_PATTERNS = ("shipmate-svc-*", "smd-*")  # see Service.__init__ and Dockerd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sweep_stale_dirs() -> None:
    """Remove service directories left by a test run that was killed (its owner pid is gone)."""
    roots = {Path(tempfile.gettempdir()), Path("/tmp")}
    for path in (p for root in roots for pattern in _DIR_PATTERNS for p in root.glob(pattern)):
        try:
            owner = int((path / "owner.pid").read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if not _pid_alive(owner):
            _unmount_under(path)
            shutil.rmtree(path, ignore_errors=True)


_sweep_once = functools.cache(sweep_stale_dirs)


@atexit.register
def _close_all() -> None:
    """Close every service still alive (atexit)."""
    for service in list(_LIVE):
        service.close()


class Service:
    """Base class: one process, one temporary directory, one log file."""

    start_timeout = 30.0
    stop_timeout = 10.0

    def __init__(self, prefix: str, tmp_root: str | None = None) -> None:
        _sweep_once()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_root))
        (self.dir / "owner.pid").write_text(str(os.getpid()))
        self.log_path = self.dir / "service.log"
        self._proc: subprocess.Popen[bytes] | None = None
        _LIVE.add(self)

    # -- to implement -----------------------------------------------------
    def command(self) -> list[str]:
        """The argv that runs the service."""
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the service answers."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """Pid of the running process, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the process and wait until it answers (no-op if it runs)."""
        if self.running:
            return
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting for it (from the main thread: the child is
        killed when the thread that started it ends)."""
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_PREEXEC,  # only prctl(): safe between fork and exec
            )
        _LIVE.add(self)

    def wait_ready(self) -> None:
        """Wait until the launched process answers; stop it and raise if it does not."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServiceError(f"{self!r} exited with code {code}:\n{self.log_tail()}")
            try:
                if self.ready():
                    return
            except Exception:  # not ready yet
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"{self!r} did not answer in {self.start_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(POLL)

    def stop(self) -> None:
        """Stop the process by its pid: SIGTERM, then SIGKILL; keep the directory."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # helpers it left in its own process group (e.g. dockerd's containerd)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop the process and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        _LIVE.discard(self)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the service's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} dir={self.dir}>"


class Pki:
    """A private CA and the certificates TLS tests need, as PEM files in ``directory``.

    ``ca``: the CA; ``server``: 127.0.0.1/localhost signed by it; ``client``: a client
    certificate signed by it; ``expired_server`` and ``expired_client``: the same, expired
    yesterday; ``other_ca`` with ``other_client`` and ``other_server``: a CA nobody trusts.
    Each name has ``<name>.pem`` and (except the CAs) ``<name>.key`` (``path(name, "key")``).
    """

    def __init__(self, directory: Path) -> None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)

        def write(name: str, cert: Any, key: Any) -> None:
            (self.dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (self.dir / f"{name}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))

        def ca(name: str) -> tuple[Any, Any]:
            key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"shipmate test {name}")])
            cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(days=2))
                    .not_valid_after(now + datetime.timedelta(days=30))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                    .add_extension(x509.KeyUsage(
                        digital_signature=True, key_cert_sign=True, crl_sign=True,
                        content_commitment=False, key_encipherment=False,
                        data_encipherment=False, key_agreement=False, encipher_only=False,
                        decipher_only=False), True)
                    .sign(key, hashes.SHA256()))
            write(name, cert, key)
            return cert, key

        def leaf(name: str, issuer: tuple[Any, Any], usage: list[Any],
                 expired: bool = False) -> None:
            key = ec.generate_private_key(ec.SECP256R1())
            end = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=30)
            builder = (x509.CertificateBuilder()
                       .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                       .issuer_name(issuer[0].subject).public_key(key.public_key())
                       .serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(end)
                       .add_extension(x509.ExtendedKeyUsage(usage), False)
                       .add_extension(x509.SubjectAlternativeName([
                           x509.DNSName("localhost"),
                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False))
            write(name, builder.sign(issuer[1], hashes.SHA256()), key)

        main, other = ca("ca"), ca("other_ca")
        # etcd's gateway dials its own gRPC port with the server certificate as a client one
        server = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        client = [ExtendedKeyUsageOID.CLIENT_AUTH]
        leaf("server", main, server)
        leaf("client", main, client)
        leaf("expired_server", main, server, expired=True)
        leaf("expired_client", main, client, expired=True)
        leaf("other_server", other, server)
        leaf("other_client", other, client)

    def path(self, name: str, kind: str = "pem") -> Path:
        """The file of certificate ``name`` (``kind`` "pem") or of its private key ("key")."""
        return self.dir / f"{name}.{kind}"


class Etcd(Service):
    """etcd 3.4 on loopback with the v2 and v3 APIs enabled.

    ``stop()`` then ``start()`` brings it back on the same port and data dir.

    With ``pki`` it serves https with the certificate ``server_cert`` (a name in the
    :class:`Pki`; change it and restart to present another one), and with
    ``client_cert_auth`` it requires a client certificate signed by the Pki's CA.
    """

    def __init__(self, pki: Pki | None = None, *, client_cert_auth: bool = False,
                 server_cert: str = "server", extra: tuple[str, ...] = ()) -> None:
        self.extra = list(extra)  # more etcd flags, e.g. --auth-token-ttl=2
        self.binary = _find_binary("etcd", _apt("etcd-server"))
        self.etcdctl_binary = _find_binary("etcdctl", _apt("etcd-client"))
        super().__init__("shipmate-svc-etcd-")
        self.port, self.peer_port = free_ports(2)
        self.pki, self.client_cert_auth, self.server_cert = pki, client_cert_auth, server_cert
        scheme = "https" if pki is not None else "http"
        self.endpoint = f"{scheme}://127.0.0.1:{self.port}"
        self.data_dir = self.dir / "data"

    def _tls_args(self) -> list[str]:
        if self.pki is None:
            return []
        pki = self.pki
        args = [f"--cert-file={pki.path(self.server_cert)}",
                f"--key-file={pki.path(self.server_cert, 'key')}",
                f"--trusted-ca-file={pki.path('ca')}"]
        return args + (["--client-cert-auth"] if self.client_cert_auth else [])

    def _etcdctl_tls(self) -> list[str]:
        if self.pki is None:
            return []
        return [f"--cacert={self.pki.path('ca')}", f"--cert={self.pki.path('client')}",
                f"--key={self.pki.path('client', 'key')}", "--insecure-skip-tls-verify"]

    def command(self) -> list[str]:
        """The etcd argv."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name=default",
            f"--data-dir={self.data_dir}",
            "--enable-v2=true",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            # one member, no peers: a short election timeout only makes startup fast
            "--heartbeat-interval=20",
            "--election-timeout=100",
            "--logger=zap",
            "--log-level=warn",
            *self._tls_args(),
            *self.extra,
        ]

    def ready(self) -> bool:
        """True once /health says the member is healthy."""
        if self.pki is not None:  # any answer over TLS will do; etcdctl checks the rest
            self.etcdctl("endpoint", "health", timeout=5.0)
            return True
        status, body = http_get(f"{self.endpoint}/health", timeout=1.0)
        return status == 200 and json.loads(body).get("health") == "true"

    def etcdctl(self, *args: str, timeout: float = 30.0, api: str = "3") -> str:
        """Run ``etcdctl`` (v3 API, or ``api="2"``) here; return stdout; raise RuntimeError
        with stderr."""
        env = dict(os.environ, ETCDCTL_API=api)
        tls = self._etcdctl_tls()
        if api == "2":  # etcdctl's v2 flags have other names
            tls = [t.replace("--cacert", "--ca-file").replace("--cert=", "--cert-file=")
                   .replace("--key=", "--key-file=") for t in tls if "insecure" not in t]
        result = subprocess.run(
            [self.etcdctl_binary, f"--endpoints={self.endpoint}", *tls, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"etcdctl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout


class EtcdMember(Etcd):
    """One member of an :class:`EtcdCluster` (real elections: etcd's default timings)."""

    def __init__(self, name: str, cluster: str, client_port: int, peer_port: int) -> None:
        super().__init__()
        self.name, self.cluster = name, cluster
        self.port, self.peer_port = client_port, peer_port
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary, f"--name={self.name}", f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint}", f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.cluster}", "--initial-cluster-state=new",
            "--initial-cluster-token=shipmate-test", "--logger=zap", "--log-level=warn",
        ]


class EtcdCluster:
    """Three etcd members on loopback: ``.members``, ``.endpoints``, ``.etcdctl(*args)``."""

    def __init__(self, size: int = 3) -> None:
        ports = free_ports(2 * size)
        names = [f"m{i}" for i in range(size)]
        cluster = ",".join(f"{n}=http://127.0.0.1:{ports[2 * i + 1]}"
                           for i, n in enumerate(names))
        self.members = [EtcdMember(n, cluster, ports[2 * i], ports[2 * i + 1])
                        for i, n in enumerate(names)]
        self.endpoints = [m.endpoint for m in self.members]

    def start(self) -> None:
        """Start every member at once (none is healthy before a quorum runs)."""
        for member in self.members:
            member.launch()
        try:
            for member in self.members:
                member.wait_ready()
        except BaseException:
            self.close()
            raise

    def etcdctl(self, *args: str, timeout: float = 30.0) -> str:
        """etcdctl (v3) against the first member (reads are linearizable: the cluster's)."""
        return self.members[0].etcdctl(*args, timeout=timeout)

    def close(self) -> None:
        for member in self.members:
            member.close()


# Busybox applets linked into the test image (all in /bin).
_APPLETS = "sh httpd sleep cat echo ls env true false wget nc kill ps id"


class Dockerd(Service):
    """A private Docker daemon (vfs storage, no bridge, no iptables) on a short unix socket.

    Talk to it with ``docker.DockerClient(base_url=dockerd.host)`` or ``dockerd.client()``,
    or ``DOCKER_HOST=dockerd.host``.
    """

    start_timeout = 60.0
    stop_timeout = 20.0

    #: Image tags made by build_busybox_images().
    WEB_V1 = "shipmate-test/web:v1"
    WEB_V2 = "shipmate-test/web:v2"
    WEB_BROKEN = "shipmate-test/web:broken"
    #: The YAML ``command`` that makes them serve ``/www`` on the instance's port.
    WEB_COMMAND = '[httpd, -f, -p, "{port}", -h, /www]'

    def __init__(self) -> None:
        self.binary = _find_binary("dockerd", _apt("docker.io"))
        try:
            import docker  # noqa: F401
        except ImportError as err:
            raise MissingDependency("python package 'docker'", "pip install -e '.[test]'") from err
        # unix socket paths are limited to ~100 characters: stay directly under /tmp
        super().__init__("smd-", tmp_root="/tmp")  # matches _DIR_PATTERNS
        self.socket = self.dir / "docker.sock"
        self.host = f"unix://{self.socket}"
        self._client: Any = None
        self.images: dict[str, str] = {}

    def command(self) -> list[str]:
        """The dockerd argv."""
        return [
            self.binary,
            f"--data-root={self.dir / 'data'}",
            f"--exec-root={self.dir / 'exec'}",
            f"--host={self.host}",
            f"--pidfile={self.dir / 'docker.pid'}",
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--shutdown-timeout=2",
            "--log-level=warn",
        ]

    def client(self) -> Any:
        """A ``docker.DockerClient`` bound to this daemon (shared, created on first use)."""
        if self._client is None:
            import docker

            self._client = docker.DockerClient(base_url=self.host, timeout=60)
        return self._client

    def ready(self) -> bool:
        """True once the daemon answers /_ping."""
        return self.socket.exists() and bool(self.client().ping())

    def stop(self) -> None:
        """Remove every container (fast, SIGKILL), then stop the daemon."""
        if self.running:
            try:
                for container in self.client().containers.list(all=True):
                    container.remove(force=True)
            except Exception:  # best effort: the daemon stops them anyway
                pass
        if self._client is not None:
            self._client.close()
            self._client = None
        super().stop()
        _unmount_under(self.dir)  # dockerd leaves exec/netns/default mounted

    def build_busybox_images(self) -> dict[str, str]:
        """Import the busybox test images; return {"v1": tag, "v2": tag, "broken": tag}.

        Each image is a rootfs with a static /bin/busybox, applet links in /bin
        and no default command.  Start the web server with
        ``httpd -f -p PORT -h /www`` (``--network host``):

        - ``shipmate-test/web:v1`` serves "v1\\n" at ``/`` (``/www/index.html``);
        - ``shipmate-test/web:v2`` serves "v2\\n";
        - ``shipmate-test/web:broken`` has no ``/www``: the same command exits at
          once with code 1 ("can't change directory to '/www'") and never listens.
        """
        busybox = Path("/bin/busybox")
        if not busybox.exists():
            raise MissingDependency("/bin/busybox", _apt("busybox-static"))
        api = self.client().api
        tags = {"v1": self.WEB_V1, "v2": self.WEB_V2, "broken": self.WEB_BROKEN}
        for name, tag in tags.items():
            www = None if name == "broken" else f"{name}\n".encode()
            repository, _, version = tag.rpartition(":")
            api.import_image_from_data(
                _busybox_rootfs_tar(busybox, www),
                repository=repository,
                tag=version,
                changes=["ENV PATH=/bin", "WORKDIR /"],
            )
        self.images = tags
        return tags


def _busybox_rootfs_tar(busybox: Path, index_html: bytes | None) -> bytes:
    """A rootfs tarball: /bin/busybox, applet links, /tmp, and /www/index.html if given."""
    buf = io.BytesIO()
    now = int(time.time())

    def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, now
        info.linkname, info.size = link, len(data)
        tar.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(fileobj=buf, mode="w") as tar:
        add("bin", tarfile.DIRTYPE, 0o755)
        add("bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
        for applet in _APPLETS.split():
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("tmp", tarfile.DIRTYPE, 0o1777)
        add("etc", tarfile.DIRTYPE, 0o755)
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/:/bin/sh\n")
        if index_html is not None:
            add("www", tarfile.DIRTYPE, 0o755)
            add("www/index.html", tarfile.REGTYPE, 0o644, index_html)
    return buf.getvalue()


def _unmount_under(root: Path) -> None:
    """Lazily unmount every mount point below ``root`` (deepest first)."""
    prefix = f"{root}/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    umount2 = ctypes.CDLL(None, use_errno=True).umount2
    for point in sorted(points, key=len, reverse=True):
        umount2(point.encode(), 2)  # MNT_DETACH


class Moto(Service):
    """``moto_server``: a local fake of the AWS APIs (ASG, ELB, ELBv2, EC2, ...).

    Use boto3 with ``endpoint_url=moto.endpoint_url`` and fake credentials.
    """

    def __init__(self) -> None:
        self.binary = _find_binary("moto_server", "pip install -e '.[test]' (moto[server])")
        super().__init__("shipmate-svc-moto-")
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The moto_server argv."""
        return [self.binary, "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> bool:
        """True once the server answers HTTP."""
        status, _ = http_get(f"{self.endpoint_url}/moto-api/data.json", timeout=1.0)
        return status == 200

    def reset(self) -> None:
        """Forget every AWS resource created so far."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with _OPENER.open(req, timeout=10):
            pass


class Prometheus(Service):
    """Prometheus 2.x scraping ``targets`` (``"127.0.0.1:PORT"``) every second at /metrics."""

    def __init__(self, targets: Iterable[str] = ()) -> None:
        self.binary = _find_binary("prometheus", _apt("prometheus"))
        super().__init__("shipmate-svc-prometheus-")
        self.targets = list(targets)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.dir / "prometheus.yml"
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": [
                {"job_name": "shipmate", "static_configs": [{"targets": self.targets}]}
            ],
        }
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML

    def command(self) -> list[str]:
        """The prometheus argv."""
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]

    def ready(self) -> bool:
        """True once /-/ready answers 200."""
        return http_get(f"{self.url}/-/ready", timeout=1.0)[0] == 200

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Run an instant query; return ``data.result`` (raise on an error status)."""
        status, body = http_get(
            f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        )
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed ({status}): {doc}")
        return doc["data"]["result"]

    def wait_for_up(self, timeout: float = 15.0) -> None:
        """Wait until ``up`` is 1 for every target."""
        want = set(self.targets)

        def all_up() -> bool:
            up = {r["metric"].get("instance") for r in self.query("up") if r["value"][1] == "1"}
            return want <= up

        wait_until(all_up, timeout, f"prometheus up == 1 for {sorted(want)}")


class Haproxy(Service):
    """HAProxy 2.x in master-worker mode: one HTTP frontend on loopback (``.url``) in front of
    one backend whose servers :meth:`set_servers` sets, reloading as confd's ``reload_cmd``
    would (SIGUSR2 to the master: a new worker takes the listening socket over, the old one
    finishes its requests). With no server the backend answers 503, as for "no server
    available".

    ``redispatch``: a connection refused by a server is retried on another one (``retries
    2`` + ``option redispatch``); off by default, so that every request sent to a server
    that is gone fails, as it does through a plain haproxy.
    """

    def __init__(self, redispatch: bool = False) -> None:
        self.binary = _find_binary("haproxy", _apt("haproxy"))
        super().__init__("shipmate-svc-haproxy-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.config_path = self.dir / "haproxy.cfg"
        self.redispatch = redispatch
        self.servers: list[str] = []
        self.reloads = 0
        self._write()

    def render(self, servers: Iterable[str]) -> str:
        """The config file for backends ``servers`` (``host:port`` each)."""
        retry = "    retries 2\n    option redispatch\n" if self.redispatch else "    retries 0\n"
        lines = [f"    server s{n} {server}" for n, server in enumerate(servers)]
        return (
            "global\n"
            "    maxconn 512\n"
            f"    pidfile {self.dir / 'haproxy.pid'}\n"
            "defaults\n"
            "    mode http\n"
            "    timeout connect 2s\n"
            "    timeout client 10s\n"
            "    timeout server 10s\n"
            f"{retry}"
            "frontend web\n"
            f"    bind 127.0.0.1:{self.port}\n"
            "    default_backend web\n"
            "backend web\n"
            "    balance roundrobin\n"
            + "".join(line + "\n" for line in lines)
        )

    def _write(self) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self.render(self.servers))
        tmp.replace(self.config_path)

    def command(self) -> list[str]:
        """The haproxy argv: master-worker, in the foreground."""
        return [self.binary, "-W", "-db", "-f", str(self.config_path)]

    def ready(self) -> bool:
        """True once the master has its worker and the frontend answers (503 with no server)."""
        return ("Loading success" in self.log_path.read_text(errors="replace")
                and http_get(self.url, timeout=1.0)[0] in (200, 503))

    def set_servers(self, servers: Iterable[str]) -> bool:
        """Render the backend list and reload, if it changed; True if it did."""
        servers = sorted(servers)
        if servers == self.servers:
            return False
        self.servers = servers
        self._write()
        if self.pid is not None:
            self._reload()
        return True

    def _reload(self) -> None:
        """SIGUSR2 to the master, and wait until the new worker runs and the former one
        has finished (as ``systemctl reload`` waits): the master ignores a reload asked for
        before that."""
        def done() -> tuple[int, int]:
            text = self.log_path.read_text(errors="replace")
            return text.count("Loading success"), text.count("Former worker")

        before = done()
        for _ in range(3):
            assert self.pid is not None
            os.kill(self.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                now = done()
                if now[0] > before[0] and now[1] > before[1]:
                    self.reloads += 1
                    return
                time.sleep(0.005)
        raise ServiceError(f"{self!r} did not reload:\n{self.log_tail()}")
