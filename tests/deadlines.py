"""Reading a child process's output with a deadline, so a stuck child fails a test instead of hanging it.

`pipe.readline()` blocks for ever if the child neither writes nor exits. `LineReader` reads the
raw file descriptor through `select` with a timeout and keeps its own buffer (Python's buffered
reader would hide complete lines from `select`).
"""
from __future__ import annotations

import os
import select
import time


class ReadTimeout(TimeoutError):
    """No complete line before the deadline."""


class LineReader:
    """Lines of a child's stdout (a pipe), each read bounded by a timeout."""

    def __init__(self, pipe) -> None:
        self.fd = pipe.fileno()
        self.buffer = b""

    def readline(self, timeout: float) -> str:
        """The next line without its newline; "" once the pipe is closed (the child exited).
        Raises ReadTimeout if no complete line arrives within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReadTimeout(f"no line within {timeout:g} s (partial: {self.buffer[-200:]!r})")
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return ""
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace")

    def rest(self) -> str:
        """What was read past the last returned line (for callers that read the rest another way)."""
        rest, self.buffer = self.buffer, b""
        return rest.decode(errors="replace")


def tail(path, chars: int = 3000) -> str:
    """The end of a child's stderr file, for failure messages."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no stderr file)"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll `predicate` until it returns something truthy (returned); TimeoutError naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"gave up waiting for {what} after {timeout} s")
