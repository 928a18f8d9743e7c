"""The ``process`` actuator: instances are local processes (the embedded default).

Each instance is a subprocess started from the service's ``command`` in its own
session (so Ctrl-C on the agent does not reach it), with output appended to
``<state_dir>/logs/<instance>.log``. A JSON record per instance under
``<state_dir>/processes/<cluster>/`` holds its pid, the kernel's start time of
that pid (so a reused pid is never mistaken for it) and its labels: a restarted
agent reads the records and adopts what still runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from agent import Actuator, Instance, InstanceSpec, TypeConfig, hookimpl


class ProcessConfig(TypeConfig):
    host: str = "127.0.0.1"
    "the address instances listen on, as announced"
    dir: Path | None = None
    "where records and logs live (default: the agent's state_dir)"


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
        self.records.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.parallelism = 8

    def _instance(self, record: dict) -> Instance:
        alive = record["ticks"] is not None and _start_ticks(record["pid"]) == record["ticks"]
        return Instance(name=record["name"], service=record["service"], slot=record["slot"],
                        version=record["version"], host=self.config.host, port=record["port"],
                        running=alive, cluster=self.context.cluster, ref=record)

    def list(self) -> list[Instance]:
        for pid, child in list(self.children.items()):  # the loop and a deploy both list
            if child.poll() is not None:  # reap our own exited children
                self.children.pop(pid, None)
        out = []
        for path in sorted(self.records.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a record being written; the next pass sees it
            out.append(self._instance(record))
        return out

    def start(self, spec: InstanceSpec) -> Instance:
        if not spec.command:
            raise ValueError(f"service {spec.service!r} has no command to run")
        log_path = self.logs / f"{spec.name}.log"
        with open(log_path, "ab") as log:
            child = subprocess.Popen(
                spec.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **spec.env}, start_new_session=True,
            )
        self.children[child.pid] = child
        record = {"name": spec.name, "service": spec.service, "slot": spec.slot,
                  "version": spec.version, "port": spec.port, "pid": child.pid,
                  "ticks": _start_ticks(child.pid), "command": spec.command,
                  "labels": spec.labels, "log": str(log_path)}
        path = self.records / f"{spec.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
        return self._instance(record)

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
