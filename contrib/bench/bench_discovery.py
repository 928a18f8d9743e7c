"""Benchmark: what a load balancer fed by the announcements sees during deploys and scale-downs.

Starts its own etcd, dockerd and haproxy (tests/services.py). For each kind of change it
runs one service of busybox httpd containers that exit at once on SIGTERM (docker
``init: true``), a watcher that renders haproxy's backends from the announcements and
reloads it as confd does (tests/discovery.py), and requests through haproxy without
pause; then it prints, per kind, the failed requests and the *announced-set gap*: the
longest time in which no announced instance answered.

``--baseline REF`` runs the very same scenarios a second time with the agent's code from
the git revision ``REF`` (``git archive``; e.g. ``main`` before this change) and prints both.

    python3 contrib/bench/bench_discovery.py [--rounds 1] [--baseline REF] [--only KIND]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.discovery import Measured, Service  # noqa: E402
from tests.helpers import port_block  # noqa: E402
from tests.services import Dockerd, Etcd, Haproxy  # noqa: E402

# kind -> (count, deploy block, what is done, the count after)
KINDS = {
    "scale-down 3->1": (3, "{type: rolling}", "scale", 1),
    "rolling 1 start-first": (1, "{type: rolling, order: start-first}", "deploy", 1),
    "rolling 1 stop-first": (1, "{type: rolling, order: stop-first}", "deploy", 1),
    "rolling 3 start-first": (3, "{type: rolling, order: start-first}", "deploy", 3),
    "rolling 3 stop-first": (3, "{type: rolling, order: stop-first}", "deploy", 3),
    "blue-green 2": (2, "{type: blue-green, ports: [%d, %d], bake: 1s}", "deploy", 2),
    "killed 3 (redispatch)": (3, "{type: rolling}", "kill", 3),
}


def run_kind(kind: str, etcd: Etcd, dockerd: Dockerd, tmp: Path, code: Path | None,
             drain: str | None) -> Measured:
    count, deploy, act, after = KINDS[kind]
    port = port_block(40)
    if "%d" in deploy:
        deploy = deploy % (port, port + 10)
    haproxy = Haproxy(redispatch=act == "kill")
    haproxy.start()
    service = Service(etcd=etcd, dockerd=dockerd, haproxy=haproxy, tmp=tmp, count=count,
                      port=port, deploy=deploy, drain=drain)
    service.start_agent(code)
    try:
        service.wait_settled(timeout=90, what=f"{kind}: {count} instances in haproxy")
        if act == "scale":
            do = lambda: service.scale(after)  # noqa: E731
        elif act == "deploy":
            do = lambda: service.request_deploy(Dockerd.WEB_V2)  # noqa: E731
        else:
            victim = sorted(service.announced())[0]
            do = lambda: dockerd.client().api.kill(victim)  # noqa: E731
        image = Dockerd.WEB_V2 if act == "deploy" else None
        return service.measure(do, lambda: service.wait_settled(
            after, image=image, timeout=120, what=f"{kind}: done"))
    finally:
        service.close()
        haproxy.close()


def export(ref: str, into: Path) -> Path:
    """The tree of git revision ``ref``, extracted under ``into``."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="runs of each kind")
    parser.add_argument("--baseline", metavar="REF", help="also run the agent of git REF")
    parser.add_argument("--only", action="append", choices=list(KINDS), help="one kind")
    args = parser.parse_args()
    kinds = args.only or list(KINDS)
    with tempfile.TemporaryDirectory(prefix="bench-discovery-") as folder:
        tmp = Path(folder)
        runs: list[tuple[str, Path | None, str | None]] = [("this tree", None, None)]
        if args.baseline:
            runs.append((f"baseline {args.baseline}", export(args.baseline, tmp / "baseline"),
                         None))
        etcd, dockerd = Etcd(), Dockerd()
        etcd.start()
        dockerd.start()
        dockerd.build_busybox_images()
        results: dict[tuple[str, str], list[Measured]] = {}
        try:
            for label, code, drain in runs:
                for kind in kinds:
                    for _ in range(args.rounds):
                        started = time.monotonic()
                        measured = run_kind(kind, etcd, dockerd, tmp, code, drain)
                        results.setdefault((label, kind), []).append(measured)
                        print(f"{label:>16} | {kind:<22} | {measured.failed:3d} of "
                              f"{len(measured.traffic.results):4d} failed | gap "
                              f"{measured.gap:6.3f}s | {time.monotonic() - started:5.1f}s",
                              flush=True)
        finally:
            dockerd.close()
            etcd.close()
    print()
    print(f"{'run':>16} | {'kind':<22} | failed requests (per round) | worst gap")
    for (label, kind), measured in results.items():
        print(f"{label:>16} | {kind:<22} | {str([m.failed for m in measured]):<27} | "
              f"{max(m.gap for m in measured):.3f}s")


if __name__ == "__main__":
    main()
