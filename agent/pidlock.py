"""One agent per state folder: a pid file held with an exclusive ``flock``.

``shipmate run`` takes ``<state_dir>/agent.pid`` before it starts. The lock
goes with the process (the kernel drops it when the agent dies, however it
dies), so a stale file never blocks a restart; the file's content (pid,
config, HTTP address) only serves to tell a second agent whom it met.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO, Any


class AgentRunning(Exception):
    """Another agent holds the lock; the message names its pid and how to reach it."""


class PidLock:
    """The held lock; :meth:`release` (or the process's end) lets it go."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path, self.handle = path, handle

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def read_holder(path: Path) -> dict[str, Any]:
    """What the lock file says of the agent holding it ({} if unreadable)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def acquire(path: Path, *, config: str, http: str | None) -> PidLock:
    """Take the lock at ``path`` for this process.

    :raises AgentRunning: if another live agent holds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the agent's whole life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        holder = read_holder(path)
        pid = holder.get("pid", "?")
        reach = [f"`shipmate status -c {holder.get('config') or config}`"]
        if holder.get("http"):
            reach.append(f"http://{holder['http']}/healthz")
        raise AgentRunning(
            f"an agent already runs for this config on this host (pid {pid}, state in "
            f"{path.parent}); reach it with {' or '.join(reach)}, stop it with `kill {pid}`"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "config": config, "http": http,
                             "started": time.time()}))
    handle.flush()
    return PidLock(path, handle)
