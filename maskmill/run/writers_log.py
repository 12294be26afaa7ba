"""`writers.jsonl`: the append-only log of who claimed, wrote, or failed which shard.

One JSON line per event ("claimed", "written", "failed", "stale-lock-removed"), each written with
a single O_APPEND write so lines from concurrent workers never interleave. A shard is "written"
exactly once per run, however often its writing was interrupted: a writer killed after its shard's
stats landed but before its "written" line is logged for it by the next run's clean-up
(maskmill.run.folder.clean_run), which finds the dead writer's lock.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .process import HOST

WRITERS_LOG = "writers.jsonl"


def log_event(root: str | os.PathLike, shard_id: int, event: str, **extra: Any) -> None:
    """Append one line to the run's writers.jsonl."""
    line = json.dumps({"shard": shard_id, "event": event, "host": HOST, "pid": os.getpid(),
                       "time": round(time.time(), 3), **extra}, default=str) + "\n"
    fd = os.open(Path(root) / WRITERS_LOG, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_writers_log(root: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(root) / WRITERS_LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # cannot happen with single O_APPEND writes, but never fail a summary on it
    return entries


WRITE_EVENTS = ("claimed", "written", "failed", "damaged")


def last_write_events(root: str | os.PathLike) -> dict[int, str]:
    """Each shard's latest event about its writing (lock removals left out)."""
    return {e["shard"]: e["event"] for e in read_writers_log(root) if e.get("event") in WRITE_EVENTS}
