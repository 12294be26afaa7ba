"""Shard locks: a worker writes a shard only while it holds the shard's lock file.

    locks/00007.lock   a shard being written: {"host", "pid", "start", "time"}; gone when it is done
    locks/.guard       flock()ed while the folder is prepared or a stale lock is broken

A lock file is created with O_CREAT|O_EXCL, so exactly one worker gets it, on one host or on a
shared filesystem. A lock whose owner is dead (same host, pid gone, zombie or reused) is taken
over; a lock from another host is trusted until removed by hand (we cannot see its processes).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ..shards.layout import RunLayout
from ..shards.records import shard_name
from .process import HOST, me, process_alive
from .writers_log import log_event

LOCKS_DIR = "locks"
GUARD = ".guard"


@contextlib.contextmanager
def run_guard(root: Path) -> Iterator[None]:
    """Run-wide mutual exclusion (flock: released by the kernel if the holder dies)."""
    d = root / LOCKS_DIR
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / GUARD, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def lock_ids(layout: RunLayout) -> list[int]:
    d = layout.root / LOCKS_DIR
    if not d.is_dir():
        return []
    return sorted(int(p.stem) for p in d.glob("*.lock") if p.stem.isdigit())


class ShardLock:
    """An exclusive claim on one shard: `locks/{shard}.lock`, created with O_CREAT|O_EXCL.

        lock = ShardLock(layout, 7)
        if lock.try_acquire():
            try: ...write the shard...
            finally: lock.release()
    """

    def __init__(self, layout: RunLayout, shard_id: int) -> None:
        self.layout = layout
        self.shard_id = shard_id
        self.path = layout.root / LOCKS_DIR / f"{shard_name(shard_id)}.lock"
        self._content: bytes | None = None

    @property
    def held(self) -> bool:
        return self._content is not None

    def owner(self) -> dict[str, Any] | None:
        """The lock file's content; {} while its creator has not written it yet; None if there is no lock."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {}

    def try_acquire(self) -> bool:
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            content = json.dumps(me()).encode()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.break_if_stale():
                    continue
                return False
            try:
                os.write(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._content = content
            return True
        return False

    def stale(self) -> bool:
        """True if the lock exists and its owner is dead (or it was left empty)."""
        return self._is_stale(self.owner())

    def _is_stale(self, owner: dict[str, Any] | None) -> bool:
        if owner is None:
            return False
        if not owner:  # empty: being written this instant, or its creator died right after creating it
            try:
                return time.time() - self.path.stat().st_mtime > 30
            except FileNotFoundError:
                return False
        if owner.get("host") != HOST:
            return False  # cannot see another host's processes
        return not process_alive(int(owner.get("pid", -1)), owner.get("start"))

    def break_if_stale(self) -> bool:
        """Remove the lock if its owner is dead (checked and removed under the run guard)."""
        if not self.path.exists():
            return False
        with run_guard(self.layout.root):
            owner = self.owner()
            if not self._is_stale(owner):
                return False
            self.path.unlink(missing_ok=True)
        log_event(self.layout.root, self.shard_id, "stale-lock-removed", previous=owner)
        return True

    def release(self) -> None:
        if not self.held:
            return
        try:
            if self.path.read_bytes() == self._content:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._content = None

    def __enter__(self) -> "ShardLock":
        if not self.try_acquire():
            raise RuntimeError(f"shard {self.shard_id} is locked by {self.owner()}")
        return self

    def __exit__(self, *exc) -> None:
        self.release()

