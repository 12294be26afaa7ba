"""Is a process alive, and who am I: what shard locks and the writers log record about a worker.

A lock records {"host", "pid", "start", "time"}; `start` (the process's start time in clock ticks,
from /proc) tells a live process from a new one that reused a dead owner's pid.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

HOST = socket.gethostname()


def proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a local process, from /proc; None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], fields[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """Is local process `pid` running (not a zombie) and, if `start` is given, the same process?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, someone else's
    stat = proc_stat(pid)
    if stat is None:
        return True  # no /proc: trust kill(0)
    state, started = stat
    if state in ("Z", "X"):
        return False
    return start is None or started == start



def me() -> dict[str, Any]:
    """This process, as recorded in a lock: host, pid, start time, and the time now."""
    stat = proc_stat(os.getpid())
    return {"host": HOST, "pid": os.getpid(), "start": stat[1] if stat else None, "time": time.time()}
