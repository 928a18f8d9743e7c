"""The ``process`` actuator: instances are local processes (the embedded default).

Each instance is a subprocess started from the service's ``command`` in its own
session (so Ctrl-C on the agent does not reach it), with output appended to
``<state_dir>/logs/<instance>.log``. A JSON record per instance under
``<state_dir>/processes/<cluster>/`` holds its pid, the kernel's start time of
that pid (so a reused pid is never mistaken for it) and its labels: a restarted
agent reads the records and adopts what still runs.

The record is written *before* the process is spawned (without a pid), and the
process carries ``SHIPMATE_INSTANCE=<name>`` in its environment: an agent
killed between the two writes leaves a record that the next agent completes by
finding that process, so no instance is ever left that a later agent cannot see.

Logs rotate when they pass ``log_max_bytes`` (copy, then truncate: the instance
keeps writing to the same file), keeping ``log_keep`` old files; the logs of an
instance that no longer has a record are removed after ``log_retention``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from pydantic import Field

from agent import Actuator, Duration, Instance, InstanceSpec, TypeConfig, hookimpl

MARKER = "SHIPMATE_INSTANCE"
UNSPAWNED_GRACE = 30.0  # seconds a record without a pid may wait for its process to show

BASE_ENV = ("PATH", "HOME", "LANG", "TZ")
"""What an instance gets of the agent's environment, besides ``env_passthrough``."""


class ProcessConfig(TypeConfig):
    host: str = "127.0.0.1"
    "the address instances listen on, as announced"
    dir: Path | None = None
    "where records and logs live (default: the agent's state_dir)"
    log_max_bytes: int = Field(10_000_000, ge=1000)
    "an instance's log is rotated past this size"
    log_keep: int = Field(3, ge=0, le=100)
    "rotated logs kept per instance"
    log_retention: Duration = 3600.0
    "how long the logs of a removed instance are kept"
    env_passthrough: list[str] = []
    "names of the agent's environment variables instances also get (besides PATH HOME LANG TZ)"


def _find_marked(name: str) -> int | None:
    """The pid of the session leader whose environment has ``SHIPMATE_INSTANCE=name``."""
    wanted = f"{MARKER}={name}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0") and os.getsid(
                    int(entry.name)) == int(entry.name):
                return int(entry.name)
        except (OSError, ProcessLookupError):
            continue
    return None


def _private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents as 0700 folders."""
    for folder in reversed([p for p in (path, *path.parents) if not p.exists()]):
        folder.mkdir(mode=0o700, exist_ok=True)


def _private(path: str, flags: int) -> int:
    """An ``open`` opener: files the actuator creates are 0600 (logs hold what instances say)."""
    return os.open(path, flags, 0o600)


def _start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


class ProcessActuator(Actuator):
    """Runs instances as local processes, one record file each."""

    type_name = "process"
    Config = ProcessConfig

    def __init__(self, config: ProcessConfig, context) -> None:
        super().__init__(config, context)
        root = config.dir or context.state_dir
        self.records = root / "processes" / context.cluster
        self.logs = root / "logs"
        _private_dir(self.records)
        _private_dir(self.logs)
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.exit_codes: dict[int, int] = {}  # pid -> how our own exited child ended
        self.spawning: set[str] = set()
        self._next_tend = 0.0
        self.parallelism = 8

    def _instance(self, record: dict) -> Instance:
        alive = record["ticks"] is not None and _start_ticks(record["pid"]) == record["ticks"]
        return Instance(name=record["name"], service=record["service"], slot=record["slot"],
                        version=record["version"], host=self.config.host, port=record["port"],
                        running=alive, cluster=self.context.cluster, ref=record,
                        exit_code=None if alive else self._reap(record["pid"]))

    def _reap(self, pid: int) -> int | None:
        """How our own child ``pid`` ended (reaping it), if it was ours and has ended."""
        child = self.children.get(pid)
        code = child.poll() if child is not None else None
        if code is not None:
            self.exit_codes[pid] = code
            self.children.pop(pid, None)
        return self.exit_codes.get(pid)

    def list(self) -> list[Instance]:
        for pid in list(self.children):  # the loop and a deploy both list
            self._reap(pid)  # reap our own exited children
        out = []
        for path in sorted(self.records.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a record being written; the next pass sees it
            if record.get("pid") is None:
                record = self._complete(path, record)
                if record is None:
                    continue
            out.append(self._instance(record))
        self._tend_logs({i.name for i in out})
        return out

    def _complete(self, path: Path, record: dict) -> dict | None:
        """A record written before its spawn: find the process by its marker."""
        if record["name"] in self.spawning:
            return None  # this agent is spawning it right now
        pid = _find_marked(record["name"])
        if pid is None:
            if time.time() - record.get("written", 0) < UNSPAWNED_GRACE:
                return None  # perhaps still being spawned by an agent that just died
            record = {**record, "pid": -1, "ticks": None}  # never ran: an exited instance
        else:
            record = {**record, "pid": pid, "ticks": _start_ticks(pid)}
        self._write(path, record)
        return record

    def start(self, spec: InstanceSpec) -> Instance:
        if not spec.command:
            raise ValueError(f"service {spec.service!r} has no command to run")
        log_path = self.logs / f"{spec.name}.log"
        path = self.records / f"{spec.name}.json"
        record = {"name": spec.name, "service": spec.service, "slot": spec.slot,
                  "version": spec.version, "port": spec.port, "pid": None, "ticks": None,
                  "command": spec.command, "labels": spec.labels, "log": str(log_path),
                  "written": time.time()}
        self.spawning.add(spec.name)
        try:
            self._write(path, record)  # first: a killed agent leaves a record to complete
            env = {k: os.environ[k] for k in (*BASE_ENV, *self.config.env_passthrough)
                   if k in os.environ}
            try:
                with open(log_path, "ab", opener=_private) as log:
                    child = subprocess.Popen(
                        spec.command, stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True,
                        env={**env, **spec.env, MARKER: spec.name},
                    )
            except OSError:  # nothing was spawned: no record either
                path.unlink(missing_ok=True)
                raise
            self.children[child.pid] = child
            record = {**record, "pid": child.pid, "ticks": _start_ticks(child.pid)}
            self._write(path, record)
        finally:
            self.spawning.discard(spec.name)
        return self._instance(record)

    @staticmethod
    def _write(path: Path, record: dict) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "w", opener=_private) as handle:
            handle.write(json.dumps(record))
        tmp.replace(path)

    def output(self, instance: Instance, lines: int = 5) -> str | None:
        path = self.logs / f"{instance.name}.log"
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 4096))
                tail = f.read().decode(errors="replace")
        except OSError:
            return None
        return "\n".join(tail.splitlines()[-lines:])

    def _tend_logs(self, names: set[str]) -> None:
        """Rotate big logs; remove the logs of instances gone for ``log_retention``."""
        now = time.time()
        if now < self._next_tend:
            return
        self._next_tend = now + 10.0
        cfg = self.config
        for path in self.logs.glob("*.log"):
            name = path.name.removesuffix(".log")
            try:
                stat = path.stat()
            except OSError:
                continue
            if name not in names:
                if now - stat.st_mtime > cfg.log_retention:
                    for old in [path, *self.logs.glob(f"{name}.log.*")]:
                        old.unlink(missing_ok=True)
                continue
            if stat.st_size > cfg.log_max_bytes:
                for i in range(cfg.log_keep, 1, -1):
                    older = self.logs / f"{name}.log.{i - 1}"
                    if older.exists():
                        older.replace(self.logs / f"{name}.log.{i}")
                if cfg.log_keep:
                    shutil.copyfile(path, self.logs / f"{name}.log.1")
                with open(path, "r+b") as f:
                    f.truncate(0)  # the instance appends (O_APPEND): it goes on at 0

    def stop(self, instance: Instance, grace: float) -> None:
        record = instance.ref
        pid, ticks = record["pid"], record["ticks"]
        if self._alive(pid, ticks):
            self._signal(pid, signal.SIGTERM)
            self._gone(pid, ticks, grace)
            # what is left of the session (a child that ignored SIGTERM) goes now; the group id
            # cannot have been reused while any member lives
            self._signal(pid, signal.SIGKILL)
            self._gone(pid, ticks, 5.0)
        self.children.pop(pid, None)
        self.exit_codes.pop(pid, None)
        (self.records / f"{instance.name}.json").unlink(missing_ok=True)

    def _alive(self, pid: int, ticks: int) -> bool:
        child = self.children.get(pid)
        if child is not None:
            child.poll()  # reap it, or it lingers as a zombie
        return ticks is not None and _start_ticks(pid) == ticks

    def _gone(self, pid: int, ticks: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self._alive(pid, ticks):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # the whole session: shells and their children too


@hookimpl
def shipmate_actuator_types() -> list[type[Actuator]]:
    return [ProcessActuator]
